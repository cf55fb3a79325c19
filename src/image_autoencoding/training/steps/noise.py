"""The reparametrisation noise of one training step, drawn for the whole global batch."""

from __future__ import annotations

import torch
from torch import Tensor


def share_of_global_noise(shape: tuple[int, ...], device: torch.device, rank: int, world_size: int) -> Tensor:
    """Standard normal fp32 noise of `shape` (this rank's n rows): drawn for the whole global batch,
    n x world_size rows, and this rank's rows taken (every W-th from the r-th, where
    `batches.training_batches` puts this rank's images), so that W processes draw exactly the noise
    one process with the global batch draws, for the same images, and every rank's generator stays
    in step (rank 0's checkpoint then holds the RNG state of every rank)."""
    n, *rest = shape
    noise = torch.randn((n * world_size, *rest), device=device)
    return noise[rank::world_size]
