"""Run folders: `<output>/results/vae/vae_<YYYYmmdd-HHMMSS>/`, as the original laid them out."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from image_autoencoding.errors import UserError


def create_run_dir(output_dir: str | Path, now: float | None = None) -> Path:
    """Create a new, empty run folder. Two runs started in the same second get `..._2`, `..._3`:
    mkdir without exist_ok is atomic, so concurrent starts never share a folder."""
    parent = Path(output_dir) / "results" / "vae"
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    for attempt in range(1, 1000):
        candidate = parent / (f"vae_{stamp}" if attempt == 1 else f"vae_{stamp}_{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a new run folder under '{parent}'")


def ensure_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written there, before any training time
    is spent: a read-only or missing output location is a one-line error, not a crash at epoch 1."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"output folder '{folder}' is not writable: {exc.strerror or exc}") from None
    return folder
