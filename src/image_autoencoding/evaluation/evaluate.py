"""One deterministic pass of a model over a whole split: per-image metrics, losses and the latent
means that the latent-space pictures need. Reads the model and the cached pixels, never the
trainer's internals, so training and `vae evaluate` share it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from image_autoencoding.data.batches import Normalizer, evaluation_batches
from image_autoencoding.evaluation.lpips import PerceptualDistance
from image_autoencoding.evaluation.metrics import BOUNDS, METRICS, Summary, batch_pcc, summarize
from image_autoencoding.models.vae import VAE, loss_terms


@dataclass
class SplitEvaluation:
    per_image: dict[str, Tensor]  # "ssim", "pcc", "mse", "psnr", "recon", "kl" [, "lpips"] -> (N,)
    mu: Tensor  # (N, latent_size) posterior means, for latent plots
    kl_per_dim: Tensor  # (latent_size,) mean KL of each latent unit over the split
    original_batch_pcc: float  # the original's figure: one PCC over its first batch, flattened

    @property
    def n(self) -> int:
        return len(self.mu)

    def summaries(self) -> dict[str, Summary]:
        return {name: summarize(values, BOUNDS.get(name)) for name, values in self.per_image.items()}

    def means(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{name}": float(values.mean()) for name, values in self.per_image.items()}


@torch.no_grad()
def evaluate_split(
    model: VAE,
    images: np.ndarray,
    normalize: Normalizer,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager] | None = None,
    limit: int | None = None,
    lpips: PerceptualDistance | None = None,
) -> SplitEvaluation:
    """Reconstruct each image through the posterior mean (no sampling noise), in order, no flip.
    With `lpips` (on `device`), each image's LPIPS too."""
    was_training = model.training
    model.eval()
    images = images[:limit] if limit is not None else images
    values: dict[str, list[Tensor]] = {name: [] for name in (*METRICS, "recon", "kl", *(["lpips"] if lpips else []))}
    mus, kl_dims = [], []
    first_batch_pcc = float("nan")
    for x in evaluation_batches(images, batch_size, device, normalize):
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            posterior = model.encoder(x)
            x_hat = model.decoder(posterior.mode())
        recon, kl = loss_terms(x, x_hat, posterior)
        truth, output = normalize.to_unit(x), normalize.to_unit(x_hat)
        for name, metric in METRICS.items():
            values[name].append(metric(truth, output))
        values["recon"].append(recon.double().cpu())
        values["kl"].append(kl.double().cpu())
        if lpips is not None:  # LPIPS takes images in [-1, 1]
            values["lpips"].append(lpips(truth * 2 - 1, output * 2 - 1).double().cpu())
        mus.append(posterior.mean.float().cpu())
        kl_dims.append(posterior.kl_per_dim().float().sum(dim=0).cpu())
        if not mus[1:]:
            first_batch_pcc = batch_pcc(truth, output)
    model.train(was_training)
    mu = torch.cat(mus)
    return SplitEvaluation(
        per_image={name: torch.cat(parts) for name, parts in values.items()},
        mu=mu,
        kl_per_dim=torch.stack(kl_dims).sum(dim=0) / len(mu),
        original_batch_pcc=first_batch_pcc,
    )
