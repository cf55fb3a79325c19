"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint holds only tensors and plain Python values (state dicts, numbers, strings, the config
as a dict), so `torch.load(weights_only=True)` can read it and a crafted file cannot run code.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from image_autoencoding.atomic_files import atomic_write, leftover_temporaries
from image_autoencoding.disk_space import FULL_DISK, free_space, human_size
from image_autoencoding.errors import UserError
from image_autoencoding.runs.run_paths import LAST_CHECKPOINT, epoch_checkpoints
from image_autoencoding.safe_load import load_plain
from image_autoencoding.training.rng import rng_state_problem

FORMAT_VERSION = 1
# What every checkpoint we write holds; a file without these is not ours, whatever else it has.
REQUIRED_KEYS = (
    "model", "encoder_optimizer", "decoder_optimizer", "epoch", "step", "rng", "config",
)


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, no permission); the previous one is intact."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically (see atomic_files), so a crash mid-save leaves the previous checkpoint intact
    and no half-written file under `path`.

    Refuses (CheckpointError) a state holding NaN or Inf: a checkpoint must always be a safe place
    to resume from. A failed write (full disk) raises CheckpointWriteError and leaves no file."""
    path = Path(path)
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"refusing to write checkpoint '{path}': {bad} holds NaN or Inf")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda handle: torch.save({"format_version": FORMAT_VERSION, **state}, handle))
    except OSError as exc:
        raise _write_error(path, exc, tensor_bytes(state), "the size of its tensors") from None
    except RuntimeError as exc:
        if not _failed_writing(exc):
            raise
        cause = exc.__context__ if isinstance(exc.__context__, OSError) else None
        raise _write_error(path, cause, tensor_bytes(state), "the size of its tensors") from None


def _failed_writing(exc: RuntimeError) -> bool:
    """torch's zip writer reports a failed write (a full disk) as its own RuntimeError, raised while
    the file handle's OSError is handled or naming its stream writer; any other RuntimeError is a
    bug and must show as one."""
    return isinstance(exc.__context__, OSError) or "PytorchStreamWriter" in str(exc)


def _write_error(path: Path, cause: OSError | None, needed: int, measured: str) -> CheckpointWriteError:
    """One line: what failed and, when the disk may be full, how much room the file needs."""
    reason = (cause.strerror or str(cause)) if cause is not None else "the write failed"
    room = ""
    if cause is None or cause.errno in FULL_DISK:
        room = f" (it needs about {human_size(needed)}, {measured}; {free_space(path.parent)} free there)"
    return CheckpointWriteError(f"cannot write checkpoint '{path}': {reason}{room}; the previous checkpoint is kept")


def tensor_bytes(tree: Any) -> int:
    """Bytes of all tensors in a nested state: a lower bound on its checkpoint's size, known without
    serializing it (which would hold a second copy in memory)."""
    if isinstance(tree, torch.Tensor):
        return tree.nbytes
    if isinstance(tree, dict):
        return sum(tensor_bytes(value) for value in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tensor_bytes(value) for value in tree)
    return 0


def first_non_finite(tree: Any, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor in a nested state holding NaN or Inf, else None."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return prefix or "tensor"
        return None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    state = load_plain(path, "checkpoint", CheckpointError, map_location)
    if not isinstance(state, dict) or "format_version" not in state or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint '{path}' is not an image-autoencoding checkpoint")
    if _is_whole(state["format_version"], 1) and state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format {state['format_version']}; this version reads up to {FORMAT_VERSION}"
        )
    problem = _contents_problem(state)
    if problem:
        raise CheckpointError(f"checkpoint '{path}' cannot be used: {problem}")
    return state


def _contents_problem(state: dict[str, Any]) -> str | None:
    """The first value of a checkpoint that is not of the kind the trainer writes (its key, what it
    is, what was expected), or None. Checked here, where every command reads checkpoints, so that a
    file with every key but wrong values (model=5, epoch="three") is refused in one line instead of
    failing inside torch or the trainer, or a resume setting checkpoints aside for a step of -1."""
    if not _is_whole(state["format_version"], 1):
        return _wrong("format_version", state["format_version"], "a whole number >= 1")
    for key in ("model", "discriminator"):
        if key in state and (problem := _state_dict_problem(key, state[key])):
            return problem
    for key in ("encoder_optimizer", "decoder_optimizer", "discriminator_optimizer"):
        if key in state and (problem := _optimizer_problem(key, state[key])):
            return problem
    for key, least in (("epoch", 0), ("step", 0), ("bad_steps_in_a_row", 0), ("world_size", 1)):
        if key in state and not _is_whole(state[key], least):
            return _wrong(key, state[key], f"a whole number >= {least}")
    for key in ("config", "callbacks", "scaler"):
        if key in state and not isinstance(state[key], dict) and not (key == "scaler" and state[key] is None):
            return _wrong(key, state[key], "a dict")
    if "best_ssim" in state and not _is_number(state["best_ssim"]):
        return _wrong("best_ssim", state["best_ssim"], "a number")
    if state.get("epoch_progress") is not None and (problem := _progress_problem(state["epoch_progress"])):
        return problem
    return rng_state_problem(state["rng"])


def _state_dict_problem(key: str, value: Any) -> str | None:
    if not isinstance(value, dict):
        return _wrong(key, value, "a state dict (names -> tensors)")
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            return _wrong(f"{key}[{name!r}]", tensor, "a tensor")
    return None


def _optimizer_problem(key: str, value: Any) -> str | None:
    if not (isinstance(value, dict) and isinstance(value.get("state"), dict)
            and isinstance(value.get("param_groups"), list)):
        return _wrong(key, value, "an optimizer state dict (state, param_groups)")
    for group in value["param_groups"]:
        if not (isinstance(group, dict) and isinstance(group.get("params"), list)
                and all(_is_whole(index, 0) for index in group["params"])):
            return _wrong(f"{key}.param_groups[]", group, "a dict whose params are parameter numbers")
    for index, entry in value["state"].items():
        if not isinstance(entry, dict):
            return _wrong(f"{key}.state[{index!r}]", entry, "a dict")
    return None


def _progress_problem(progress: Any) -> str | None:
    """training/epoch_progress.EpochProgress.state(); empty before the epoch's first step."""
    if not isinstance(progress, dict):
        return _wrong("epoch_progress", progress, "a dict")
    if not progress:
        return None
    for key in ("steps", "images", "skipped"):
        if not _is_whole(progress.get(key), 0):
            return _wrong(f"epoch_progress.{key}", progress.get(key), "a whole number >= 0")
    sums = progress.get("sums")
    if not (isinstance(sums, torch.Tensor) and sums.is_floating_point() and sums.shape == (2,)):
        return _wrong("epoch_progress.sums", sums, "2 floating-point numbers in a tensor")
    if not _is_number(progress.get("seconds")):
        return _wrong("epoch_progress.seconds", progress.get("seconds"), "a number")
    return None


def _is_whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _wrong(key: str, value: Any, expected: str) -> str:
    """'key is <value>, expected ...': numbers and short strings shown, anything else by its type."""
    if value is None or isinstance(value, bool | int | float | str):
        shown = repr(value if not isinstance(value, str) else value[:40])
    else:
        shown = f"a {type(value).__name__}"
    return f"{key} is {shown}, expected {expected}"


def publish_as(path: Path, alias: Path) -> None:
    """Copy `path` to `alias` atomically. A copy, not a second name: damage written through one name
    must not reach the others, or resume could not fall back from last.pt to epoch_N.pt."""
    try:
        with path.open("rb") as source:
            atomic_write(alias, lambda handle: shutil.copyfileobj(source, handle))
    except OSError as exc:
        raise _write_error(alias, exc, path.stat().st_size, "the size of the file copied") from None


def remove_leftover_temporaries(folder: Path) -> list[Path]:
    """Delete the partial checkpoints a run killed mid-write left in `folder` (each can be a full
    checkpoint's size, and nothing else would ever remove them); returns what was removed.
    Call only before this run writes any checkpoint."""
    removed = []
    for path in leftover_temporaries(folder, "*.pt"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def prune_epoch_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest `keep` epoch_N.pt files (0 keeps all): each is model + two optimizer states."""
    if keep > 0:
        for old in epoch_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)


def kept_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints to resume from, best first: last.pt, then epoch_N.pt newest first."""
    candidates = [folder / LAST_CHECKPOINT, *reversed(epoch_checkpoints(folder))]
    return [p for p in candidates if p.is_file()]
