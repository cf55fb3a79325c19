"""Continuing a run: its saved config, the chosen checkpoint, and which changes are allowed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from image_autoencoding.config import Config, ConfigError, apply_overrides, build_config
from image_autoencoding.training.checkpoint import load_checkpoint

# Values that change what the weights mean; a resumed run must keep them.
FROZEN_SECTIONS = ("data", "model")


@dataclass
class Resume:
    run_dir: Path
    config: Config
    state: dict[str, Any]
    changed: dict[str, tuple[Any, Any]]  # train.* keys changed on resume: key -> (old, new)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def checkpoint_path(run_dir: Path, checkpoint: str | None) -> Path:
    if checkpoint is None:
        return run_dir / "checkpoints" / "last.pt"
    candidate = Path(checkpoint)
    if candidate.is_file() or candidate.is_absolute() or len(candidate.parts) > 1:
        return candidate
    name = checkpoint if checkpoint.endswith(".pt") else f"{checkpoint}.pt"
    return run_dir / "checkpoints" / name


def prepare_resume(run_dir: str | Path, checkpoint: str | None, overrides: list[str]) -> Resume:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder '{run_dir}' not found")
    state = load_checkpoint(checkpoint_path(run_dir, checkpoint))
    saved = build_config(state["config"], "checkpoint config")
    config = build_config(apply_overrides(saved.to_dict(), overrides), "resume overrides")
    before, after = _flatten(saved.to_dict()), _flatten(config.to_dict())
    changed = {key: (before[key], after[key]) for key in after if before.get(key) != after[key]}
    frozen = sorted(key for key in changed if key.split(".")[0] in FROZEN_SECTIONS)
    if frozen:
        raise ConfigError(
            "cannot resume with a changed model or dataset: "
            + ", ".join(f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in frozen)
        )
    return Resume(run_dir, config, state, changed)
