"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"): the `lpips` package's network with VGG16, the perceptual term of model.mode=ldm's loss
(as Stable Diffusion's autoencoders, Rombach et al. 2022) and a metric.

Nothing is downloaded (as for Inception, evaluation/feature_networks.py): the linear heads ship with
the package (lpips/weights/v0.1/vgg.pth); the VGG16 trunk is torchvision's ImageNet file, found in
torch's hub cache or at a given path, and read through the same safe, strictly matched loading.
The network is built on the meta device and every tensor then comes from those files: the package's
own constructor builds torchvision's whole VGG16, whose 124M-parameter classifier (unused by LPIPS)
took 1.9 s to initialise on our 2-core CPU, against 0.04 s this way.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from image_autoencoding.config import LPIPS_MIN_SIZE
from image_autoencoding.errors import UserError
from image_autoencoding.evaluation.feature_networks import TORCH_HUB_CHECKPOINTS, MissingWeights, load_weights

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
HEADS_FILE = "weights/v0.1/vgg.pth"  # inside the lpips package


def _lpips_package():
    try:
        import lpips
    except ImportError:
        raise UserError("LPIPS needs the lpips package: pip install 'image-autoencoding[lpips]'") from None
    return lpips


def vgg16_weights(explicit: str | Path | None = None, how: str = "--lpips-vgg-weights") -> Path:
    """The VGG16 weights file: `explicit`, else torch's hub cache (where torchvision's own download
    puts it). `how`: the option or key that gives a path, for the message when it is missing."""
    where = Path(explicit) if explicit else Path(torch.hub.get_dir()) / TORCH_HUB_CHECKPOINTS / VGG16_FILE
    if not where.is_file():
        raise MissingWeights(f"LPIPS needs VGG16 weights: put {VGG16_FILE} (from {VGG16_URL}) at {where}, "
                             f"or give its path with {how}")
    return where


class VGG16(nn.Module):
    """The LPIPS trunk's layers under torchvision's names (features.<index>), to load its file."""

    def __init__(self, slices: nn.Module):
        super().__init__()
        self.features = nn.Sequential(OrderedDict(
            (name, layer) for part in slices.children() for name, layer in part.named_children()))


class LpipsHeads(nn.Module):
    """The five linear heads under the names of the package's weights file (lin<k>.model.1.weight)."""

    def __init__(self, heads: nn.ModuleList):
        super().__init__()
        for index, head in enumerate(heads):
            self.add_module(f"lin{index}", head)


class PerceptualDistance(nn.Module):
    """(x, y), images in [-1, 1] of at least LPIPS_MIN_SIZE px -> LPIPS per image, shape (N,), in
    fp32 (its feature normalisation divides by a norm plus 1e-10, which fp16 rounds to 0). Frozen:
    no parameter trains and it stays in eval mode whatever its parent's mode."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {LPIPS_MIN_SIZE} px, got {list(x.shape[-2:])}")
        with torch.autocast(x.device.type, enabled=False):
            return self.network(x.float(), y.float()).flatten()


def perceptual_distance(vgg_weights: Path) -> PerceptualDistance:
    """LPIPS with VGG16 (version 0.1, the package's default) from `vgg_weights`, on the CPU."""
    lpips = _lpips_package()
    with warnings.catch_warnings():
        # torchvision warns that the package passes its deprecated `pretrained` argument.
        warnings.simplefilter("ignore", UserWarning)
        with torch.device("meta"):
            network = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
    network.to_empty(device="cpu")
    network.scaling_layer = lpips.ScalingLayer()  # constant buffers, not in either file
    load_weights(VGG16(network.net), vgg_weights, unused=("classifier.",))
    load_weights(LpipsHeads(network.lins), Path(str(resources.files("lpips") / HEADS_FILE)))
    return PerceptualDistance(network)


def lpips_unavailable(image_size: int, explicit: str | Path | None = None) -> str | None:
    """Why LPIPS cannot score images of `image_size` here (too small, no lpips package, no VGG16
    weights: which file goes where), or None when it can."""
    if image_size < LPIPS_MIN_SIZE:
        return f"images of {image_size} px are smaller than the {LPIPS_MIN_SIZE} px LPIPS's VGG16 needs"
    try:
        _lpips_package()
        vgg16_weights(explicit, "train.lpips_vgg_weights when training")
    except UserError as exc:
        return str(exc)
    return None


def lpips_metric(image_size: int, explicit: str | Path | None = None) -> PerceptualDistance | None:
    """LPIPS for scoring a split where it can run (lpips_unavailable says why not), else None."""
    return None if lpips_unavailable(image_size, explicit) else perceptual_distance(vgg16_weights(explicit))
