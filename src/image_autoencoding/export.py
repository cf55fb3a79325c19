"""`vae export`: a run's encoder and decoder as safetensors files plus a JSON description, readable
by anyone with `safetensors` and `json` (no pickle, none of this package's classes), and loadable
again with `image_autoencoding.load`, which unpickles nothing. `models/pretrained.py` writes and
reads the folder (`save_pretrained`, `from_pretrained`); an export adds the run's extras:

    <out>/encoder.safetensors, decoder.safetensors, config.json   the model (models/pretrained.py)
    <out>/latent_gmm.safetensors  the run's latent sampler for these weights, when it has one
    <out>/encoder.onnx, decoder.onnx   with --onnx (see export_onnx.py)

The folder is built beside <out> and replaces it whole, so it never mixes two exports' files; only
an earlier export or an empty folder is replaced.
"""

from __future__ import annotations

from pathlib import Path

from image_autoencoding.models.pretrained import save_pretrained
from image_autoencoding.runs.latent_sampler import load_run_mixture
from image_autoencoding.runs.loading import DEFAULT_CHECKPOINT, load_from_checkpoint, load_from_run
from image_autoencoding.runs.run_paths import RunPaths, names_a_file

EXPORT_MIXTURE = "latent_gmm.safetensors"  # the run's latent sampler for the exported weights, when fitted


def export_run(run_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT, out: str | Path | None = None,
               onnx: bool = False) -> Path:
    if onnx:
        from image_autoencoding.export_onnx import export_onnx, require_onnx

        require_onnx()  # before anything is written
    run_dir = Path(run_dir)
    # A checkpoint given as a file path carries its own config; a name (best, last, epoch_N) is the run's.
    trained = load_from_checkpoint(checkpoint) if names_a_file(checkpoint) else load_from_run(run_dir, checkpoint)
    config = trained.config

    def write_extras(folder: Path) -> None:
        mixture = load_run_mixture(run_dir, trained)
        if mixture is not None:
            mixture.save(folder / EXPORT_MIXTURE)
        if onnx:
            export_onnx(trained.model, config.data.image_size, folder)

    out = Path(out) if out is not None else RunPaths(run_dir).export
    return save_pretrained(trained.model, out, config.data, source=trained.source, epoch=trained.epoch,
                           step=trained.step, extras=write_extras)
