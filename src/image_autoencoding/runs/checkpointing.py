"""The run's checkpoints as a training callback: checkpoints/last.pt, epoch_N.pt and best.pt."""

from __future__ import annotations

import logging
from pathlib import Path

from image_autoencoding.config import TrainConfig
from image_autoencoding.runs.checkpoint import (
    prune_epoch_checkpoints,
    publish_as,
    remove_leftover_temporaries,
    save_checkpoint,
)
from image_autoencoding.runs.resume import set_aside_later_checkpoints
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.trainer import Trainer

logger = logging.getLogger("image_autoencoding")


class Checkpointing(Callback):
    """last.pt every train.checkpoint_every_steps steps and on a stop signal; at the end of every
    train.checkpoint_every-th epoch (and of the last) epoch_N.pt, copied to last.pt (separate
    files, so a damaged one leaves the other to resume from), the newest train.keep_checkpoints of
    them kept; best.pt whenever an epoch's validation SSIM is the best so far."""

    def __init__(self, run_dir: Path, cfg: TrainConfig):
        self.folder = Path(run_dir) / "checkpoints"
        self.cfg = cfg

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first checkpoint of this run: delete partial writes a killed run left, and set
        aside the checkpoints saved after the point this run resumes from (a branch it abandons)."""
        removed = remove_leftover_temporaries(self.folder)
        if removed:
            logger.info("removed %d partial checkpoint write(s) of an interrupted run: %s", len(removed),
                        ", ".join(path.name for path in removed))
        aside = set_aside_later_checkpoints(self.folder, trainer.epoch, trainer.step)
        if aside is not None:
            moved = sorted(path.name for path in aside.iterdir())
            logger.info("resuming from epoch %d, step %d: moved the later checkpoints %s to %s",
                        trainer.epoch, trainer.step, ", ".join(moved), aside)

    def on_step_end(self, trainer: Trainer, batch, sums) -> None:
        every = self.cfg.checkpoint_every_steps
        if every is not None and trainer.step % every == 0:
            save_checkpoint(trainer.state(), self.last)  # inside an epoch: its epoch_N.pt stays as it was

    def on_epoch_end(self, trainer: Trainer, epoch: int, values) -> None:
        saved = None
        if epoch % self.cfg.checkpoint_every == 0 or trainer.is_final_epoch(epoch):
            saved = self.folder / f"epoch_{epoch}.pt"
            save_checkpoint(trainer.state(), saved)
            publish_as(saved, self.last)
            prune_epoch_checkpoints(self.folder, self.cfg.keep_checkpoints)
        if trainer.improved:
            best = self.folder / "best.pt"
            if saved is not None:
                publish_as(saved, best)  # a copy: pruning epoch_N.pt keeps it
            else:
                save_checkpoint(trainer.state(), best)

    def on_interrupt(self, trainer: Trainer, signum: int) -> None:
        save_checkpoint(trainer.state(), self.last)
