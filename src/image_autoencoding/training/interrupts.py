"""SIGTERM and Ctrl-C during training: remember the request, let the current step finish, then the
trainer's callbacks write a checkpoint and it stops (exit status 143 / 130, the shell's 128 + signal number).

A second signal of either kind stops at once (no checkpoint), for a user who does not want to wait.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal; `exit_status` is 128 + the signal number. `after_callbacks`:
    the trainer's callbacks ran their on_interrupt (wrote a checkpoint) before it was raised; a
    second signal stops at once, without."""

    def __init__(self, signum: int, message: str, after_callbacks: bool = False):
        super().__init__(message)
        self.signum = signum
        self.after_callbacks = after_callbacks
        self.exit_status = 128 + signum


class StopRequests:
    """Installs handlers for SIGINT and SIGTERM (main thread only: Python delivers signals there;
    elsewhere, e.g. tests calling the trainer from a thread, nothing is installed)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(signum, f"stopped at once on a second {signal_name(signum)}")
        self.signum = signum


@contextmanager
def stop_at_once(when: str) -> Iterator[None]:
    """SIGINT and SIGTERM raise TrainingInterrupted at once, "stopped on SIGTERM <when>", for work
    after training that has nothing to save (the final report writes each file atomically, so an
    exception anywhere in it leaves no half-written file). Main thread only, as StopRequests."""
    def handle(signum: int, frame: FrameType | None) -> None:
        raise TrainingInterrupted(signum, f"stopped on {signal_name(signum)} {when}", after_callbacks=True)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, handle) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def signal_to_stop_on(counts: list[float]) -> int | None:
    """From the number of ranks that received each of HANDLED: SIGTERM over SIGINT, or None."""
    raised = [signum for signum, count in zip(HANDLED, counts, strict=True) if count > 0]
    return int(raised[-1]) if raised else None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name

