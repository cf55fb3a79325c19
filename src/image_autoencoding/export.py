"""`vae export`: a run's encoder and decoder as safetensors files plus a JSON description, readable
by anyone with `safetensors` and `json` (no pickle, none of this package's classes), and loadable
again with `image_autoencoding.load` (`load_export`), which unpickles nothing.

    <out>/encoder.safetensors   Encoder.state_dict() (keys without the "encoder." prefix)
    <out>/decoder.safetensors   Decoder.state_dict()
    <out>/config.json           model section, the preprocessing (data section keys), provenance
    <out>/latent_gmm.safetensors  the run's latent sampler for these weights, when it has one
    <out>/encoder.onnx, decoder.onnx   with --onnx (see export_onnx.py)

The folder is built beside <out> and replaces it whole, so it never mixes two exports' files; only
an earlier export or an empty folder is replaced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from image_autoencoding.atomic_files import atomic_write, replace_folder, temporary_folder_beside
from image_autoencoding.config import ConfigError, build_config
from image_autoencoding.errors import UserError
from image_autoencoding.models.shapes import expected_shapes, shape_mismatch
from image_autoencoding.runs.latent_sampler import load_run_mixture
from image_autoencoding.runs.loading import DEFAULT_CHECKPOINT, TrainedModel, load_from_checkpoint, load_from_run
from image_autoencoding.runs.resume import names_a_file
from image_autoencoding.runs.run_dir import without_other_archs_keys

FORMAT = "image-autoencoding-vae"
FORMAT_VERSION = 2
# The data keys that decide what the encoder expects: a file or picture goes through exactly the
# training cache's preprocessing (centre crop, resize) and normalisation with these.
PREPROCESSING_KEYS = ("image_size", "image_crop", "mean", "std", "max_image_pixels")
EXPORT_MIXTURE = "latent_gmm.safetensors"  # the run's latent sampler for the exported weights, when fitted


def split_networks(model_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{'encoder': {...}, 'decoder': {...}} with each network's own parameter names."""
    parts: dict[str, dict[str, Any]] = {"encoder": {}, "decoder": {}}
    for key, tensor in model_state.items():
        network, _, name = key.partition(".")
        # safetensors stores each tensor's bytes on its own: no views into a shared storage.
        parts[network][name] = tensor.detach().cpu().contiguous().clone()
    return parts


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("exports need the safetensors package: pip install safetensors") from None
    return safetensors.torch


def export_run(run_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT, out: str | Path | None = None,
               onnx: bool = False) -> Path:
    save = _safetensors().save
    if onnx:
        from image_autoencoding.export_onnx import export_onnx, require_onnx

        require_onnx()  # before anything is written
    run_dir = Path(run_dir)
    # A checkpoint given as a file path carries its own config; a name (best, last, epoch_N) is the run's.
    trained = load_from_checkpoint(checkpoint) if names_a_file(checkpoint) else load_from_run(run_dir, checkpoint)
    config = trained.config
    out = Path(out) if out is not None else run_dir / "export"
    _check_replaceable(out)
    data = config.data.model_dump(mode="json")
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.model.model_dump(mode="json"),
        "data": {key: data[key] for key in PREPROCESSING_KEYS},
        # The encoder expects NCHW float images (pixel / 255 - mean) / std; the decoder's tanh output
        # maps back with x * std + mean.
        "image_size": config.data.image_size,
        "mean": list(config.data.mean),
        "std": list(config.data.std),
        "encoder_outputs": ["mean", "logvar"],
        "source_checkpoint": str(trained.source),
        "epoch": trained.epoch,
        "step": trained.step,
    }
    networks = split_networks(trained.model.state_dict())
    destination = out
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Every file is written into a temporary folder beside the destination, swapped in whole at
        # the end: written into the old folder, an export kept the old run's encoder.onnx, decoder.onnx
        # and mixture beside the new weights, and a kill midway left one run's config.json with
        # another's weights.
        out = temporary_folder_beside(destination)
        for name, tensors in networks.items():
            blob = save(tensors, {"format": FORMAT})
            atomic_write(out / f"{name}.safetensors", lambda handle, blob=blob: handle.write(blob))
        mixture = load_run_mixture(run_dir, trained)
        if mixture is not None:
            mixture.save(out / EXPORT_MIXTURE)
        if onnx:
            export_onnx(trained.model, config.data.image_size, out)
        text = json.dumps(description, indent=2) + "\n"
        atomic_write(out / "config.json", lambda handle: handle.write(text), binary=False)
        replace_folder(out, destination)
    except OSError as exc:
        raise UserError(f"cannot write the export to '{destination}': {exc.strerror or exc}") from None
    finally:
        if out != destination:  # the temporary folder of an export that failed
            shutil.rmtree(out, ignore_errors=True)
    return destination


def _check_replaceable(out: Path) -> None:
    """An export replaces only an earlier export or an empty folder: --out naming a folder of other
    files must never delete them."""
    if out.is_dir() and (is_export(out) or not any(out.iterdir())):
        return
    if out.exists() or out.is_symlink():
        kind = "a folder that is not an export" if out.is_dir() else "not a folder"
        raise UserError(f"'{out}' is {kind}; an export replaces only an earlier export or an empty folder: "
                        "choose another --out")


def is_export(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "encoder.safetensors").is_file()


def load_export(folder: str | Path) -> TrainedModel:
    """An export folder back as a model, from safetensors and JSON alone: nothing is unpickled."""
    from image_autoencoding.models.factory import build_model

    folder = Path(folder)
    path = folder / "config.json"
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
        config = build_config(without_other_archs_keys({"model": description["model"], "data": description["data"]}),
                              str(path))
    except KeyError as exc:
        raise ConfigError(f"'{path}': the {exc.args[0]} section is missing") from None
    provenance = {key: description.get(key, 0) for key in ("epoch", "step")}
    for key, value in provenance.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"'{path}': \"{key}\" is {json.dumps(value)[:40]}, expected a whole number >= 0")
    # The weights files' headers against the model config.json describes, before the model is built:
    # a config.json claiming latent_dim 1e9 would otherwise allocate 1 TB.
    expected = expected_shapes(config.model, config.data.image_size)
    for network in ("encoder", "decoder"):
        weights, prefix = folder / f"{network}.safetensors", f"{network}."
        own = {name.removeprefix(prefix): shape for name, shape in expected.items() if name.startswith(prefix)}
        problem = shape_mismatch(own, _tensor_shapes(weights))
        if problem:
            raise UserError(f"'{weights}' does not hold the {network} '{path}' describes: {problem}")
    load_file = _safetensors().load_file
    model = build_model(config.model, config.data.image_size)
    for network in ("encoder", "decoder"):
        weights = folder / f"{network}.safetensors"
        try:
            getattr(model, network).load_state_dict(load_file(weights))
        except (OSError, RuntimeError, _safetensors_error()) as exc:
            raise UserError(f"'{weights}' does not hold the {network} config.json describes: "
                            f"{str(exc).splitlines()[0]}") from None
    return TrainedModel(config, model.eval(), folder, provenance["epoch"], provenance["step"])


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
