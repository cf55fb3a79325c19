"""The run's checkpoints as a training callback: checkpoints/last.pt, epoch_N.pt and best.pt."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from image_autoencoding.config import TrainConfig
from image_autoencoding.runs.checkpoint import (
    prune_epoch_checkpoints,
    publish_as,
    remove_leftover_temporaries,
    save_checkpoint,
)
from image_autoencoding.runs.resume import set_aside_later_checkpoints
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.trainer import Trainer

logger = logging.getLogger("image_autoencoding")


class Checkpointing(Callback):
    """last.pt at the end of every epoch, inside epochs every train.checkpoint_every_steps steps and
    once train.checkpoint_every_minutes have passed since the last checkpoint, and on a stop signal:
    a run killed at any moment (kill -9 leaves no time to save) loses at most that much work. At the
    end of every train.checkpoint_every-th epoch (and of the last) also epoch_N.pt, the newest
    train.keep_checkpoints of them kept; best.pt whenever an epoch's train.monitor metric is the best so
    far. Each is a separate file (a copy), so a damaged one leaves the others to resume from."""

    def __init__(self, run_dir: Path, cfg: TrainConfig):
        self.paths = RunPaths(run_dir)
        self.folder = self.paths.checkpoints
        self.cfg = cfg
        self._saved_at = time.monotonic()  # when this run last wrote a checkpoint

    @property
    def last(self) -> Path:
        return self.paths.last

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first checkpoint of this run: delete partial writes a killed run left, and set
        aside the checkpoints saved after the point this run resumes from (a branch it abandons)."""
        self._saved_at = time.monotonic()
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
        steps, minutes = self.cfg.checkpoint_every_steps, self.cfg.checkpoint_every_minutes
        due = ((steps is not None and trainer.step % steps == 0)
               or (minutes is not None and time.monotonic() - self._saved_at >= minutes * 60))
        if due:
            self._save(trainer, self.last)  # inside an epoch: its epoch_N.pt stays as it was

    def on_epoch_end(self, trainer: Trainer, epoch: int, values) -> None:
        if epoch % self.cfg.checkpoint_every == 0 or trainer.is_final_epoch(epoch):
            saved = self.paths.epoch_checkpoint(epoch)
            self._save(trainer, saved)
            publish_as(saved, self.last)
            prune_epoch_checkpoints(self.folder, self.cfg.keep_checkpoints)
        else:
            saved = self.last
            self._save(trainer, saved)
        if trainer.monitor.improved:
            publish_as(saved, self.paths.best)  # a copy: pruning epoch_N.pt keeps it

    def on_interrupt(self, trainer: Trainer, signum: int) -> None:
        self._save(trainer, self.last)

    def _save(self, trainer: Trainer, path: Path) -> None:
        save_checkpoint(trainer.state(), path)
        self._saved_at = time.monotonic()
