"""torchrun and DistributedDataParallel: which process this is, the process group, and the few
collective operations the trainer needs.

A run started without torchrun, or by torchrun with one process, never creates a process group:
every helper here is then a no-op returning its input, so single-process training runs no
collective at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from image_autoencoding.runtime import resolve_device


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks with a gradient: the loss is a sum over ranks of terms that each depend on
    the summed value, so the gradient of the sum with respect to it is again the sum over ranks.
    (torch.distributed.nn.functional.all_reduce does the same but is deprecated, and refused by
    torch.compile.)"""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def summed_over_ranks(tensor: Tensor) -> Tensor:
    """All-reduce (sum) that autograd differentiates: its backward sums the ranks' gradients, so a
    term computed from the global sum sends each rank the gradient for its own images. The one
    differentiable collective of the package (free bits, synchronised BatchNorm on CPU)."""
    return _SumOverRanks.apply(tensor)


def _through_one_flat_tensor(tensors: list[Tensor], collective: Callable[[Tensor], Any]) -> None:
    """Run an in-place collective on the tensors' values concatenated (one call instead of one per
    tensor), then copy the results back into each tensor, whatever its memory layout."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    collective(flat)
    torch._foreach_copy_(tensors, [chunk.view_as(t) for chunk, t in
                                   zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)])


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (torchrun's RANK, LOCAL_RANK, WORLD_SIZE)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder: logs, metrics.csv, TensorBoard, pictures, checkpoints."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The configured device; on GPUs each process of a node takes the GPU of its local rank."""
        device = resolve_device(name)
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (the tensor must live on the process group's device)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_sum_(self, tensors: list[Tensor]) -> None:
        """Sum each tensor over ranks, in place, in one collective (all of one dtype and device)."""
        if self.enabled and tensors:
            _through_one_flat_tensor(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))

    def broadcast_from_rank_0_(self, tensors: list[Tensor]) -> None:
        """Rank 0's values of the tensors on every rank, in place, one collective per dtype."""
        if not self.enabled:
            return
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            _through_one_flat_tensor([t for t in tensors if t.dtype == dtype], lambda flat: dist.broadcast(flat, src=0))

    def broadcast_from_main(self, value: Any) -> Any:
        """Rank 0's value on every rank (a run folder path, a config): picklable objects only."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


SINGLE = Distributed()


def from_environment() -> Distributed:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each process it starts."""
    env = os.environ
    return Distributed(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[Distributed]:
    """Join the process group for the length of a run: nccl between GPUs, gloo between CPUs. The
    rendezvous (MASTER_ADDR / MASTER_PORT, or torchrun's c10d store) comes from the environment."""
    place = from_environment()
    # Resolved before anything is written: a device this machine lacks is a config error, not a
    # run folder left behind empty.
    device = place.device(device_name)
    if not place.enabled:
        yield place
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield place
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
