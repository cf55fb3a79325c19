"""SIGTERM (schedulers, `kill`) and Ctrl-C stop training cleanly: the current step finishes, a
checkpoint is written, and the process exits 143 / 130 (128 + the signal), as shells expect."""

from __future__ import annotations

import signal
import threading


class StopRequested(Exception):
    """Raised by the trainer after it has checkpointed in answer to a signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """While active, SIGTERM and SIGINT only set `signum`; the training loop checks it between steps.
    A second Ctrl-C stops at once (KeyboardInterrupt), for a user who does not want to wait."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
