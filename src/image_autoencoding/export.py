"""`vae export`: a checkpoint's encoder and decoder as safetensors files plus a JSON description,
readable by anyone with `safetensors` and `json` (no pickle, none of this package's classes).

    <out>/encoder.safetensors   Encoder.state_dict() (keys without the "encoder." prefix)
    <out>/decoder.safetensors   Decoder.state_dict()
    <out>/config.json           model section, image_size, the input normalisation, provenance
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from image_autoencoding.atomic_files import atomic_write
from image_autoencoding.errors import UserError
from image_autoencoding.runs.checkpoint import load_checkpoint
from image_autoencoding.runs.resume import checkpoint_path
from image_autoencoding.runs.run_dir import checkpoint_config

FORMAT = "image-autoencoding-vae"
FORMAT_VERSION = 1


def split_networks(model_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{'encoder': {...}, 'decoder': {...}} with each network's own parameter names."""
    parts: dict[str, dict[str, Any]] = {"encoder": {}, "decoder": {}}
    for key, tensor in model_state.items():
        network, _, name = key.partition(".")
        # safetensors stores each tensor's bytes on its own: no views into a shared storage.
        parts[network][name] = tensor.detach().cpu().contiguous().clone()
    return parts


def export_run(run_dir: str | Path, checkpoint: str | None = None, out: str | Path | None = None) -> Path:
    try:
        from safetensors.torch import save
    except ImportError:
        raise UserError("vae export needs the safetensors package: pip install safetensors") from None

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder '{run_dir}' not found")
    source = checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(source)
    config = checkpoint_config(state, source)
    out = Path(out) if out is not None else run_dir / "export"
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.model.model_dump(mode="json"),
        "image_size": config.data.image_size,
        # The encoder expects NCHW float images (pixel / 255 - mean) / std; the decoder's tanh output
        # maps back with x * std + mean.
        "mean": list(config.data.mean),
        "std": list(config.data.std),
        "encoder_outputs": ["mean", "logvar"],
        "source_checkpoint": str(source),
        "epoch": int(state["epoch"]),
        "step": int(state["step"]),
    }
    networks = split_networks(state["model"])
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, tensors in networks.items():
            data = save(tensors, {"format": FORMAT})
            atomic_write(out / f"{name}.safetensors", lambda handle, data=data: handle.write(data))
        text = json.dumps(description, indent=2) + "\n"
        atomic_write(out / "config.json", lambda handle: handle.write(text), binary=False)
    except OSError as exc:
        raise UserError(f"cannot write the export to '{out}': {exc.strerror or exc}") from None
    return out

