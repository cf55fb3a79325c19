"""A copy of modules' buffers to put back when a training step is skipped.

BatchNorm updates its running statistics during the forward pass, before the loss can be checked;
a step skipped for a non-finite loss or gradient must leave them as they were, or the next
checkpoint could hold the NaN the skipped batch produced."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BufferSnapshot:
    def __init__(self, *modules: nn.Module):
        self._buffers = [b for module in modules for b in module.buffers()]
        self._copy = [b.detach().clone() for b in self._buffers]

    def take(self) -> None:
        """Before the forward pass: device copies only, nothing waits for the device."""
        if self._buffers:  # a model without BatchNorm (model.arch=resnet) has none; foreach refuses []
            torch._foreach_copy_(self._copy, self._buffers)

    def restore(self) -> None:
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._copy)

    def restore_if(self, skipped: Tensor) -> None:
        """Put the copy back where the device flag `skipped` is set, without the host reading it."""
        for buffer, copy in zip(self._buffers, self._copy, strict=True):
            torch.where(skipped, copy, buffer, out=buffer)
