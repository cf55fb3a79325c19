"""Where training batches come from (data.on_device): the memory-mapped cache, one batch read and
copied to the device per step, or the whole split's uint8 pixels copied to the training device
once, each step's batch gathered, normalised and flipped there. Both draw the same batches: the
epoch's plan (batches.epoch_plan) decides the order, the shares and the flips for either."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from image_autoencoding.config import RESIDENT_SHARE, ConfigError
from image_autoencoding.data.batches import Normalizer, epoch_plan, flip_where, training_batches

# Rows copied to the device at a time: the host holds one chunk, never a second copy of the split.
_CHUNK_BYTES = 64 << 20


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def _indexed(device: torch.device) -> torch.device:
    """'cuda' as the GPU it means ('cuda:0'), for the log and for errors."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class MappedSplit:
    """The memory-mapped cache: each step reads its batch on the host and copies it to the device
    (from pinned memory on a GPU)."""

    def __init__(self, images: np.ndarray, device: torch.device, why: str):
        self.images = images
        self.device = device
        self.description = f"memory-mapped cache{', pinned copies' if device.type == 'cuda' else ''} ({why})"

    def batches(
        self, batch_size: int, seed: int, epoch: int, normalize: Normalizer, max_steps: int | None = None,
        start_step: int = 0, rank: int = 0, world_size: int = 1, flip: bool = True,
    ) -> Iterator[Tensor]:
        """batches.training_batches of the cache."""
        return training_batches(self.images, batch_size, seed, epoch, self.device, normalize, max_steps,
                                start_step, rank, world_size, flip)


class ResidentSplit:
    """The split's uint8 pixels (N, H, W, 3) on `device`, copied once. Per epoch, the plan (order and
    every flip draw) is made on the host and copied to the device in one copy per tensor; per step,
    the batch is gathered, normalised and flipped on the device: no host-to-device copy, no read of
    a device value, nothing for the host to do but launch kernels. Under torchrun every rank holds
    the whole split and takes its share on the device."""

    def __init__(self, images: np.ndarray, device: torch.device, why: str):
        self.device = device
        self.pixels = torch.empty(images.shape, dtype=torch.uint8, device=device)
        rows = max(1, _CHUNK_BYTES // max(1, int(np.prod(images.shape[1:]))))
        for start in range(0, len(images), rows):
            # np.array copies: slices of a read-only memory map cannot back a tensor.
            self.pixels[start : start + rows].copy_(torch.from_numpy(np.array(images[start : start + rows])))
        self.description = f"resident on {device} ({why})"

    def batches(
        self, batch_size: int, seed: int, epoch: int, normalize: Normalizer, max_steps: int | None = None,
        start_step: int = 0, rank: int = 0, world_size: int = 1, flip: bool = True,
    ) -> Iterator[Tensor]:
        """The batches batches.training_batches draws from the cache, drawn from the device's copy."""
        plan = epoch_plan(len(self.pixels), batch_size, seed, epoch, max_steps, start_step, world_size)
        for index, flips in plan.to(self.device).shares(rank, world_size):
            x = normalize(self.pixels.index_select(0, index))
            yield flip_where(x, flips) if flip else x


def residence(nbytes: int, on_device: bool | Literal["auto"], device: torch.device) -> tuple[bool, str]:
    """Whether a split of `nbytes` goes on `device` as data.on_device asks, and why (for the log).
    auto: on a GPU when the split takes at most RESIDENT_SHARE of its memory (and that much is free);
    on the CPU no (a copy in RAM would only cost memory). true: on any device (on the CPU, a copy in
    RAM); on a GPU whose free memory it does not fit, a ConfigError of one line."""
    if on_device is False:
        return False, "data.on_device=false"
    if device.type != "cuda":
        if on_device is True:
            return True, f"{_gigabytes(nbytes)} in RAM, data.on_device=true"
        return False, f"data.on_device=auto on {device.type}"
    device = _indexed(device)
    free, total = torch.cuda.mem_get_info(device)
    size = f"{_gigabytes(nbytes)} of {_gigabytes(total)}, {_gigabytes(free)} free"
    if on_device is True:
        if nbytes > free:
            raise ConfigError(f"data.on_device=true: the training split ({_gigabytes(nbytes)}) does not fit in "
                              f"{device}'s free memory ({_gigabytes(free)} of {_gigabytes(total)}); "
                              "set data.on_device=auto or false")
        return True, size
    if nbytes <= min(free, RESIDENT_SHARE * total):
        return True, size
    return False, f"data.on_device=auto: {size}; resident takes at most {RESIDENT_SHARE:.0%} and what is free"


def training_split(
    images: np.ndarray, on_device: bool | Literal["auto"], device: torch.device
) -> MappedSplit | ResidentSplit:
    """The source of training batches data.on_device asks for (see residence), with `description`
    saying which and why."""
    device = _indexed(device)
    resident, why = residence(images.nbytes, on_device, device)
    return ResidentSplit(images, device, why) if resident else MappedSplit(images, device, why)
