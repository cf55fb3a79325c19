"""Feature networks for sample-quality metrics (evaluation/sample_metrics.py): Inception-v3 for FID /
KID, or any network with a state-dict file (a domain classifier; a tiny one in tests), through the
same loading and feature code.

Inception-v3 here is torchvision's ImageNet model (IMAGENET1K_V1), its 2048 pooled features, inputs
resized to 299 px, exactly as torchvision's own `inception_v3(weights=IMAGENET1K_V1)` computes them:
these weights were ported from TensorFlow and expect pixels scaled to [-1, 1], so torchvision builds
the network with `transform_input=True`, which maps the ImageNet-normalised inputs to that scale
(without it the network sees inputs on a scale it was not trained for). FID papers use the
TensorFlow Inception graph of pytorch-fid / torch-fidelity, whose figures differ somewhat from
these: compare FIDs computed here with each other, not with published numbers.

No weights are downloaded: a machine without internet (ours) cannot, and a user's machine usually has
them in torch's cache already. `inception_weights` finds the file or says in one line where to put it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from image_autoencoding.errors import UserError, quoted
from image_autoencoding.safe_load import load_plain

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
TORCH_HUB_CHECKPOINTS = "checkpoints"  # torch.hub's folder of downloaded weights, under torch.hub.get_dir()
INCEPTION_URL = f"https://download.pytorch.org/models/{INCEPTION_FILE}"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class MissingWeights(UserError):
    """A feature network's weights file is not where it was looked for."""


@dataclass
class FeatureNetwork:
    """images in [0, 1], (N, 3, H, W) -> features (N, D): resized to `input_size`, normalised."""

    module: nn.Module
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 64) -> Tensor:
        self.module.eval()
        device = next(self.module.parameters()).device
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        out = []
        for batch in images.split(batch_size):
            x = F.interpolate(batch.to(device).float(), size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
            out.append(self.module((x - mean) / std).flatten(1).double().cpu())
        return torch.cat(out)


def load_weights(module: nn.Module, path: Path, unused: tuple[str, ...] = ()) -> nn.Module:
    """A state dict read with weights_only=True (plain tensors, no code), strictly matched. `unused`:
    prefixes of the file's tensors the module does not need (a classifier a feature network drops)."""
    state = load_plain(path, "weights file")
    name = type(module).__name__
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise UserError(f"{quoted(path)} is not usable weights for {name}: it holds a {type(state).__name__}, "
                        "expected a state dict (parameter name -> tensor)")
    state = {key: value for key, value in state.items() if not key.startswith(unused)} if unused else state
    expected = module.state_dict()
    missing, unknown = [key for key in expected if key not in state], [key for key in state if key not in expected]
    if missing or unknown:
        found = []
        if missing:
            found.append(f"{len(missing)} of the {len(expected)} tensors it needs are missing (first {missing[0]!r})")
        if unknown:
            found.append(f"the file holds {len(unknown)} it has no place for (first {unknown[0]!r})")
        raise UserError(f"{quoted(path)} is not usable weights for {name}: {'; '.join(found)}")
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        # torch's first line is a heading ("Error(s) in loading state_dict for ..."); the reason follows.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise UserError(f"{quoted(path)} is not usable weights for {name}: {lines[min(1, len(lines) - 1)][:200]}"
                        ) from None
    return module


def inception_weights(explicit: str | Path | None = None) -> Path:
    """The Inception-v3 weights file: `explicit`, else torch's hub cache (where torchvision's own
    download puts it, $TORCH_HOME/hub/checkpoints)."""
    where = Path(explicit) if explicit else Path(torch.hub.get_dir()) / TORCH_HUB_CHECKPOINTS / INCEPTION_FILE
    if not where.is_file():
        raise MissingWeights(f"FID / KID need Inception-v3 weights: put {INCEPTION_FILE} (from {INCEPTION_URL}) "
                             f"at {where}, or give its path with --inception-weights")
    return where


def inception_network(weights: Path) -> FeatureNetwork:
    """Inception-v3 with `weights`, its final classifier removed (2048 pooled features)."""
    from torchvision.models import inception_v3

    # transform_input=True: what torchvision's constructor sets for these weights (see the module's docstring).
    module = load_weights(inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False),
                          weights)
    module.fc = nn.Identity()
    return FeatureNetwork(module.eval(), input_size=299)
