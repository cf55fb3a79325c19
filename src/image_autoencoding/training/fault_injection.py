"""A deterministic crash for the reliability tests: with IMAGE_AUTOENCODING_SIGNAL_AT_STEP=SIGKILL@7
in the environment, the training process sends itself SIGKILL right after optimizer step 7 (and any
checkpoint due at that step). Killing from outside at a chosen step would race with the training
loop; this makes "killed at step N" exact. Unset (always, outside tests) it does nothing."""

from __future__ import annotations

import os
import signal

from image_autoencoding.errors import UserError

ENV = "IMAGE_AUTOENCODING_SIGNAL_AT_STEP"


class SignalAtStep:
    def __init__(self, spec: str | None):
        self.signum: int | None = None
        self.step: int | None = None
        if spec:
            name, sep, step = spec.partition("@")
            try:
                self.signum = int(signal.Signals[name])
                self.step = int(step)
            except (KeyError, ValueError):
                raise UserError(f"{ENV}={spec!r}: expected SIGNAL@STEP, e.g. SIGKILL@7") from None
            if not sep:
                raise UserError(f"{ENV}={spec!r}: expected SIGNAL@STEP, e.g. SIGKILL@7")

    @classmethod
    def from_environment(cls) -> SignalAtStep:
        return cls(os.environ.get(ENV))

    def after_step(self, step: int) -> None:
        if self.signum is not None and step == self.step:
            os.kill(os.getpid(), self.signum)
