"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint holds a training/state.TrainingState: only tensors and plain Python values (state
dicts, numbers, strings, the config as a dict), so `torch.load(weights_only=True)` can read it and a
crafted file cannot run code.
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
from image_autoencoding.training.state import StateProblem, TrainingState


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, no permission); the previous one is intact."""


def save_checkpoint(state: TrainingState, path: str | Path) -> None:
    """Write atomically (see atomic_files), so a crash mid-save leaves the previous checkpoint intact
    and no half-written file under `path`.

    Refuses (CheckpointError) a state holding NaN or Inf: a checkpoint must always be a safe place
    to resume from. A failed write (full disk) raises CheckpointWriteError and leaves no file."""
    path = Path(path)
    state = state.to_dict()
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"refusing to write checkpoint '{path}': {bad} holds NaN or Inf")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda handle: torch.save(state, handle))
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> TrainingState:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    raw = load_plain(path, "checkpoint", CheckpointError, map_location)
    try:
        return TrainingState.from_dict(raw)
    except StateProblem as exc:
        raise CheckpointError(f"checkpoint '{path}' {exc}") from None


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
