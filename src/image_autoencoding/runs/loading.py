"""A trained model from a run folder or a checkpoint file: the one loader that `vae evaluate`,
`sample`, `reconstruct`, `export` and the Python API (`image_autoencoding.load`) go through."""

from __future__ import annotations

from pathlib import Path

from image_autoencoding.config import Config, ConfigError
from image_autoencoding.models.factory import build_model
from image_autoencoding.models.pretrained import TrainedModel
from image_autoencoding.models.shapes import expected_shapes, shape_mismatch, tensor_shapes
from image_autoencoding.runs.checkpoint import CheckpointError, load_checkpoint
from image_autoencoding.runs.run_dir import checkpoint_config, load_run_config
from image_autoencoding.runs.run_paths import CHECKPOINT_CHOICES, RunPaths
from image_autoencoding.training.state import TrainingState

DEFAULT_CHECKPOINT = "best"  # every command that reads a run; `best` is `last` for a run without validation


def resolve_checkpoint(run_dir: Path, name: str = DEFAULT_CHECKPOINT) -> Path:
    """The checkpoint file a command that reads a run uses (evaluate, sample, reconstruct, encode,
    export, the Python API): RunPaths.checkpoint's, except that `best` falls back to `last` for runs
    without validation metrics (a resume takes `best` to mean best.pt: it continues from it). A file
    that is not there is a CheckpointError."""
    paths = RunPaths(run_dir)
    if name == "best" and not paths.best.is_file():
        name = "last"
    path = paths.checkpoint(name)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found (expected {CHECKPOINT_CHOICES})")
    return path


def load_from_run(run_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT) -> TrainedModel:
    """A run folder's checkpoint, with the run's config.yaml: the data and model sections are the
    same in both (a resume cannot change them), and a run moved to another machine is evaluated by
    pointing data.data_root / cache_dir in config.yaml at the data's new place."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder '{run_dir}' not found")
    config = load_run_config(run_dir)
    path = resolve_checkpoint(run_dir, checkpoint)
    return _with_weights(config, path, load_checkpoint(path), f"the model in {RunPaths(run_dir).config}")


def load_from_checkpoint(path: str | Path) -> TrainedModel:
    """A checkpoint file on its own, with the config saved inside it."""
    path = Path(path)
    state = load_checkpoint(path)
    return _with_weights(checkpoint_config(state, path), path, state, "the model its config describes")


def _with_weights(config: Config, path: Path, state: TrainingState, described: str) -> TrainedModel:
    # Checked before the model is built (models/shapes.py): a config describing a huge model is refused.
    problem = shape_mismatch(expected_shapes(config.model, config.data.image_size), tensor_shapes(state.model))
    if problem:
        raise CheckpointError(f"checkpoint '{path}' does not fit {described}: {problem}")
    model = build_model(config.model, config.data.image_size, init_weights=False)
    try:
        model.load_state_dict(state.model)
    except (RuntimeError, KeyError):
        raise CheckpointError(f"checkpoint '{path}' does not fit {described}") from None
    return TrainedModel(config, model.eval(), path, state.epoch, state.step)

