"""Run folders: `<output>/results/vae/vae_<YYYYmmdd-HHMMSS>/`, as the original laid them out, and the
config.yaml each one holds."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import yaml

from image_autoencoding.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, build_config
from image_autoencoding.errors import UserError

logger = logging.getLogger("image_autoencoding")


def create_run_dir(output_dir: str | Path, now: float | None = None) -> Path:
    """Create a new, empty run folder."""
    parent = Path(output_dir) / "results" / "vae"
    parent.mkdir(parents=True, exist_ok=True)
    return create_stamped_dir(parent, "vae", now)


def create_stamped_dir(parent: Path, prefix: str, now: float | None = None) -> Path:
    """Create `<parent>/<prefix>_<YYYYmmdd-HHMMSS>`. Two made in the same second get `..._2`, `..._3`:
    mkdir without exist_ok is atomic, so concurrent callers never share a folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    for attempt in range(1, 1000):
        candidate = parent / (f"{prefix}_{stamp}" if attempt == 1 else f"{prefix}_{stamp}_{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a new folder {prefix}_{stamp} under '{parent}'")


def ensure_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Create `folder` if needed and prove a file can be written there, before any training time
    is spent: a read-only or missing output location is a one-line error, not a crash at epoch 1."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{what} '{folder}' is not writable: {exc.strerror or exc}") from None
    return folder


def load_run_config(run_dir: Path) -> Config:
    """The run's config.yaml. Keys this version no longer knows are dropped (with a log line), so
    runs written by earlier versions of the same format still evaluate."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run folder: {path.name} not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
    for name, section in sections.items():
        values = raw.get(name) or {}
        unknown = set(values) - set(section.model_fields)
        for key in sorted(unknown):
            logger.info("%s: ignoring %s.%s (not used by this version)", path, name, key)
        raw[name] = {k: v for k, v in values.items() if k not in unknown}
    return build_config({k: raw[k] for k in sections}, str(path))
