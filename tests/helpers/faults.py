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


if __name__ == "__main__":
    from image_autoencoding.cli import main

    spec = os.environ.get(ENV)
    sys.exit(main(sys.argv[1:], callbacks=[SignalAtStep(spec)] if spec else []))
