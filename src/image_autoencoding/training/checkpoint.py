"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint holds only tensors and plain Python values (state dicts, numbers, strings, the config
as a dict), so `torch.load(weights_only=True)` can read it and a crafted file cannot run code.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from image_autoencoding.errors import UserError

FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename into place, so a
    crash mid-save leaves the previous checkpoint intact and no half-written file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, refused global: all mean "not ours"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint '{path}' cannot be read safely: {reason[:200]}") from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise CheckpointError(f"checkpoint '{path}' is not an image-autoencoding checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format {state['format_version']}; this version reads up to {FORMAT_VERSION}"
        )
    return state


def publish_as(path: Path, alias: Path) -> None:
    """Give `path` a second name atomically (a hard link, or a copy where links are unsupported)."""
    tmp = alias.with_name(f".{alias.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copy2(path, tmp)
    os.replace(tmp, alias)


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
