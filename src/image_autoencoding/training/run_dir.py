"""Run folders: `<output>/results/vae/vae_<YYYYmmdd-HHMMSS>/`, as the original laid them out."""

from __future__ import annotations

import time
from pathlib import Path


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
