"""`vae export`: a run's weights as safetensors (no pickle, loadable from any language) and the
model's shape as JSON, so the networks can be rebuilt without this package."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from image_autoencoding.evaluation.run_report import load_run_model

EXPORT_FORMAT = 1


def export_run(run_dir: Path, checkpoint: str = "best", out: Path | None = None) -> Path:
    config, model, path, state = load_run_model(run_dir, checkpoint)
    out = out or run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    for name, network in (("encoder", model.encoder), ("decoder", model.decoder)):
        tensors = {key: value.detach().contiguous().cpu() for key, value in network.state_dict().items()}
        save_file(tensors, str(out / f"{name}.safetensors"), metadata={"format": str(EXPORT_FORMAT)})
    description = {
        "format": EXPORT_FORMAT,
        "source_checkpoint": str(path),
        "epoch": int(state.get("epoch", 0)),
        "image_size": config.data.image_size,
        # Inputs are RGB in [0, 1] normalised as (x - mean) / std; outputs come back the same way (tanh).
        "mean": list(config.data.mean),
        "std": list(config.data.std),
        "model": config.model.model_dump(mode="json"),
    }
    (out / "model.json").write_text(json.dumps(description, indent=2), encoding="utf-8")
    return out
