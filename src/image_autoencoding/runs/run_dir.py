"""Run folders: `<output>/results/vae/vae_<YYYYmmdd-HHMMSS>/`, as the original laid them out, and the
config.yaml each one holds."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from image_autoencoding.atomic_files import atomic_write
from image_autoencoding.config import Config, ConfigError, build_config, read_yaml, without_other_archs_keys
from image_autoencoding.errors import UserError, quoted
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.training.state import TrainingState


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
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {quoted(folder)} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{what} {quoted(folder)} is not writable: {exc.strerror or exc}") from None
    return folder


def write_run_config(config: Config, path: Path, resolved: dict[str, tuple[str, str]] | None = None) -> None:
    """config.yaml of a run, written atomically. `resolved`: keys whose value (such as `auto`) was
    resolved on this machine, key -> (value, what it resolved to), recorded as a comment so the
    file still says what the user asked for (a resume on another machine resolves `auto` again)."""
    lines = [f"# {key}: {value} resolved to {actual} on this machine" for key, (value, actual) in
             (resolved or {}).items() if value != actual]
    text = "".join(f"{line}\n" for line in lines) + yaml.safe_dump(config.to_dict(), sort_keys=False)
    try:
        atomic_write(path, lambda handle: handle.write(text), binary=False)
    except OSError as exc:
        raise UserError(f"cannot write '{path}': {exc.strerror or exc}") from None


# Saved configs are complete, so a key one lacks was added after it was written: it takes the value
# that keeps what that run did, not today's default.
KEYS_ADDED_SINCE = {("train", "lr_schedule"): "exponential", ("train", "warmup_steps"): 0}


def with_keys_added_since(raw: dict[str, Any]) -> dict[str, Any]:
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for (section, key), value in KEYS_ADDED_SINCE.items():
        if isinstance(raw.get(section), dict):
            raw[section].setdefault(key, value)
    return raw


def saved_config(raw: Any, source: str) -> Config:
    """A config a run saved (its config.yaml, or the copy in each checkpoint), read as strictly as a
    config file: a key this version does not know, or a value it does not accept, is an error that
    names it, never silently dropped (it may change what the weights mean)."""
    try:
        return build_config(without_other_archs_keys(with_keys_added_since(raw if isinstance(raw, dict) else {})),
                            source)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (saved by another version of image-autoencoding, or edited since; this "
                          "version cannot read it)") from None


def load_run_config(run_dir: Path) -> Config:
    """The run's config.yaml."""
    path = RunPaths(run_dir).config
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run folder: {path.name} not found")
    return saved_config(read_yaml(path), str(path))


def checkpoint_config(state: TrainingState, path: str | Path) -> Config:
    """The config a checkpoint was trained with."""
    return saved_config(state.config, f"config in '{path}'")
