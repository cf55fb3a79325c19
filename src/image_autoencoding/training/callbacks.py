"""What runs around the training loop without being part of it: timing, logging, fault injection in
tests, a user's own hooks. A callback overrides the methods it needs; the trainer calls each at
one named point of `fit`, in the order the callbacks were given (after its own checkpoint writes
of that point, so a callback that stops the process leaves the checkpoint a kill would leave).

The same shape as PyTorch Lightning's `Callback`, reduced to the points this loop has."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the trainer imports this module, and the CLI loads torch late
    from torch import Tensor

    from image_autoencoding.training.trainer import Trainer


class Callback:
    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch this run trains (after a resume has restored its state)."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before each training step; `trainer.step` steps are done."""

    def on_step_end(self, trainer: Trainer, batch: Tensor, sums: Tensor | None) -> None:
        """After each training step and any checkpoint due at it. `batch`: this process's images
        of the step; `sums`: their (recon, kl) sums over the global batch, on the device; None
        when the step was skipped as non-finite."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, values: dict[str, Any]) -> None:
        """After an epoch was validated, logged and checkpointed; `values` is its metrics.csv row."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch, when `fit` returns normally."""


class Callbacks(Callback):
    """Several callbacks called as one, in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_fit_start(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_fit_start(trainer)

    def on_step_start(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_step_start(trainer)

    def on_step_end(self, trainer: Trainer, batch: Tensor, sums: Tensor | None) -> None:
        for callback in self.callbacks:
            callback.on_step_end(trainer, batch, sums)

    def on_epoch_end(self, trainer: Trainer, epoch: int, values: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(trainer, epoch, values)

    def on_fit_end(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_fit_end(trainer)
