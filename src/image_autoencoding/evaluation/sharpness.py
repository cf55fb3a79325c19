"""Sharpness: the mean variance of the Laplacian over images (Pech-Pacheco et al. 2000).

PCC and SSIM reward blur (a blurred reconstruction that gets the low frequencies right scores
well), so the quality benchmark also reports how much fine detail reconstructions and samples
have, relative to real images: 1.0 is as sharp as the data, a blurry VAE sits well below it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)


def laplacian_variance(images: Tensor) -> Tensor:
    """Per image (N,), in float64: the variance of the 3x3 Laplacian of the grey image, over the
    positions where the kernel lies inside the image. `images`: (N, C, H, W) in [0, 1]."""
    if images.dim() != 4:
        raise ValueError(f"expected (N, C, H, W), got {tuple(images.shape)}")
    grey = images.detach().to("cpu", torch.float64).mean(dim=1, keepdim=True)
    response = F.conv2d(grey, _LAPLACIAN.view(1, 1, 3, 3))
    return response.flatten(1).var(dim=1, unbiased=False)


def relative_sharpness(images: Tensor, reference: Tensor) -> float:
    """Mean Laplacian variance of `images` over that of `reference` (real images of the same kind)."""
    return float(laplacian_variance(images).mean() / laplacian_variance(reference).mean())
