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

from image_autoencoding.atomic_files import atomic_write
from image_autoencoding.errors import UserError

# Components tried; the one with the lowest BIC (Schwarz 1978) on the fitted points is kept. Ghosh
# et al. used 10 full-covariance components for MNIST and CIFAR; BIC keeps fewer when the latents
# do not support them.
COMPONENT_CHOICES = (1, 2, 5, 10, 20)
# When the lowest BIC is at the grid's largest choice, the latents support more components than the grid
# offers (the default recipe's latents chose 20): K keeps doubling while BIC still falls, while each
# component can own more points than its dimension (with fewer, its covariance is singular but for
# REG_COVAR), and up to MAX_COMPONENTS. A component costs about a second to fit on 20,000 latents of
# dimension 128 (the measurement and its command: docs/design.md, "Evaluation, samples and pictures"):
# there the points allow 40 and 80 (20,000 / 129 = 155), a few minutes more at most, and only where
# BIC asks for them.
MAX_COMPONENTS = 160
# sklearn's fit needs two points even for one component: one point has no spread to estimate.
MIN_POINTS = 2
# Latents the mixture is fitted on, drawn at random (seeded) from the training split: scikit-learn's
# full-covariance EM costs grow with the points, and beyond this the fit changes little
# (benchmarks/latent_mixture_fit.py measures both).
FIT_POINTS = 20_000
# Added to each covariance's diagonal: keeps a component on a collapsed latent unit (variance ~0)
# invertible. Small against the posterior means' spread (order 1).
REG_COVAR = 1e-5


class MixtureFileError(UserError):
    """A latent mixture file that cannot be read or does not hold a valid mixture for the model."""


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
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        # One (n_k, D) @ (D, D) product per component, not a batched L[component] @ eps, which
        # gathers an n x D x D tensor (6.6 GB for 100,000 samples at D = 128). The random draws are
        # the batched form's (the same calls on the generator), so a seed gives the same vectors up
        # to float rounding (another matmul kernel), and exactly the same ones on every run.
        z = torch.empty_like(eps)
        for k in component.unique().tolist():
            chosen = (component == k).nonzero().squeeze(1)
            z[chosen] = self.means[k] + temperature * (eps[chosen] @ self.cholesky[k].T)
        return z

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {"weights": self.weights, "means": self.means, "cholesky": self.cholesky}
        return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"info": json.dumps(self.info)})

    def save(self, path: Path) -> None:
        """Written with atomic_files.atomic_write: a full disk or a kill leaves the previous file (or
        none), never part of one, and the file gets the umask's mode like the rest of the run. Raises
        OSError."""
        blob = self.to_bytes()
        atomic_write(path, lambda handle: handle.write(blob))

    @classmethod
    def load(cls, path: Path, latent_size: int) -> LatentMixture:
        """The mixture in `path`, checked to be one for latent vectors of `latent_size` floats:
        MixtureFileError (naming the file) for a file that cannot be read or holds anything else,
        so that a damaged file never samples NaN (black images) or crashes inside torch."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
                problem = _shape_problem(shapes, latent_size)
                if problem:
                    raise MixtureFileError(f"latent mixture '{path}' is not valid: {problem}")
                tensors = {key: handle.get_tensor(key) for key in ("weights", "means", "cholesky")}
                metadata = handle.metadata() or {}
        except (OSError, SafetensorError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise MixtureFileError(f"latent mixture '{path}' cannot be read: {reason}") from None
        try:
            info = json.loads(metadata.get("info", "{}"))
        except ValueError:
            info = None
        problem = "its info is not a JSON object" if not isinstance(info, dict) else _value_problem(**tensors)
        if problem:
            raise MixtureFileError(f"latent mixture '{path}' is not valid: {problem}")
        return cls(tensors["weights"].float(), tensors["means"].float(), tensors["cholesky"].float(), info)


def _shape_problem(shapes: dict[str, tuple[int, ...]], latent_size: int) -> str | None:
    missing = [key for key in ("weights", "means", "cholesky") if key not in shapes]
    if missing:
        return f"no {', '.join(missing)} array"
    k = shapes["weights"][0] if len(shapes["weights"]) == 1 else None
    expected = {"weights": (k,), "means": (k, latent_size), "cholesky": (k, latent_size, latent_size)}
    if not k or any(shapes[key] != shape for key, shape in expected.items()):
        found = ", ".join(f"{key} {shapes[key]}" for key in expected)
        return (f"expected weights (K,), means (K, {latent_size}), cholesky (K, {latent_size}, {latent_size}) with "
                f"K >= 1 for this model's {latent_size}-float latents, found {found}")
    return None


def _value_problem(weights: Tensor, means: Tensor, cholesky: Tensor) -> str | None:
    if not all(t.is_floating_point() for t in (weights, means, cholesky)):
        return "expected floating-point arrays"
    weights, means, cholesky = weights.double(), means.double(), cholesky.double()
    if not all(torch.isfinite(t).all() for t in (weights, means, cholesky)):
        return "it holds NaN or infinite values"
    # Float32 weights fitted by sklearn sum to 1 within ~1e-7; this only catches other numbers.
    if (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-3:
        return f"the weights must be >= 0 and sum to 1 (they sum to {float(weights.sum()):.6g})"
    if (cholesky.triu(1) != 0).any() or (cholesky.diagonal(dim1=1, dim2=2) <= 0).any():
        return "each cholesky factor must be lower triangular with a positive diagonal"
    return None


def fit_latent_mixture(
    latents: np.ndarray | Tensor, seed: int = 0, choices: tuple[int, ...] = COMPONENT_CHOICES,
    max_points: int = FIT_POINTS,
) -> LatentMixture:
    """Full-covariance Gaussian mixtures with each of `choices` components on (up to `max_points`
    of) `latents` (N, D); the one with the lowest BIC. Choices above the number of points are
    skipped; when the lowest BIC is at the largest choice, K doubles beyond it while BIC still falls
    (see MAX_COMPONENTS)."""
    from sklearn.mixture import GaussianMixture

    start = time.perf_counter()
    points = np.asarray(latents.cpu() if isinstance(latents, Tensor) else latents, dtype=np.float64)
    if len(points) < MIN_POINTS:
        raise UserError(f"the latent mixture needs at least {MIN_POINTS} training latents to fit a covariance "
                        f"to; there {'is' if len(points) == 1 else 'are'} {len(points)}")
    if len(points) > max_points:
        points = points[np.random.default_rng(seed).choice(len(points), max_points, replace=False)]
    fitted, bic = {}, {}

    def fit(k: int) -> None:
        mixture = GaussianMixture(k, covariance_type="full", reg_covar=REG_COVAR, init_params="k-means++",
                                  random_state=seed, max_iter=200)
        fitted[k] = mixture.fit(points)
        bic[k] = float(mixture.bic(points))

    for k in [k for k in choices if k <= len(points)] or [1]:
        fit(k)
    # Doubling beyond the grid while BIC falls: see MAX_COMPONENTS.
    most = min(MAX_COMPONENTS, len(points) // (points.shape[1] + 1))
    while min(bic, key=bic.get) == max(bic) and 2 * max(bic) <= most:
        fit(2 * max(bic))
    best = fitted[min(bic, key=bic.get)]
    info = {"components": int(best.n_components), "bic": {str(k): v for k, v in bic.items()},
            "points": len(points), "latents": len(latents), "seconds": round(time.perf_counter() - start, 2)}
    return LatentMixture(
        torch.from_numpy(best.weights_).float(), torch.from_numpy(best.means_).float(),
        torch.from_numpy(np.linalg.cholesky(best.covariances_)).float(), info,
    )
