"""train.early_stopping_patience: end a run whose train.monitor metric has stopped improving.

The run then ends as one that trained all its epochs does (its last epoch checkpointed, best.pt,
the report), and says why. What it counts from (the trainer's monitor: the last epoch that gained
at least train.early_stopping_min_delta) is saved in every checkpoint, so `vae train --resume` with
more patience (or more epochs) goes on from there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from image_autoencoding.training.callbacks import Callback

if TYPE_CHECKING:
    from image_autoencoding.training.trainer import Trainer


class EarlyStopping(Callback):
    def __init__(self, patience: int):
        self.patience = patience

    def on_fit_start(self, trainer: Trainer) -> None:
        self._stop_if_patience_spent(trainer, trainer.epoch)

    def on_epoch_end(self, trainer: Trainer, epoch: int, values: dict[str, Any]) -> None:
        self._stop_if_patience_spent(trainer, epoch)

    def _stop_if_patience_spent(self, trainer: Trainer, epoch: int) -> None:
        monitor = trainer.monitor
        waited = monitor.epochs_without_gain(epoch)
        if waited is not None and waited >= self.patience and epoch < trainer.cfg.epochs:
            gain = f"a gain of at least {monitor.min_delta:g}" if monitor.min_delta else "a gain"
            trainer.request_stop(
                f"early stopping after epoch {epoch} of {trainer.cfg.epochs}: {waited} epochs without {gain} in "
                f"{monitor.name} (best {monitor.best:.4f} at epoch {monitor.best_epoch}; "
                f"train.early_stopping_patience={self.patience})")
