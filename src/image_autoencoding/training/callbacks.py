"""What runs around the training loop without being part of it: the run folder's files (checkpoints,
metrics.csv, TensorBoard, pictures), the progress bar, timing in benchmarks, the tests' crashes and
corrupt batches (tests/helpers/faults.py), a user's own hooks. A callback overrides the methods it
needs; the trainer calls each at one named point of `fit`, in the order the callbacks were given:
the run folder's first, so a callback that stops the process leaves the files a kill at that point
would leave.

The same shape as PyTorch Lightning's `Callback`, reduced to the points this loop has."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the trainer imports this module, and the CLI loads torch late
    from torch import Tensor

    from image_autoencoding.training.steps import StepResult
    from image_autoencoding.training.trainer import Trainer


class Callback:
    # A callback whose state must survive a resume names it here and implements state_dict /
    # load_state_dict (plain values only: checkpoints are read with weights_only=True).
    state_key: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The state `state_dict` returned, from the checkpoint a run resumes from."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch this run trains (after a resume has restored its state)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first step of `epoch` this run takes; `trainer.progress.steps` of its
        `trainer.epoch_steps` steps are done (more than 0 when resumed inside the epoch)."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before each training step; `trainer.step` steps are done."""

    def on_step_end(self, trainer: Trainer, batch: Tensor, result: StepResult) -> None:
        """After each training step. `batch`: this process's images of the step; `result`: its
        device tensors (steps/base.StepResult: the (recon, kl) sums over the global batch, and
        `skipped`, set when the step was non-finite); reading them waits for the device.
        `trainer.progress` holds the epoch's running sums."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, values: dict[str, Any]) -> None:
        """After an epoch was trained and validated; `values` is its metrics.csv row (also
        `trainer.metrics`), and `trainer.monitor.improved` says whether its train.monitor metric is
        the best so far."""

    def on_interrupt(self, trainer: Trainer, signum: int) -> None:
        """A stop signal was received (and, under torchrun, agreed by all ranks); `fit` raises
        TrainingInterrupted after this. Write what a resume needs."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch, when `fit` returns normally."""

    def teardown(self, trainer: Trainer) -> None:
        """When `fit` ends, normally or by an exception: close files."""


class Callbacks(Callback):
    """Several callbacks called as one, in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def state_dict(self) -> dict[str, Any]:
        return {c.state_key: c.state_dict() for c in self.callbacks if c.state_key is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for callback in self.callbacks:
            if callback.state_key is not None and callback.state_key in state:
                callback.load_state_dict(state[callback.state_key])

    def on_fit_start(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_fit_start(trainer)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        for callback in self.callbacks:
            callback.on_epoch_start(trainer, epoch)

    def on_step_start(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_step_start(trainer)

    def on_step_end(self, trainer: Trainer, batch: Tensor, result: StepResult) -> None:
        for callback in self.callbacks:
            callback.on_step_end(trainer, batch, result)

    def on_epoch_end(self, trainer: Trainer, epoch: int, values: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(trainer, epoch, values)

    def on_interrupt(self, trainer: Trainer, signum: int) -> None:
        for callback in self.callbacks:
            callback.on_interrupt(trainer, signum)

    def on_fit_end(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_fit_end(trainer)

    def teardown(self, trainer: Trainer) -> None:
        """Every callback's, even when one of them fails (the first failure is raised after)."""
        failure: BaseException | None = None
        for callback in self.callbacks:
            try:
                callback.teardown(trainer)
            except BaseException as exc:  # noqa: BLE001 -- re-raised below, after the others closed
                failure = failure or exc
        if failure is not None:
            raise failure
