"""The VAE-GAN discriminator of Larsen et al. 2016 ("Autoencoding beyond pixels using a learned
similarity metric"), with the widths of the original project's models config (32, 128, 256, 256,
512): a stride-1 5x5 conv with 32 channels, then stride-2 5x5 convs (128, 256, 256) with BatchNorm,
a fully connected layer (512) and one logit.

The output of the last conv block is the layer on which the VAE-GAN measures reconstruction error
(Larsen et al. section 2.2: "the l-th layer of the discriminator"). Strides adapt to the image size:
a conv halves the map only while it stays at least 4 pixels wide, so 64 px ends at 8x8 as in the
paper and a 16 px test image still fits.
"""

from __future__ import annotations

from torch import Tensor, nn

from image_autoencoding.config import ModelConfig

SMALLEST_MAP = 4


def _strides(image_size: int, conv_layers: int) -> list[int]:
    strides, side = [1], image_size  # the first conv keeps the resolution (Larsen et al., table 1)
    for _ in range(conv_layers - 1):
        stride = 2 if side // 2 >= SMALLEST_MAP else 1
        strides.append(stride)
        side //= stride
    return strides


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        *conv_widths, fc_width = cfg.discriminator_channels
        strides = _strides(image_size, len(conv_widths))
        layers: list[nn.Module] = []
        c_in = 3
        for index, (width, stride) in enumerate(zip(conv_widths, strides, strict=True)):
            layers.append(nn.Conv2d(c_in, width, 5, stride, 2, bias=index == 0))
            if index > 0:  # no BatchNorm on the input layer (Radford et al. 2016, as Larsen et al.)
                layers.append(nn.BatchNorm2d(width, momentum=cfg.bn_momentum))
            layers.append(nn.ReLU())
            c_in = width
        self.features = nn.Sequential(*layers)
        side = image_size
        for stride in strides:
            side //= stride
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * side * side, fc_width, bias=False),
            nn.BatchNorm1d(fc_width, momentum=cfg.bn_momentum),
            nn.ReLU(),
            nn.Linear(fc_width, 1),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logit of 'real', shape (N,); the feature layer used for the reconstruction error)."""
        features = self.features(x)
        return self.head(features).squeeze(1), features


def build_discriminator(cfg: ModelConfig, image_size: int) -> Discriminator:
    return Discriminator(cfg, image_size)


def feature_error(real_features: Tensor, fake_features: Tensor) -> Tensor:
    """Per-image 0.5 * sum of squared differences on the discriminator layer, in fp32: the Gaussian
    log-likelihood of Larsen et al. eq. 6 up to a constant, summed like the pixel error."""
    return 0.5 * (real_features.float() - fake_features.float()).pow(2).flatten(1).sum(dim=1)

