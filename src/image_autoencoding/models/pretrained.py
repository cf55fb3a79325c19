"""A VAE saved to a folder and loaded back from it, with the preprocessing it expects: the one writer
and reader of the folder `vae export` makes, readable by anyone with `safetensors` and `json` (no
pickle, none of this package's classes), loaded back without unpickling anything.

    <folder>/encoder.safetensors   Encoder.state_dict() (keys without the "encoder." prefix)
    <folder>/decoder.safetensors   Decoder.state_dict()
    <folder>/config.json           model section, the preprocessing (data section keys), provenance

    save_pretrained(trainer.model, "my_vae", trainer.config.data)   # or model.save_pretrained(...)
    trained = from_pretrained("my_vae")   # .model, .config (data: the preprocessing), .epoch, .step
    vae = image_autoencoding.load("my_vae")   # the same folder, with images in and out

A model does not hold its preprocessing (the data section does: image_size, crop, mean, std), so
saving takes it; loading gives it back as `config.data`. The folder is built beside its destination
and replaces it whole: it never mixes two saves' files, and only an earlier save or an empty folder
is replaced.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from image_autoencoding.atomic_files import atomic_write, folder_written_whole
from image_autoencoding.config import Config, ConfigError, DataConfig, build_config, without_other_archs_keys
from image_autoencoding.errors import UserError
from image_autoencoding.models.factory import build_model
from image_autoencoding.models.shapes import expected_shapes, shape_mismatch
from image_autoencoding.models.vae import VAE

FORMAT = "image-autoencoding-vae"
FORMAT_VERSION = 2
# The data keys that decide what the encoder expects: a file or picture goes through exactly the
# training cache's preprocessing (centre crop, resize) and normalisation with these.
PREPROCESSING_KEYS = ("image_size", "image_crop", "mean", "std", "max_image_pixels")
DESCRIPTION = "config.json"
NETWORKS = ("encoder", "decoder")


@dataclass
class TrainedModel:
    """A model loaded with its config and provenance (from_pretrained; runs/loading.py for checkpoints)."""

    # data (the preprocessing) and model sections as trained; train as last run from a checkpoint,
    # the defaults from a saved folder (which holds no train section)
    config: Config
    model: VAE  # on the CPU, in eval mode
    source: Path  # the checkpoint (or saved folder) the weights came from
    epoch: int
    step: int


def save_pretrained(model: VAE, directory: str | Path, data: DataConfig, *, source: str | Path | None = None,
                    epoch: int = 0, step: int = 0, extras: Callable[[Path], None] | None = None) -> Path:
    """Write `model` and the preprocessing `data` (the data section it was trained with) to
    `directory`, which must not exist, be empty, or hold an earlier save (an export). `source`,
    `epoch` and `step` record where the weights came from. `extras(folder)` may write more files
    into the new folder before it replaces `directory`. Returns `directory`."""
    save = _safetensors().save
    if not isinstance(data, DataConfig):
        raise TypeError(f"data: expected the data section the model was trained with (config.data), "
                        f"got {type(data).__name__}")
    if data.image_size != model.image_size:
        raise ValueError(f"data.image_size is {data.image_size}, the model's is {model.image_size}: "
                         "pass the data section the model was trained with")
    for key, value in (("epoch", epoch), ("step", step)):
        if not _whole_number(value):
            raise ValueError(f"{key}: expected a whole number >= 0, got {value!r}")
    destination = Path(directory)
    _check_replaceable(destination)
    data_keys = data.model_dump(mode="json")
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.cfg.model_dump(mode="json"),
        "data": {key: data_keys[key] for key in PREPROCESSING_KEYS},
        # The encoder expects NCHW float images (pixel / 255 - mean) / std; the decoder's tanh output
        # maps back with x * std + mean.
        "image_size": data.image_size,
        "mean": list(data.mean),
        "std": list(data.std),
        "encoder_outputs": ["mean", "logvar"],
        "source_checkpoint": None if source is None else str(source),
        "epoch": epoch,
        "step": step,
    }
    networks = split_networks(model.state_dict())
    with folder_written_whole(destination, "the export") as folder:
        for name, tensors in networks.items():
            blob = save(tensors, {"format": FORMAT})
            atomic_write(folder / f"{name}.safetensors", lambda handle, blob=blob: handle.write(blob))
        if extras is not None:
            extras(folder)
        text = json.dumps(description, indent=2) + "\n"
        atomic_write(folder / DESCRIPTION, lambda handle: handle.write(text), binary=False)
    return destination


def split_networks(model_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{'encoder': {...}, 'decoder': {...}} with each network's own parameter names."""
    parts: dict[str, dict[str, Any]] = {network: {} for network in NETWORKS}
    for key, tensor in model_state.items():
        network, _, name = key.partition(".")
        # safetensors stores each tensor's bytes on its own: no views into a shared storage.
        parts[network][name] = tensor.detach().cpu().contiguous().clone()
    return parts


def _check_replaceable(out: Path) -> None:
    """A save replaces only an earlier save or an empty folder: a folder of other files must never
    be deleted."""
    if out.is_dir() and (is_pretrained(out) or not any(out.iterdir())):
        return
    if out.exists() or out.is_symlink():
        kind = "a folder that is not an export" if out.is_dir() else "not a folder"
        raise UserError(f"'{out}' is {kind}; an export replaces only an earlier export or an empty folder: "
                        "choose another folder")


def is_pretrained(folder: str | Path) -> bool:
    """Whether `folder` looks like a saved model (an export): what `from_pretrained` reads."""
    folder = Path(folder)
    return (folder / DESCRIPTION).is_file() and (folder / "encoder.safetensors").is_file()


def from_pretrained(directory: str | Path) -> TrainedModel:
    """A folder `save_pretrained` (or `vae export`) wrote, back as a model on the CPU in eval mode,
    with its config (`config.data`: the preprocessing; `config.train`: defaults) and provenance,
    from safetensors and JSON alone: nothing is unpickled. Anything damaged is a UserError naming
    the file, raised before the model is built."""
    folder = Path(directory)
    path = folder / DESCRIPTION
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"'{path}' cannot be read as an export description: {exc}") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise UserError(f"'{path}' is not an image-autoencoding export (no \"format\": \"{FORMAT}\")")
    if description.get("format_version") != FORMAT_VERSION:
        raise UserError(f"'{path}' is export format version {description.get('format_version')}, this version "
                        f"reads {FORMAT_VERSION}: export the run again with this version (vae export RUN_DIR)")
    try:
        # Exports written before each architecture had its own keys hold every architecture's keys.
        config = build_config(without_other_archs_keys({"model": description["model"], "data": description["data"]}),
                              str(path))
    except KeyError as exc:
        raise ConfigError(f"'{path}': the {exc.args[0]} section is missing") from None
    provenance = {key: description.get(key, 0) for key in ("epoch", "step")}
    for key, value in provenance.items():
        if not _whole_number(value):
            raise UserError(f"'{path}': \"{key}\" is {json.dumps(value)[:40]}, expected a whole number >= 0")
    # The weights files' headers against the model config.json describes, before the model is built:
    # a config.json claiming latent_dim 1e9 would otherwise allocate 1 TB.
    expected = expected_shapes(config.model, config.data.image_size)
    for network in NETWORKS:
        weights, prefix = folder / f"{network}.safetensors", f"{network}."
        own = {name.removeprefix(prefix): shape for name, shape in expected.items() if name.startswith(prefix)}
        problem = shape_mismatch(own, _tensor_shapes(weights))
        if problem:
            raise UserError(f"'{weights}' does not hold the {network} '{path}' describes: {problem}")
    load_file = _safetensors().load_file
    model = build_model(config.model, config.data.image_size, init_weights=False)
    for network in NETWORKS:
        weights = folder / f"{network}.safetensors"
        try:
            getattr(model, network).load_state_dict(load_file(weights))
        except (OSError, RuntimeError, _safetensors_error()) as exc:
            raise UserError(f"'{weights}' does not hold the {network} config.json describes: "
                            f"{str(exc).splitlines()[0]}") from None
    return TrainedModel(config, model.eval(), folder, provenance["epoch"], provenance["step"])


def _whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("exports need the safetensors package: pip install safetensors") from None
    return safetensors.torch


def _safetensors_error() -> type[Exception]:
    _safetensors()  # says how to install it when it is missing
    from safetensors import SafetensorError

    return SafetensorError


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor in a safetensors file, read from its header alone. A missing or
    truncated file, or a header that is not safetensors' (one claiming 4 TB), names the file."""
    error = _safetensors_error()
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (OSError, error) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"'{weights}' cannot be read as a safetensors file: {reason}") from None
