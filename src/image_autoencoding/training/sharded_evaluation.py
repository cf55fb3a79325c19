"""Validation under torchrun: each rank scores a contiguous share of the split, then every rank gets
all the per-image values in split order. Means, spreads and any other summary are then those of one
process scoring every image (per-image values do not depend on which batch an image was in: the
model is in eval mode, so BatchNorm uses its running statistics)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import Tensor

from image_autoencoding.data.batches import Normalizer
from image_autoencoding.evaluation.evaluate import evaluate_split
from image_autoencoding.models.vae import VAE
from image_autoencoding.training.distributed import Distributed


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's contiguous part of n items; the first n % world_size ranks take one more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def evaluate_split_across_ranks(
    model: VAE,
    images: np.ndarray,
    normalize: Normalizer,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager] | None,
    limit: int | None,
    dist: Distributed,
) -> dict[str, Tensor]:
    """Per-image values ("ssim", "pcc", "mse", "psnr", "recon", "kl" -> (N,)) of the first `limit`
    images, scored a share per rank and gathered on every rank."""
    images = images[:limit] if limit is not None else images
    start, stop = shard_range(len(images), dist.rank, dist.world_size)
    mine: dict[str, Tensor] = {}
    if stop > start:
        evaluation = evaluate_split(model, images[start:stop], normalize, device, batch_size, autocast)
        mine = {name: values.cpu() for name, values in evaluation.per_image.items()}  # pickled to gather
    shares = [share for share in dist.gather(mine) if share]
    return {name: torch.cat([share[name] for share in shares]) for name in shares[0]}
