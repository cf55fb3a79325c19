"""Diversity of generated images: a number that falls to zero when a generator collapses.

A VAE-GAN whose decoder maps every latent vector to one picture (GAN mode collapse) can still score
well on sharpness, and reconstruction metrics never see its prior samples at all. The mean distance
between two images of a set, relative to the same figure for real images, catches it: about 1.0
when samples vary as much as the data, near 0 when they are all the same picture.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mean_pairwise_distance(images: Tensor) -> float:
    """Mean Euclidean distance between two different images of `images` (N, ...), N >= 2."""
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 images, got {images.shape[0]}")
    flat = images.detach().to("cpu", torch.float64).flatten(1)
    distances = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(distances.sum() / (n * (n - 1)))  # the zero diagonal is left out of the mean


def relative_diversity(samples: Tensor, reference: Tensor) -> float:
    """Mean pairwise distance of `samples` over that of `reference` (real images of the same kind)."""
    return mean_pairwise_distance(samples) / mean_pairwise_distance(reference)
