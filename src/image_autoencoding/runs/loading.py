"""A trained model from a run folder or a checkpoint file: the one loader that `vae evaluate`,
`sample`, `reconstruct`, `export` and the Python API (`image_autoencoding.load`) go through."""

from __future__ import annotations

from pathlib import Path

from image_autoencoding.config import Config, ConfigError, apply_overrides, build_config, read_yaml
from image_autoencoding.models.autoencoder_kl import model_keys_of_folder
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
    # The one place a reader picks the checkpoint's weights: the run's model (TrainingState.inference_weights).
    weights = state.inference_weights
    # Checked before the model is built (models/shapes.py): a config describing a huge model is refused.
    problem = shape_mismatch(expected_shapes(config.model, config.data.image_size), tensor_shapes(weights))
    if problem:
        raise CheckpointError(f"checkpoint '{path}' does not fit {described}: {problem}")
    model = build_model(config.model, config.data.image_size, init_weights=False)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError):
        raise CheckpointError(f"checkpoint '{path}' does not fit {described}") from None
    return TrainedModel(config, model.eval(), path, state.epoch, state.step)


def load_from_diffusers(folder: str | Path, config_file: str | Path | None = None,
                        overrides: list[str] | None = None) -> TrainedModel:
    """A diffusers AutoencoderKL folder (a downloaded Stable Diffusion VAE, or `vae export
    --diffusers`'s) as a model to score: its config.json gives the model section (model.arch
    autoencoder-kl, model.init_from the folder), `config_file` and `overrides` the data and train
    sections. The file's model section is left out: it describes another model (a run's config
    names the folder its run started from); an override of a model key is refused."""
    overrides = list(overrides or [])
    for text in overrides:
        if text.partition("=")[0].split(".")[0] == "model":
            raise ConfigError(f"override '{text}': with --model the model is the folder's; give data.* or "
                              "train.* overrides")
    raw = read_yaml(config_file) if config_file is not None else {}
    raw = apply_overrides({name: section for name, section in raw.items() if name != "model"}, overrides)
    raw["model"] = model_keys_of_folder(folder, "--model")
    config = build_config(raw, str(config_file) if config_file is not None else "", overrides)
    model = build_model(config.model, config.data.image_size)  # the folder's weights (model.init_from)
    return TrainedModel(config, model.eval(), Path(folder), 0, 0)
