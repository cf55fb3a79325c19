"""The pictures an evaluation draws into the run folder (under RunPaths' names, with the
evaluation's suffix): latent scatter plots and projections, interpolations, KL per latent unit, the
training curves, and samples of the prior and of the latent mixture."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch

from image_autoencoding.data.batches import Normalizer
from image_autoencoding.evaluation.evaluate import SplitEvaluation
from image_autoencoding.models.vae import VAE
from image_autoencoding.runs.metrics_log import MetricsLog
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.sampling.latent_mixture import LatentMixture
from image_autoencoding.visualization import plots
from image_autoencoding.visualization.grids import save_sample_grid

INTERPOLATION_PAIRS, INTERPOLATION_STEPS = 6, 10
LATENT_SCATTER_IMAGES = 512  # the original's batch for its mu[0] / mu[1] scatter
SAMPLE_PICTURE_IMAGES = 64


@torch.no_grad()
def _interpolation_rows(model: VAE, images: np.ndarray, normalize: Normalizer, device: torch.device) -> torch.Tensor:
    count = min(2 * INTERPOLATION_PAIRS, len(images)) // 2 * 2
    x = normalize(torch.from_numpy(np.array(images[:count])).to(device))
    mu = model.encoder(x).mode()
    path = plots.interpolate_latents(mu[0::2], mu[1::2], INTERPOLATION_STEPS)
    decoded = model.decoder(path.flatten(0, 1))
    return normalize.to_unit(decoded).view(count // 2, INTERPOLATION_STEPS, *decoded.shape[1:]).cpu()


def sample_latents(model: VAE, mixture: LatentMixture | None, n: int) -> dict[str, torch.Tensor]:
    """n latents from the prior and, when there is one, from the latent mixture: seed 0 for both, so
    every picture and score of a run (and benchmarks/quality.py) compares the same draws."""
    latents = {"prior": model.prior_latents(n, torch.Generator().manual_seed(0))}
    if mixture is not None:
        latents["gmm"] = mixture.sample(n, torch.Generator().manual_seed(0))
    return latents


@torch.no_grad()
def decoded_images(model: VAE, normalize: Normalizer, z: torch.Tensor, device: torch.device, batch_size: int,
                   autocast: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """Images in [0, 1], float32 on the CPU, decoded batch by batch (under `autocast`)."""
    with autocast():
        return torch.cat([normalize.to_unit(model.decoder(chunk.to(device))).float().cpu()
                          for chunk in z.split(batch_size)])


def prior_and_mixture_samples(run_dir: Path, model: VAE, mixture: LatentMixture, normalize: Normalizer,
                              device: torch.device, suffix: str) -> dict[str, Path]:
    """Samples from the prior and from the latent mixture side by side: the same decoder, the same
    number of images."""
    pictures = {}
    for name, z in sample_latents(model, mixture, SAMPLE_PICTURE_IMAGES).items():
        path = RunPaths(run_dir).sampler_picture(name, suffix)
        save_sample_grid(decoded_images(model, normalize, z, device, SAMPLE_PICTURE_IMAGES), path)
        pictures[f"samples_{name}"] = path
    return pictures


def write_pictures(
    run_dir: Path, model: VAE, images: np.ndarray, labels: np.ndarray, class_names: list[str],
    evaluation: SplitEvaluation, normalize: Normalizer, device: torch.device, suffix: str = "", tsne_points: int = 1000,
) -> dict[str, Path]:
    paths = RunPaths(run_dir)
    model.eval()
    labels = np.asarray(labels[: evaluation.n])
    mu = evaluation.mu
    pictures = {
        "latent_dims": plots.save_latent_dims(
            mu, labels, class_names, paths.latent_picture("latent_mu_dims_0_1", suffix), LATENT_SCATTER_IMAGES
        ),
        "latent_pca": plots.save_latent_projection(mu, labels, class_names, paths.latent_picture("latent_pca", suffix)),
        "kl_per_dimension": plots.save_kl_per_dimension(
            evaluation.kl_per_dim, paths.latent_picture("kl_per_dimension", suffix)
        ),
    }
    if evaluation.n >= 10 and tsne_points > 0:
        pictures["latent_tsne"] = plots.save_latent_projection(
            mu, labels, class_names, paths.latent_picture("latent_tsne", suffix), method="tsne", n=tsne_points
        )
    if len(images) >= 2:
        rows = _interpolation_rows(model, images, normalize, device)
        pictures["interpolation"] = plots.save_interpolation(rows, paths.latent_picture("interpolation", suffix))
    if paths.metrics_csv.is_file():
        rows_csv = MetricsLog(paths.metrics_csv).rows()
        if rows_csv:
            pictures["training_curves"] = plots.save_training_curves(rows_csv, paths.training_curves)
    return pictures


def training_latents_picture(run_dir: Path, train: SplitEvaluation, labels: np.ndarray, class_names: list[str],
                             suffix: str) -> Path:
    """The first two latent dimensions of training images, as the original drew them too."""
    path = RunPaths(run_dir).latent_picture("latent_mu_dims_0_1_train", suffix)
    return plots.save_latent_dims(train.mu, np.asarray(labels[: train.n]), class_names, path, split="training")
