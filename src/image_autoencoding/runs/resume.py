"""Continuing a run: its saved config, the chosen checkpoint, and which changes are allowed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from image_autoencoding.config import Config, ConfigError, apply_overrides, build_config
from image_autoencoding.models.shapes import (
    expected_shapes,
    optimizer_mismatch,
    parameter_shapes,
    shape_mismatch,
    tensor_shapes,
)
from image_autoencoding.runs.checkpoint import CheckpointError, kept_checkpoints, load_checkpoint
from image_autoencoding.runs.run_dir import checkpoint_config, create_stamped_dir, load_run_config
from image_autoencoding.runs.run_paths import (
    ABANDONED_PREFIX,
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    RunPaths,
    epoch_checkpoints,
    epoch_of,
)
from image_autoencoding.training.state import TrainingState

# Values that change what the weights mean; a resumed run must keep them.
FROZEN_SECTIONS = ("data", "model")
# The optimizer state of one kind cannot drive the other.
FROZEN_KEYS = ("train.optimizer",)
# Keys of those sections that say how, not what: the processes decoding images into the cache; where
# batches are drawn (the same batches either way); the folder a run's first weights came from (the
# checkpoint's replace them).
FREE_KEYS = ("data.num_workers", "data.on_device", "model.init_from")
# Inside an epoch, the batches still to come are counted in steps of this epoch's order and size.
# The size that counts is the global batch (batch_size x processes), checked apart: 2 processes of
# 16 may continue as 1 process of 32, exactly.
FROZEN_INSIDE_EPOCH = ("train.seed", "train.max_steps_per_epoch")


@dataclass
class Resume:
    run_dir: Path
    config: Config
    state: TrainingState
    changed: dict[str, tuple[Any, Any]]  # train.* keys changed on resume: key -> (old, new)
    checkpoint: Path | None = None
    # One line per checkpoint that could not be used before `checkpoint` was (for the log).
    fallbacks: list[str] = field(default_factory=list)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _frozen(key: str) -> bool:
    return (key.split(".")[0] in FROZEN_SECTIONS and key not in FREE_KEYS) or key in FROZEN_KEYS


def _check_checkpoint_fits_run(run_dir: Path, path: Path, saved: Config) -> None:
    """A checkpoint named with --checkpoint may come from another run: continuing this run from it
    would switch the run's dataset or model under its earlier epochs. A folder without config.yaml
    has no earlier epochs to protect."""
    config_file = RunPaths(run_dir).config
    if not config_file.is_file():
        return
    run, checkpoint = _flatten(load_run_config(run_dir).to_dict()), _flatten(saved.to_dict())
    differ = sorted(key for key in checkpoint if _frozen(key) and run.get(key) != checkpoint[key])
    if differ:
        raise ConfigError(
            f"cannot resume '{run_dir}' from '{path}': it was trained with another model or dataset than "
            f"{config_file}: "
            + ", ".join(f"{key} {run.get(key)!r} there, {checkpoint[key]!r} in the checkpoint" for key in differ)
        )


def load_newest_good(run_dir: Path) -> tuple[Path, TrainingState, list[str]]:
    """last.pt, or when it cannot be read the newest epoch_N.pt that can (with why the others not)."""
    folder = RunPaths(run_dir).checkpoints
    candidates = kept_checkpoints(folder)
    if not candidates:
        raise CheckpointError(f"nothing to resume from in '{folder}': no last.pt or epoch_N.pt; {_holds(folder)}")
    failures: list[str] = []
    for path in candidates:
        try:
            return path, load_checkpoint(path), failures
        except CheckpointError as exc:
            failures.append(str(exc))
    raise CheckpointError(failures[0] + (f" (and {len(failures) - 1} older ones)" if len(failures) > 1 else ""))


def _holds(folder: Path) -> str:
    """What a checkpoints folder holds instead, and the way on where there is one."""
    if not folder.is_dir():
        return "the folder does not exist (the run stopped before its first epoch ended)"
    names = sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))
    if not names:
        return "the folder is empty (the run stopped before its first epoch ended)"
    held = f"it holds {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
    return held + (f"; continue from {BEST_CHECKPOINT} with --checkpoint best" if BEST_CHECKPOINT in names else "")


def prepare_resume(
    run_dir: str | Path, checkpoint: str | None, overrides: list[str], world_size: int = 1
) -> Resume:
    """`world_size`: the processes of the resumed run (torchrun's WORLD_SIZE), which may differ from
    the saved run's."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder '{run_dir}' not found")
    if checkpoint is None:
        path, state, fallbacks = load_newest_good(run_dir)
    else:
        # A checkpoint the user named is the one they want: no silent substitute.
        path, fallbacks = RunPaths(run_dir).checkpoint(checkpoint), []
        state = load_checkpoint(path)
    saved = checkpoint_config(state, path)
    expected = expected_shapes(saved.model, saved.data.image_size)
    for network in ("model", "ema"):  # the trained weights and their average (train.ema_decay) are one VAE's
        problem = network in state.networks and shape_mismatch(expected, tensor_shapes(state.networks[network]))
        if problem:
            raise CheckpointError(f"checkpoint '{path}' does not fit the model its config describes: "
                                  f"{'' if network == 'model' else 'its weight average: '}{problem}")
    for network, shapes in parameter_shapes(saved.model, saved.data.image_size).items():
        problem = optimizer_mismatch(shapes, state.optimizers[network])
        if problem:
            raise CheckpointError(f"checkpoint '{path}': {network}_optimizer does not fit the {network}: {problem}")
    _check_checkpoint_fits_run(run_dir, path, saved)
    config = build_config(apply_overrides(saved.to_dict(), overrides), "resume overrides", overrides)
    before, after = _flatten(saved.to_dict()), _flatten(config.to_dict())
    changed = {key: (before.get(key), after[key]) for key in after if before.get(key) != after[key]}
    frozen = [key for key in changed if _frozen(key)]
    inside_epoch = state.inside_epoch
    if inside_epoch:
        frozen += [key for key in changed if key in FROZEN_INSIDE_EPOCH]
        saved_world = state.world_size
        if saved.train.batch_size * saved_world != config.train.batch_size * world_size:
            frozen.append("global batch (train.batch_size x processes)")
            changed[frozen[-1]] = (
                f"{saved.train.batch_size} x {saved_world}", f"{config.train.batch_size} x {world_size}"
            )
    if frozen:
        where = " inside an epoch (use --checkpoint epoch_N for an epoch boundary)" if inside_epoch else ""
        raise ConfigError(
            f"cannot resume '{path}' with a changed model, dataset or batching{where}: "
            + ", ".join(f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in sorted(frozen))
        )
    return Resume(run_dir, config, state, changed, path, fallbacks)


def set_aside_later_checkpoints(folder: Path, epoch: int, step: int) -> Path | None:
    """A run resumed from an older point (epoch, step) abandons what came after it: move those
    checkpoints into `folder/abandoned_<time>/`, never deleting them, so that best.pt and the newest
    epoch_N.pt are again this run's own. Returns the folder they went to, None when none was later.
    Call on the writing rank only, after the resume was accepted."""
    later = [path for path in epoch_checkpoints(folder) if epoch_of(path) > epoch]
    later += [path for path in (folder / BEST_CHECKPOINT, folder / LAST_CHECKPOINT) if _saved_after(path, epoch, step)]
    if not later:
        return None
    aside = create_stamped_dir(folder, ABANDONED_PREFIX)
    for path in later:
        os.replace(path, aside / path.name)
    return aside


def _saved_after(path: Path, epoch: int, step: int) -> bool:
    """Whether the checkpoint at `path` was saved after (epoch, step). One that cannot be read tells
    nothing and stays: resume has already said why it was passed over."""
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return False
    return (state.epoch, state.step) > (epoch, step)
