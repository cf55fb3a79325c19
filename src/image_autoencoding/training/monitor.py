"""train.monitor: the validation metric that picks best.pt and drives early stopping, tracked once.

Two marks are kept, both for the same metric: the best value so far (an epoch that beats it is
saved as best.pt), and the value of the last epoch that gained at least
train.early_stopping_min_delta on the mark before it (early stopping counts the epochs since). With
no minimum gain the two are the same."""

from __future__ import annotations

import math
from typing import Any

from image_autoencoding.config import MONITORED


class Monitor:
    def __init__(self, name: str, min_delta: float = 0.0):
        self.name, self.min_delta = name, min_delta
        self.mode = MONITORED[name]  # max: larger is better
        self.best: float | None = None  # the best value so far
        self.best_epoch = 0
        self.gain: float | None = None  # the value of the last epoch that counted as a gain
        self.gain_epoch = 0
        self.improved = False  # whether the last epoch set a new best

    def update(self, epoch: int, values: dict[str, Any]) -> bool:
        """Record `epoch`'s validation `values`; returns whether it is the best so far. A value that
        is not a number (NaN) never is."""
        value = float(values[self.name])
        counts = not math.isnan(value)
        self.improved = counts and (self.best is None or self._better(value, self.best, 0.0))
        if self.improved:
            self.best, self.best_epoch = value, epoch
        if counts and (self.gain is None or self._better(value, self.gain, self.min_delta)):
            self.gain, self.gain_epoch = value, epoch
        return self.improved

    def _better(self, value: float, mark: float, min_delta: float) -> bool:
        gain = value - mark if self.mode == "max" else mark - value
        return gain > 0 and gain >= min_delta

    def epochs_without_gain(self, epoch: int) -> int | None:
        """Epochs after the last gain up to `epoch`; None before any epoch was validated."""
        return None if self.gain is None else epoch - self.gain_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "best": self.best, "best_epoch": self.best_epoch,
                "gain": self.gain, "gain_epoch": self.gain_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """The marks a checkpoint saved; returns False (and keeps none) when they were kept for
        another metric: a resume that changes train.monitor starts its marks afresh."""
        if state.get("name") != self.name:
            return False
        self.best, self.best_epoch = state.get("best"), int(state.get("best_epoch", 0))
        self.gain, self.gain_epoch = state.get("gain"), int(state.get("gain_epoch", 0))
        return True
