"""train.early_stopping_patience: end a run whose validation SSIM has stopped improving.

The run then ends as one that trained all its epochs does (its last epoch checkpointed, best.pt,
the report), and says why. What it counts (the best SSIM that counted and its epoch) is saved in
every checkpoint, so `vae train --resume` with more patience (or more epochs) goes on from there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from image_autoencoding.training.callbacks import Callback

if TYPE_CHECKING:
    from image_autoencoding.training.trainer import Trainer

logger = logging.getLogger("image_autoencoding")


class EarlyStopping(Callback):
    state_key = "early_stopping"

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None  # the validation SSIM of the last epoch that counted as a gain
        self.best_epoch = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.best is None and trainer.epoch > 0:  # a run resumed with early stopping newly on
            self.best, self.best_epoch = trainer.best_ssim, trainer.epoch
        self._stop_if_patience_spent(trainer, trainer.epoch)

    def on_epoch_end(self, trainer: Trainer, epoch: int, values: dict[str, Any]) -> None:
        ssim = values["valid_ssim"]
        if self.best is None or (ssim > self.best and ssim - self.best >= self.min_delta):
            self.best, self.best_epoch = ssim, epoch
        self._stop_if_patience_spent(trainer, epoch)

    def _stop_if_patience_spent(self, trainer: Trainer, epoch: int) -> None:
        waited = epoch - self.best_epoch
        if self.best is not None and waited >= self.patience and epoch < trainer.cfg.epochs:
            gain = f"a gain of at least {self.min_delta:g}" if self.min_delta else "a gain"
            trainer.request_stop(
                f"early stopping after epoch {epoch} of {trainer.cfg.epochs}: {waited} epochs without {gain} in "
                f"validation SSIM (best {self.best:.4f} at epoch {self.best_epoch}; "
                f"train.early_stopping_patience={self.patience})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], int(state["best_epoch"])
