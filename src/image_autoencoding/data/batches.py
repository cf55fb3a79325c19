"""Training and evaluation batches from uint8 pixels: shuffling, random horizontal flip and
normalisation to [-1, 1] happen per batch, vectorised, on the training device."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from image_autoencoding.config import DataConfig


class Normalizer:
    """uint8 NHWC on any device -> float NCHW, (x / 255 - mean) / std, and back."""

    def __init__(self, cfg: DataConfig, device: torch.device):
        self.mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)

    def __call__(self, pixels: Tensor) -> Tensor:
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def to_unit(self, x: Tensor) -> Tensor:
        """Model space -> images in [0, 1], for pictures and metrics."""
        return (x.float() * self.std + self.mean).clamp_(0.0, 1.0)


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def flip_where(x: Tensor, flip: Tensor) -> Tensor:
    """Flip left-right the images whose `flip` is true (drawn with probability 1/2 per image: the
    original's RandomHorizontalFlip). `flip` is on x's device already: moved there from pageable
    memory, it would be a copy that waits for every kernel already queued (CUDA runtime API, "API
    synchronization behavior"), which stalled every training step on a GPU."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


@dataclass(frozen=True)
class EpochPlan:
    """Which images each step of an epoch reads, and which of them it flips: everything random about
    an epoch's batches, decided once per epoch, so that the batches read from the memory-mapped cache
    (training_batches) and those gathered on the device (device_split.ResidentSplit) are the same.

    `index[p]` is the image at position p of the epoch: the epoch's order with each global batch
    sorted (a memory-mapped cache is then read front to back; the batch is shuffled anyway), and
    `flip[p]` whether it is mirrored. Step s reads positions s x global_batch on, and rank r of W
    takes every W-th of them from the r-th on (see training_batches)."""

    index: Tensor  # (positions,) int64
    flip: Tensor  # (positions,) bool
    global_batch: int
    steps: range  # the steps still to draw: start_step to the epoch's last

    def to(self, device: torch.device) -> EpochPlan:
        """The plan on `device`, in one copy of each tensor. To a GPU from pinned memory: a copy from
        pageable memory would wait for every kernel already queued (see flip_where)."""
        if device.type != "cuda":
            return replace(self, index=self.index.to(device), flip=self.flip.to(device))
        return replace(self, index=self.index.pin_memory().to(device, non_blocking=True),
                       flip=self.flip.pin_memory().to(device, non_blocking=True))

    def shares(self, rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """(this rank's image indices, their flips) for each step, as views of the plan: no copy, and
        on a device no host work beyond slicing."""
        for step in self.steps:
            positions = slice(step * self.global_batch, (step + 1) * self.global_batch)
            yield self.index[positions][rank::world_size], self.flip[positions][rank::world_size]


def epoch_plan(
    n: int, batch_size: int, seed: int, epoch: int, max_steps: int | None = None, start_step: int = 0,
    world_size: int = 1,
) -> EpochPlan:
    """The plan of an epoch of n images (see training_batches for the rules it follows). The flip
    draws are one `torch.rand` per step, the skipped first `start_step` steps included, so that a
    resumed epoch draws what an uninterrupted one does."""
    global_batch = batch_size * world_size
    total = steps_per_epoch(n, batch_size, max_steps, world_size)
    used = min(total * global_batch, n)  # the last step may be partial
    order = epoch_permutation(n, seed, epoch)[:used]
    whole = used - used % global_batch
    index = torch.cat([order[:whole].view(-1, global_batch).sort(dim=1).values.flatten(), order[whole:].sort().values])
    flip_generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
    draws = [torch.rand(min(global_batch, used - step * global_batch), generator=flip_generator)
             for step in range(total)]
    flip = torch.cat(draws) < 0.5 if draws else torch.zeros(0, dtype=torch.bool)
    return EpochPlan(index, flip, global_batch, range(min(start_step, total), total))


def training_batches(
    images: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    device: torch.device,
    normalize: Normalizer,
    max_steps: int | None = None,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    flip: bool = True,
) -> Iterator[Tensor]:
    """Shuffled, flipped (unless `flip` is false), normalised batches for one epoch; a last partial
    batch is kept unless it holds a single image (BatchNorm cannot normalise a batch of one).

    With several processes, step s is one global batch of `batch_size x world_size` images of the
    epoch's order (the same order on every rank, from (seed, epoch)), sorted by index, and rank r
    takes every W-th image of it from the r-th on, with the flip draws made for the whole global
    batch. Caches are ordered by class, so contiguous shares of the sorted batch gave rank 0 the
    first classes' images of every step (class-skewed BatchNorm statistics); every W-th image gives
    each rank a share spread over the whole batch, still read front to back. Rank 0 to W-1 together
    see exactly the images, and flips, of one process with the global batch size, row p of that
    batch being row p // W of rank p % W (the layout `objective.share_of_global_noise` follows), and
    steps count global batches whatever the number of processes. The last partial global batch is
    dropped (as DistributedSampler's drop_last), so every rank has a full share.

    `start_step` skips the first batches of the epoch (a run resumed inside an epoch): their flip
    draws are still made, without reading pixels, so the remaining batches are exactly those an
    uninterrupted run would see. Each batch is read from `images` (the memory-mapped cache) on the
    host; device_split.ResidentSplit draws the same batches from a copy on the device."""
    plan = epoch_plan(len(images), batch_size, seed, epoch, max_steps, start_step, world_size)
    # Pinned host memory lets both copies to a GPU run without waiting for it.
    pin = device.type == "cuda"
    for index, flips in plan.shares(rank, world_size):
        # Fancy indexing copies the rows into a new array, which a tensor can share.
        pixels = torch.from_numpy(images[index.numpy()])
        if pin:
            pixels, flips = pixels.pin_memory(), flips.pin_memory()
        x = normalize(pixels.to(device, non_blocking=True))
        yield flip_where(x, flips.to(device, non_blocking=True)) if flip else x


def steps_per_epoch(n: int, batch_size: int, max_steps: int | None, world_size: int = 1) -> int:
    """Steps (global batches) in an epoch of n images."""
    if world_size > 1:
        steps = n // (batch_size * world_size)
    else:
        steps = n // batch_size + (n % batch_size > 1)
    return min(steps, max_steps) if max_steps is not None else steps


def evaluation_batches(
    images: np.ndarray, batch_size: int, device: torch.device, normalize: Normalizer
) -> Iterator[Tensor]:
    """Every image once, in order, no flip."""
    for start in range(0, len(images), batch_size):
        # np.array copies: slices of a read-only memory map cannot back a tensor.
        pixels = torch.from_numpy(np.array(images[start : start + batch_size]))
        yield normalize(pixels.to(device))
