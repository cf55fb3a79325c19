"""A residual encoder and decoder (model.arch=resnet), the family of the autoencoders of Esser et al.
2021 ("Taming Transformers") and Rombach et al. 2022 (Stable Diffusion's VAE): levels of residual
blocks with GroupNorm and SiLU, downsampling by strided convolution, upsampling by nearest-neighbour
resize then a 3x3 convolution. Transposed convolutions (the original's decoder) overlap unevenly
and leave a checkerboard in the images (Odena et al. 2016, "Deconvolution and Checkerboard
Artifacts"); a resize followed by a convolution cannot. GroupNorm instead of BatchNorm: a step's
output does not depend on the other images in the batch, in training or in evaluation.

The latent is either a global vector of model.latent_dim floats (as the original's, from a linear
layer over the last level's feature map) or spatial: model.latent_channels channels at the last
level's side, image_size / 2^(levels - 1). The rest of the package sees every latent as one flat
vector per image; a spatial latent is that vector laid out as (channels, side, side).

Shapes for resnet_channels [32, 64, 128], 32 px: 32x32x32 -> 16x16x64 -> 8x8x128, then either
FC -> mean, logvar (latent_dim each) or conv -> 8x8 x latent_channels (x2).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from image_autoencoding.config import ResnetModelConfig
from image_autoencoding.models.vae import DiagonalGaussian


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in the papers' models, fewer when the width is not a multiple of 32.
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResidualBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))), with a 1x1 convolution on the skip path when the
    width changes (He et al. 2016's pre-activation block, as the papers' autoencoders use it)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            _group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            _group_norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to twice the side, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, blocks: int) -> list[nn.Module]:
    return [ResidualBlock(c_in if i == 0 else c_out, c_out) for i in range(blocks)]


class ResnetEncoder(nn.Module):
    """Image -> the posterior q(z|x) over (N, latent floats)."""

    def __init__(self, cfg: ResnetModelConfig, image_size: int):
        super().__init__()
        widths = cfg.resnet_channels
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for level, width in enumerate(widths):
            layers += _level(widths[max(level - 1, 0)], width, cfg.resnet_blocks)
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [ResidualBlock(widths[-1], widths[-1]), _group_norm(widths[-1]), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        side = cfg.feature_side(image_size)
        if cfg.latent_channels is None:
            self.to_moments = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * side * side, 2 * cfg.latent_dim))
        else:
            self.to_moments = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)
        self.cfg = cfg

    def forward(self, x: Tensor) -> DiagonalGaussian:
        moments = self.to_moments(self.features(x))
        # Global: the first latent_dim outputs are the mean. Spatial: channels [0, C) are the mean,
        # [C, 2C) the log-variance; each flattened per image.
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean.flatten(1), logvar.flatten(1), self.cfg.logvar_min, self.cfg.logvar_max)


class ResnetDecoder(nn.Module):
    """(N, latent floats) -> image in [-1, 1]."""

    def __init__(self, cfg: ResnetModelConfig, image_size: int):
        super().__init__()
        widths = cfg.resnet_channels
        self.side = cfg.feature_side(image_size)
        self.latent_channels = cfg.latent_channels
        if cfg.latent_channels is None:
            self.from_latent = nn.Linear(cfg.latent_dim, widths[-1] * self.side * self.side)
            self.first_channels = widths[-1]
        else:
            self.from_latent = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
            self.first_channels = cfg.latent_channels
        layers: list[nn.Module] = [ResidualBlock(widths[-1], widths[-1])]
        for level in reversed(range(len(widths))):
            layers += _level(widths[min(level + 1, len(widths) - 1)], widths[level], cfg.resnet_blocks)
            if level > 0:
                layers.append(Upsample(widths[level]))
        # No GroupNorm before the output convolution, unlike the papers' decoders: it takes away each
        # image's mean and scale per group right before the pixels, so colour and brightness can only
        # reach them through the SiLU: with it, reconstructions had the right edges and the wrong
        # colours, and a lower validation PSNR and SSIM (the figures: docs/design.md, "The residual
        # architecture"). The encoder keeps its final norm: without it, PSNR was lower too (17.0 dB
        # against 17.3 in that measurement, which docs/design.md does not list yet).
        layers += [nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1), nn.Tanh()]
        self.features = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        if self.latent_channels is None:
            h = self.from_latent(z).view(-1, self.first_channels, self.side, self.side)
        else:
            h = self.from_latent(z.view(-1, self.latent_channels, self.side, self.side))
        return self.features(h)

    @property
    def last_layer(self) -> Tensor:
        """The weight of the layer that makes the pixels (the adaptive GAN weight's reference)."""
        return self.features[-2].weight
