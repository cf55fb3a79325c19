"""A run's ex-post latent sampler (sampling/latent_mixture.py): fitted to one checkpoint's posterior
means of the training images, saved beside it in the run folder as latent_gmm_<checkpoint>.safetensors,
and found again for that checkpoint only."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from image_autoencoding.data.batches import Normalizer, evaluation_batches
from image_autoencoding.models.vae import VAE
from image_autoencoding.runs.loading import TrainedModel
from image_autoencoding.sampling.latent_mixture import FIT_POINTS, LatentMixture, fit_latent_mixture

logger = logging.getLogger("image_autoencoding")


def mixture_path(run_dir: Path, checkpoint: Path) -> Path:
    return Path(run_dir) / f"latent_gmm_{checkpoint.stem}.safetensors"


def _fitted_to(trained: TrainedModel) -> dict:
    return {"epoch": trained.epoch, "step": trained.step}


@torch.no_grad()
def fit_model_mixture(model: VAE, normalize: Normalizer, images: np.ndarray, device: torch.device, batch_size: int,
                      seed: int = 0) -> LatentMixture:
    """Encode (up to FIT_POINTS of, drawn with `seed`) the training images through the posterior
    mean and fit the mixture to them."""
    chosen = np.arange(len(images))
    if len(images) > FIT_POINTS:
        chosen = np.sort(np.random.default_rng(seed).choice(len(images), FIT_POINTS, replace=False))
    model = model.to(device).eval()
    means = [model.encoder(x).mean.cpu() for x in evaluation_batches(images[chosen], batch_size, device, normalize)]
    mixture = fit_latent_mixture(torch.cat(means), seed=seed)
    mixture.info.update(training_images=len(images))
    return mixture


def fit_run_mixture(trained: TrainedModel, images: np.ndarray, device: torch.device, batch_size: int,
                    seed: int = 0) -> LatentMixture:
    """A trained model's mixture (fit_model_mixture), recording the checkpoint it was fitted to."""
    normalize = Normalizer(trained.config.data, device)
    mixture = fit_model_mixture(trained.model, normalize, images, device, batch_size, seed)
    mixture.info.update(checkpoint=_fitted_to(trained))
    return mixture


def fit_and_save(run_dir: Path, trained: TrainedModel, images: np.ndarray, device: torch.device,
                 batch_size: int, seed: int = 0) -> LatentMixture:
    mixture = fit_run_mixture(trained, images, device, batch_size, seed)
    path = mixture_path(run_dir, trained.source)
    mixture.save(path)
    info = mixture.info
    logger.info("latent sampler: a %d-component Gaussian mixture (lowest BIC of %s) fitted to %d training "
                "latents in %.1f s, %s", info["components"], "/".join(info["bic"]), info["points"],
                info["seconds"], path.name)
    return mixture


def load_run_mixture(run_dir: Path, trained: TrainedModel) -> LatentMixture | None:
    """The run's mixture for exactly this checkpoint's weights, or None (none fitted, or fitted to
    other weights, e.g. a best.pt that has changed since)."""
    path = mixture_path(run_dir, trained.source)
    if not path.is_file():
        return None
    mixture = LatentMixture.load(path)
    return mixture if mixture.info.get("checkpoint") == _fitted_to(trained) else None
