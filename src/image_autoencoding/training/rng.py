"""Seeding, and every random number generator's state as checkpoint data: tensors and plain values,
never pickled numpy objects, so checkpoints load with torch.load(weights_only=True)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (never pickled numpy objects), for weights_only loading."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        # The GPU this process trains on: under torchrun rank r draws on cuda:r, and a resume with
        # another number of GPUs per node puts this state on each rank's own device.
        state["cuda_current"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "cuda_current" in state:
            torch.cuda.set_rng_state(state["cuda_current"])


def rng_state_problem(state: Any) -> str | None:
    """What in a saved `state` is not what `rng_state` writes, named by its key (rng.numpy.pos), or
    None. Checked when a checkpoint is read, so an edited or foreign one is refused in one line
    instead of failing inside torch, numpy or random when the run resumes."""
    if not isinstance(state, dict):
        return "rng is not a dict of generator states"
    if not _bytes_of_size(state.get("torch"), torch.get_rng_state().numel()):
        return "rng.torch is not torch's generator state (a uint8 tensor)"
    numpy_state = state.get("numpy")
    if not isinstance(numpy_state, dict):
        return "rng.numpy is not a dict"
    keys = numpy_state.get("keys")
    if not (isinstance(keys, torch.Tensor) and keys.dtype == torch.int64 and keys.shape == (624,)):
        return "rng.numpy.keys is not 624 int64 values"
    for name, low, high in (("pos", 0, 624), ("has_gauss", 0, 1)):
        if not _whole_in(numpy_state.get(name), low, high):
            return f"rng.numpy.{name} is not a whole number from {low} to {high}"
    if not isinstance(numpy_state.get("cached"), int | float) or isinstance(numpy_state.get("cached"), bool):
        return "rng.numpy.cached is not a number"
    python_state = state.get("python")
    if not isinstance(python_state, dict):
        return "rng.python is not a dict"
    internal = python_state.get("internal")
    if not (isinstance(internal, list) and len(internal) == 625 and all(_whole_in(v, 0, 2**32 - 1) for v in internal)):
        return "rng.python.internal is not 625 whole numbers"
    if python_state.get("version") != random.getstate()[0]:
        return f"rng.python.version is not {random.getstate()[0]}"
    if not (python_state.get("gauss") is None or isinstance(python_state.get("gauss"), float)):
        return "rng.python.gauss is not a number or None"
    cuda = state.get("cuda", [])
    if not (isinstance(cuda, list) and all(_bytes_of_size(s) for s in cuda)):
        return "rng.cuda is not a list of CUDA generator states (uint8 tensors)"
    if "cuda_current" in state and not _bytes_of_size(state["cuda_current"]):
        return "rng.cuda_current is not a CUDA generator state (a uint8 tensor)"
    return None


def _bytes_of_size(value: Any, size: int | None = None) -> bool:
    """A generator state: a 1-D uint8 tensor (of `size` bytes when given)."""
    return (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
            and (size is None or value.numel() == size))


def _whole_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
