"""Where images come from: each source returns preprocessed uint8 pixels and integer labels for a
train and a validation split, with the class names for legends."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from image_autoencoding.config import DataConfig
from image_autoencoding.data.preprocess import grey_array_to_rgb


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, -1 where unlabelled


@dataclass
class ImageData:
    train: Split
    valid: Split
    class_names: list[str]


def seeded_split(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a reproducible train / validation split of n items."""
    order = np.random.default_rng(seed).permutation(n)
    n_valid = max(1, round(n * valid_fraction))
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def load_digits(cfg: DataConfig) -> ImageData:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), bundled: no download."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    grey = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([grey_array_to_rgb(g, cfg.image_crop, cfg.image_size) for g in grey])
    labels = bunch.target.astype(np.int64)
    train, valid = seeded_split(len(images), cfg.valid_fraction, cfg.split_seed)
    return ImageData(
        train=Split(images[train], labels[train]),
        valid=Split(images[valid], labels[valid]),
        class_names=[str(name) for name in bunch.target_names],
    )


def load_image_data(cfg: DataConfig) -> ImageData:
    loaders = {"digits": load_digits}
    return loaders[cfg.dataset](cfg)
