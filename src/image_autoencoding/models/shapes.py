"""The tensor shapes of the model a config describes, measured without building it, and how the
tensors of a weights file differ from them. Loaders check a file against its config with these
before building the model: a config that does not fit its weights is refused in one line, even
one describing a huge model (model.latent_dim 1e9 would allocate 1 TB)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from image_autoencoding.config import ModelConfig
from image_autoencoding.models.factory import build_model

Shapes = dict[str, tuple[int, ...]]


def expected_shapes(cfg: ModelConfig, image_size: int) -> Shapes:
    """name -> shape of every tensor in the model's state dict. Built on the meta device, which
    allocates no memory for tensors."""
    with torch.device("meta"):
        model = build_model(cfg, image_size, init_weights=False)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def parameter_shapes(cfg: ModelConfig, image_size: int) -> dict[str, list[tuple[int, ...]]]:
    """Each network's ("encoder", "decoder") parameter shapes in the order its optimizer numbers
    them (training/optimizers.py builds one optimizer per network; model.mode=ldm's decoder
    optimizer also steps a scalar)."""
    with torch.device("meta"):
        model = build_model(cfg, image_size, init_weights=False)
    shapes = {name: [tuple(p.shape) for p in getattr(model, name).parameters()] for name in ("encoder", "decoder")}
    if cfg.mode == "ldm":  # the decoder's optimizer also steps the loss's log-variance (training/steps/ldm.py)
        shapes["decoder"].append(())
    return shapes


def optimizer_mismatch(shapes: list[tuple[int, ...]], state: Mapping) -> str | None:
    """How an optimizer state dict (checked for its types already: runs/checkpoint.py) does not fit
    parameters of `shapes`, in words; None when it fits. torch pairs saved and current parameters by
    position and checks only the counts per group; a moment buffer of another shape would fail
    inside the first step, mid-run."""
    numbered = [index for group in state["param_groups"] for index in group["params"]]
    if len(numbered) != len(shapes):
        return f"it steps {len(numbered)} parameters, the network has {len(shapes)}"
    position = {index: k for k, index in enumerate(numbered)}
    for index, entry in state["state"].items():
        if index not in position:
            return f"it holds state for parameter {index}, which none of its groups steps"
        expected = shapes[position[index]]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and tuple(value.shape) != expected:
                return f"its {key} of parameter {index} is {list(value.shape)}, the parameter's is {list(expected)}"
    return None


def tensor_shapes(tensors: Mapping[str, torch.Tensor]) -> Shapes:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def shape_mismatch(expected: Shapes, found: Shapes) -> str | None:
    """The first difference between the tensors a model needs and those a file holds, in words
    ("it has no tensor X", "its X is [8, 32], the model's is [1000000000, 32]"); None when they agree."""
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"it has no tensor {missing[0]}{more}"
    unexpected = [name for name in found if name not in expected]
    if unexpected:
        return f"it has a tensor {unexpected[0]} the model does not"
    for name, shape in expected.items():
        if found[name] != shape:
            return f"its {name} is {list(found[name])}, the model's is {list(shape)}"
    return None
