"""Single images saved as PNG files (one file per image, full resolution)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor
from torchvision.utils import save_image


def save_images(images: Tensor, paths: list[Path]) -> None:
    """images: (N, 3, H, W) in [0, 1]; one PNG per image."""
    for image, path in zip(images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(image.float().cpu(), path)
