"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint holds only tensors and plain Python values (state dicts, numbers, strings, the config
as a dict), so `torch.load(weights_only=True)` can read it and a crafted file cannot run code.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from image_autoencoding.atomic_files import TEMP_SUFFIX, atomic_write
from image_autoencoding.errors import UserError

FORMAT_VERSION = 1
# What every checkpoint we write holds; a file without these is not ours, whatever else it has.
REQUIRED_KEYS = (
    "model", "encoder_optimizer", "decoder_optimizer", "encoder_scheduler", "decoder_scheduler",
    "epoch", "step", "rng", "config",
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
        raise CheckpointWriteError(
            f"cannot write checkpoint '{path}': {exc.strerror or exc}; the previous checkpoint is kept"
        ) from None


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
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, refused global: all mean "not ours"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint '{path}' cannot be read safely: {reason[:200]}") from None
    if not isinstance(state, dict) or "format_version" not in state or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint '{path}' is not an image-autoencoding checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format {state['format_version']}; this version reads up to {FORMAT_VERSION}"
        )
    return state


def publish_as(path: Path, alias: Path) -> None:
    """Give `path` a second name atomically (a hard link, or a copy where links are unsupported)."""
    tmp = alias.with_name(f".{alias.name}.link{TEMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, alias)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"cannot write checkpoint '{alias}': {exc.strerror or exc}") from None


_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


def epoch_checkpoints(folder: Path) -> list[Path]:
    """epoch_N.pt files in the folder, oldest epoch first."""
    found = [(int(m.group(1)), p) for p in folder.glob("epoch_*.pt") if (m := _EPOCH_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def prune_epoch_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest `keep` epoch_N.pt files (0 keeps all): each is model + two optimizer states."""
    if keep > 0:
        for old in epoch_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)


def kept_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints to resume from, best first: last.pt, then epoch_N.pt newest first."""
    candidates = [folder / "last.pt", *reversed(epoch_checkpoints(folder))]
    return [p for p in candidates if p.is_file()]
