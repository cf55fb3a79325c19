"""`vae export RUN --diffusers OUT`: a model.arch=autoencoder-kl run as a folder plain diffusers opens,
`diffusers.AutoencoderKL.from_pretrained(OUT)`, for a latent diffusion model to train on:

    <out>/config.json                         diffusers' (with scaling_factor and shift_factor)
    <out>/diffusion_pytorch_model.safetensors diffusers' (the encoder's and decoder's weights)
    <out>/image_autoencoding_export.json      where the weights came from, and the latent statistics

scaling_factor and shift_factor make the latents a diffusion model sees zero-mean and of unit
variance, `(z - shift_factor) * scaling_factor` as diffusers' SD3 and FLUX pipelines apply them
(pipelines without a shift, Stable Diffusion 1/2's, apply `z * scaling_factor`). As latent diffusion
computes it (Rombach et al. 2022, section 4.3.2 and appendix D.1; CompVis/latent-diffusion,
LatentDiffusion.on_train_batch_start with scale_by_std: `1 / z.flatten().std()` of posterior
*samples*): scaling_factor = 1 / the standard deviation of every float of posterior samples of the
training images, shift_factor = their mean. Latent diffusion took one batch; here up to
STATISTICS_IMAGES training images (drawn with train.seed, as the latent mixture draws its own),
whose estimate of the std is within a fraction of a percent.

The folder is built beside <out> and replaces it whole; only an earlier such export or an empty
folder is replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from image_autoencoding.atomic_files import atomic_write, folder_written_whole
from image_autoencoding.data.batches import Normalizer, evaluation_batches
from image_autoencoding.data.image_data import load_image_data
from image_autoencoding.errors import UserError
from image_autoencoding.models.autoencoder_kl import to_diffusers
from image_autoencoding.models.pretrained import TrainedModel
from image_autoencoding.runtime import resolve_device

# Enough for the std of millions of latent floats to be known to well under 1%; at most a minute of
# encoding for a Stable-Diffusion-sized model on one GPU.
STATISTICS_IMAGES = 4096
PROVENANCE = "image_autoencoding_export.json"
FORMAT = "image-autoencoding-diffusers-export"


@torch.no_grad()
def latent_statistics(trained: TrainedModel, images: np.ndarray, device: torch.device, batch_size: int,
                      seed: int) -> dict[str, Any]:
    """Mean and std of every float of one posterior sample per training image (up to STATISTICS_IMAGES
    of them, drawn with `seed`; the noise from `seed` too)."""
    chosen = np.arange(len(images))
    if len(images) > STATISTICS_IMAGES:
        chosen = np.sort(np.random.default_rng(seed).choice(len(images), STATISTICS_IMAGES, replace=False))
    model = trained.model.to(device).eval()
    normalize = Normalizer(trained.config.data, device)
    generator = torch.Generator(device).manual_seed(seed)
    total = total_sq = 0.0
    count = 0
    for x in evaluation_batches(images[chosen], batch_size, device, normalize):
        z = model.encoder(x).sample(generator).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
    if count < 2:
        raise UserError("the training split has no images to measure the latents' scale on")
    mean = total / count
    std = max((total_sq - count * mean * mean) / (count - 1), 0.0) ** 0.5
    return {"images": len(chosen), "of": "posterior samples", "seed": seed, "mean": mean, "std": std}


def export_diffusers(trained: TrainedModel, out: str | Path) -> Path:
    """Write `trained` (a model.arch=autoencoder-kl model) as a diffusers AutoencoderKL folder `out`."""
    config = trained.config
    if config.model.arch != "autoencoder-kl":
        raise UserError(f"only model.arch autoencoder-kl exports to diffusers (this run's is {config.model.arch}); "
                        "vae export without --diffusers writes any run")
    destination = Path(out)
    _check_replaceable(destination)
    data = load_image_data(config.data, progress=False)
    # A GPU when there is one: a run's saved device may be one this machine does not have.
    statistics = latent_statistics(trained, data.train.images, resolve_device("auto"), config.train.batch_size,
                                   config.train.seed)
    if not statistics["std"] > 0:
        raise UserError(f"the latents of {trained.source} do not vary (std 0): no scaling_factor makes them unit")
    autoencoder = to_diffusers(trained.model.encoder, trained.model.decoder, config.model, config.data.image_size,
                               scaling_factor=1.0 / statistics["std"], shift_factor=statistics["mean"])
    provenance = {"format": FORMAT, "source_checkpoint": str(trained.source), "epoch": trained.epoch,
                  "step": trained.step, "latent_statistics": statistics,
                  "scaling_factor": "1 / latent_statistics.std", "shift_factor": "latent_statistics.mean"}
    with folder_written_whole(destination, "the export") as folder:
        autoencoder.save_pretrained(folder, safe_serialization=True)
        text = json.dumps(provenance, indent=2) + "\n"
        atomic_write(folder / PROVENANCE, lambda handle: handle.write(text), binary=False)
    return destination


def _check_replaceable(out: Path) -> None:
    """Only an earlier diffusers export (it holds PROVENANCE) or an empty folder is replaced: a
    downloaded model or any other folder must never be deleted."""
    if out.is_dir() and ((out / PROVENANCE).is_file() or not any(out.iterdir())):
        return
    if out.exists() or out.is_symlink():
        kind = "a folder that is not a diffusers export of this package" if out.is_dir() else "not a folder"
        raise UserError(f"'{out}' is {kind}; --diffusers replaces only an earlier such export or an empty folder: "
                        "choose another folder")
