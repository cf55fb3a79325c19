"""Deterministic crashes for the reliability tests, through the trainer's callbacks.

`SignalAtStep("SIGKILL@7")` makes the training process send itself SIGKILL right after step 7
(and any checkpoint due at that step): killing from outside at a chosen step would race with the
loop; this makes "killed at step N" exact.

Run as a script, this file is `vae` with that callback added from the environment:
    IMAGE_AUTOENCODING_SIGNAL_AT_STEP=SIGKILL@7 python tests/helpers/faults.py train ...
(also as torchrun's script, so every rank gets it).
"""

from __future__ import annotations

import os
import signal
import sys

from image_autoencoding.training.callbacks import Callback

ENV = "IMAGE_AUTOENCODING_SIGNAL_AT_STEP"
SCRIPT = os.path.abspath(__file__)


class SignalAtStep(Callback):
    def __init__(self, spec: str):
        name, sep, step = spec.partition("@")
        if not sep:
            raise ValueError(f"{ENV}={spec!r}: expected SIGNAL@STEP, e.g. SIGKILL@7")
        self.signum, self.step = int(signal.Signals[name]), int(step)

    def on_step_end(self, trainer, batch, sums) -> None:
        if trainer.step == self.step:
            os.kill(os.getpid(), self.signum)


class NanBatches(Callback):
    """Makes the batches for which bad(epoch, batch) holds all NaN (batch counted from 1 within its
    epoch), through a forward pre-hook on the trainer's step module: the step then sees a
    non-finite loss exactly as with corrupt data."""

    def __init__(self, bad):
        self.bad, self.epoch, self.batch, self.hook = bad, 0, 0, None

    def on_fit_start(self, trainer) -> None:
        self.hook = trainer.training_step.objective.register_forward_pre_hook(self._poison)

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self.epoch = epoch

    def on_step_start(self, trainer) -> None:
        self.batch = trainer.progress.steps + 1

    def _poison(self, module, args):
        x, *rest = args
        return (x * float("nan"), *rest) if self.bad(self.epoch, self.batch) else None

    def teardown(self, trainer) -> None:
        if self.hook is not None:
            self.hook.remove()


if __name__ == "__main__":
    from image_autoencoding.cli import main

    spec = os.environ.get(ENV)
    sys.exit(main(sys.argv[1:], callbacks=[SignalAtStep(spec)] if spec else []))
