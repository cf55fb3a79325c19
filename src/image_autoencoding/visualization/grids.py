"""Image grids saved as PNG: reconstructions (each input directly above its output) and samples."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import save_image

MIN_TILE = 64  # small images (digits at 32 px) are enlarged, nearest-neighbour, so they can be seen


def _enlarge(images: Tensor, min_tile: int = MIN_TILE) -> Tensor:
    side = images.shape[-1]
    if side >= min_tile:
        return images
    return F.interpolate(images, scale_factor=-(-min_tile // side), mode="nearest")


def save_reconstruction_grid(
    inputs: Tensor, outputs: Tensor, path: str | Path, per_row: int = 8, min_tile: int = MIN_TILE
) -> None:
    """inputs, outputs: (N, 3, H, W) in [0, 1]. Rows alternate: inputs, then their reconstructions.
    Images smaller than `min_tile` pixels are enlarged by a whole factor to at least that."""
    rows = []
    for start in range(0, len(inputs), per_row):
        rows += [inputs[start : start + per_row], outputs[start : start + per_row]]
    grid = torch.cat(rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(_enlarge(grid.float().cpu(), min_tile), path, nrow=min(per_row, len(inputs)), padding=2,
               pad_value=1.0)


def save_sample_grid(samples: Tensor, path: str | Path) -> None:
    """samples: (N, 3, H, W) in [0, 1], laid out in a square-ish grid."""
    per_row = max(1, int(round(len(samples) ** 0.5)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(_enlarge(samples.float().cpu()), path, nrow=per_row, padding=2, pad_value=1.0)
