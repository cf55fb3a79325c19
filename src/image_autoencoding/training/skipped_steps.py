"""The skipped steps in a row, counted on the device and read by the host only when it logs.

A step skipped for a non-finite loss or gradient is a device flag (training/steps/base.py); reading
it every step would make the host wait for the GPU every step. The counts live here as device
tensors; `read()` (one host wait) returns what happened since the last read: how many steps were
skipped, the last of them, and the step at which train.max_bad_steps in a row was first reached.
Steps are named by a code, step << 32 | batch (batch within its epoch), so that one `where` keeps
both without a copy from host memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NONE = -1


@dataclass(frozen=True)
class SkippedSince:
    """What the device counted since the last read; steps as (step, batch within its epoch)."""

    count: int  # steps skipped since the last read
    last: tuple[int, int] | None  # the last of them
    limit_reached_at: tuple[int, int] | None  # the step that made max_bad_steps in a row
    in_a_row: int


def _step(code: int) -> tuple[int, int] | None:
    return None if code == NONE else (code >> 32, code & 0xFFFFFFFF)


class SkippedSteps:
    def __init__(self, limit: int, device: torch.device, in_a_row: int = 0):
        self.limit = limit
        self.in_a_row = torch.full((), in_a_row, dtype=torch.int64, device=device)
        self._since_read = torch.zeros((), dtype=torch.int64, device=device)
        self._last = torch.full((), NONE, dtype=torch.int64, device=device)
        self._reached = torch.full((), NONE, dtype=torch.int64, device=device)

    def count(self, skipped: Tensor, step: int, batch: int) -> None:
        """After a step (`step`: the trainer's steps done, this one included): a few device kernels,
        the step's numbers passed as kernel arguments."""
        code = step << 32 | batch
        flag = skipped.long()
        self.in_a_row.add_(1).mul_(flag)
        self._since_read += flag
        self._last.copy_(torch.where(skipped, code, self._last))
        first = (self.in_a_row >= self.limit) & (self._reached == NONE)
        self._reached.copy_(torch.where(first, code, self._reached))

    def read(self) -> SkippedSince:
        """One host wait; the count since the last read starts again."""
        count, last, reached, in_a_row = torch.stack(
            [self._since_read, self._last, self._reached, self.in_a_row]).tolist()
        self._since_read.zero_()
        return SkippedSince(count, _step(last), _step(reached), in_a_row)
