"""The PatchGAN discriminator of model.mode=ldm: pix2pix's (Isola et al. 2017) as Taming
Transformers' NLayerDiscriminator (Esser et al. 2021) and Stable Diffusion's autoencoders use it.
4x4 convs, LeakyReLU 0.2, BatchNorm after every conv but the first and the last; the widths double
per layer up to 8x model.patch_discriminator_width; one logit per patch, not per image.

Taming's layers all halve the map (a 256 px image gives 30 x 30 patches, 64 px gives 6 x 6). Here a
layer halves only while the map stays at least 4 px wide; past that a 3x3 conv keeps its size, so
that any image size and layer count leaves patches (16 px: 2 x 2), where Taming's shape would run
out of pixels.
"""

from __future__ import annotations

from torch import Tensor, nn

from image_autoencoding.config import ModelConfig

SMALLEST_MAP = 4
MAX_WIDTH_FACTOR = 8


def _init_weights(module: nn.Module) -> None:
    """Taming's weights_init (DCGAN's, Radford et al. 2016): conv weights N(0, 0.02), BatchNorm N(1, 0.02)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        width, layers_count = cfg.patch_discriminator_width, cfg.patch_discriminator_layers
        widths = [width * min(2 ** index, MAX_WIDTH_FACTOR) for index in range(layers_count + 1)]
        layers: list[nn.Module] = []
        side, c_in = image_size, 3
        for index, c_out in enumerate(widths[:-1]):
            halve = side // 2 >= SMALLEST_MAP
            kernel, stride = (4, 2) if halve else (3, 1)
            side = side // 2 if halve else side
            # No bias before BatchNorm, whose shift is one; the first layer has no BatchNorm.
            layers.append(nn.Conv2d(c_in, c_out, kernel, stride, 1, bias=index == 0))
            if index > 0:
                layers.append(nn.BatchNorm2d(c_out, momentum=cfg.bn_momentum))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c_out
        layers += [nn.Conv2d(c_in, widths[-1], 4, 1, 1, bias=False),
                   nn.BatchNorm2d(widths[-1], momentum=cfg.bn_momentum), nn.LeakyReLU(0.2),
                   nn.Conv2d(widths[-1], 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W) -> one logit of 'real' per patch, (N, 1, h, w)."""
        return self.main(x)
