"""Ex-post density estimation (Ghosh et al. 2020, "From Variational to Deterministic Autoencoders",
section 4): a Gaussian mixture fitted to the posterior means of the training images after training,
sampled in place of the prior N(0, I).

A VAE's aggregate posterior does not fill N(0, I): the more weight the reconstruction gets (our
default alpha 0.1 against the original's 1), the more of the prior's mass falls where no training
image was encoded, and decoding it gives the grey, blurred "samples from the prior are noise". A
mixture fitted to where the training images actually are samples from there instead; the weights
are the same, so reconstructions do not change.

Stored as plain arrays (safetensors, no pickle): the mixture weights, the component means and the
lower Cholesky factor of each component's covariance.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# Components tried; the one with the lowest BIC (Schwarz 1978) on the fitted points is kept. Ghosh
# et al. used 10 full-covariance components for MNIST and CIFAR; BIC keeps fewer when the latents
# do not support them.
COMPONENT_CHOICES = (1, 2, 5, 10, 20)
# Latents the mixture is fitted on, drawn at random (seeded) from the training split: scikit-learn's
# full-covariance EM costs grow with the points, and beyond this the fit changes little
# (benchmarks/latent_mixture_fit.py measures both).
FIT_POINTS = 20_000
# Added to each covariance's diagonal: keeps a component on a collapsed latent unit (variance ~0)
# invertible. Small against the posterior means' spread (order 1).
REG_COVAR = 1e-5


@dataclass
class LatentMixture:
    weights: Tensor  # (K,) summing to 1
    means: Tensor  # (K, D)
    cholesky: Tensor  # (K, D, D), lower triangular: covariance_k = L_k L_k^T
    info: dict = field(default_factory=dict)  # how it was fitted: BIC per K, points, seconds, checkpoint

    @property
    def components(self) -> int:
        return len(self.weights)

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """n latent vectors: a component drawn by weight, then mean + temperature * L eps. On the CPU,
        so the same generator gives the same vectors everywhere."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], 1, generator=generator, dtype=self.means.dtype)
        return self.means[component] + temperature * (self.cholesky[component] @ eps).squeeze(-1)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"weights": self.weights, "means": self.means, "cholesky": self.cholesky}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"info": json.dumps(self.info)})

    @classmethod
    def load(cls, path: Path) -> LatentMixture:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in ("weights", "means", "cholesky")}
            info = json.loads((handle.metadata() or {}).get("info", "{}"))
        return cls(tensors["weights"], tensors["means"], tensors["cholesky"], info)


def fit_latent_mixture(
    latents: np.ndarray | Tensor, seed: int = 0, choices: tuple[int, ...] = COMPONENT_CHOICES,
    max_points: int = FIT_POINTS,
) -> LatentMixture:
    """Full-covariance Gaussian mixtures with each of `choices` components on (up to `max_points`
    of) `latents` (N, D); the one with the lowest BIC. Choices above the number of points are skipped."""
    from sklearn.mixture import GaussianMixture

    start = time.perf_counter()
    points = np.asarray(latents.cpu() if isinstance(latents, Tensor) else latents, dtype=np.float64)
    if len(points) > max_points:
        points = points[np.random.default_rng(seed).choice(len(points), max_points, replace=False)]
    candidates = [k for k in choices if k <= len(points)] or [1]
    fitted, bic = {}, {}
    for k in candidates:
        mixture = GaussianMixture(k, covariance_type="full", reg_covar=REG_COVAR, init_params="k-means++",
                                  random_state=seed, max_iter=200)
        fitted[k] = mixture.fit(points)
        bic[k] = float(mixture.bic(points))
    best = fitted[min(bic, key=bic.get)]
    info = {"components": int(best.n_components), "bic": {str(k): v for k, v in bic.items()},
            "points": len(points), "latents": len(latents), "seconds": round(time.perf_counter() - start, 2)}
    return LatentMixture(
        torch.from_numpy(best.weights_).float(), torch.from_numpy(best.means_).float(),
        torch.from_numpy(np.linalg.cholesky(best.covariances_)).float(), info,
    )
