"""Distances between two sets of image features, for judging samples against real images: the
Fréchet distance (FID when the features are Inception-v3's, Heusel et al. 2017), the kernel distance
(KID, Bińkowski et al. 2018) and precision / recall of k-NN manifolds (Kynkäänniemi et al. 2019).

They take features, not images: the same functions score Inception features, a domain classifier's
penultimate layer or a tiny network in tests. torchmetrics implements FID and KID only around its own
image pipeline and feature modules, and has no k-NN precision / recall; these are the formulas of
the papers, in float64, checked against a direct scipy computation in tests/test_sample_metrics.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from image_autoencoding.evaluation.feature_networks import FeatureNetwork

BLOCK = 1024  # rows of a distance matrix computed at once
K_NEIGHBOURS = 3  # precision / recall: each manifold ball reaches its point's 3rd nearest neighbour (the paper's k)
MIN_IMAGES = K_NEIGHBOURS + 1  # of each set: a point and its k nearest others


def _as_double(features: Tensor) -> Tensor:
    features = torch.as_tensor(features).double()
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"expected features of shape (N >= 2, D), got {tuple(features.shape)}")
    return features


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)) between Gaussians fitted to two feature
    sets (N, D). The trace of (S_r S_f)^(1/2) is that of (S_r^(1/2) S_f S_r^(1/2))^(1/2), a symmetric
    matrix, so no complex square root (scipy.linalg.sqrtm's) is needed."""
    real, fake = _as_double(real), _as_double(fake)
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T).reshape(real.shape[1], -1), torch.cov(fake.T).reshape(fake.shape[1], -1)
    root_r = _sqrt_psd(cov_r)
    cross = _sqrt_psd(root_r @ cov_f @ root_r).trace()
    return float((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * cross)


def kernel_distance(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: the unbiased squared MMD with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3,
    averaged over `subsets` random subsets of `subset_size` of each set (fewer if a set is smaller),
    as Bińkowski et al. and torch-fidelity compute it. Returns (mean, standard deviation)."""
    real, fake = _as_double(real), _as_double(fake)
    size = min(subset_size, len(real), len(fake))
    generator = torch.Generator().manual_seed(seed)
    dim = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=generator)[:size]]
        y = fake[torch.randperm(len(fake), generator=generator)[:size]]
        k_xx, k_yy, k_xy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off_diagonal = size * (size - 1)
        mmd = ((k_xx.sum() - k_xx.diagonal().sum()) / off_diagonal + (k_yy.sum() - k_yy.diagonal().sum())
               / off_diagonal - 2 * k_xy.mean())
        values.append(float(mmd))
    spread = torch.tensor(values, dtype=torch.float64)
    return float(spread.mean()), float(spread.std()) if len(values) > 1 else 0.0


def precision_recall(real: Tensor, fake: Tensor, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: each set's manifold is the union of balls around its points, each
    reaching that point's k-th nearest neighbour in its own set. Precision: the share of fake
    points inside the real manifold (samples look like data); recall: the share of real points
    inside the fake manifold (samples cover the data)."""
    real, fake = _as_double(real), _as_double(fake)
    if k >= min(len(real), len(fake)):
        raise ValueError(f"k={k} needs more than {k} points in each set")

    # In row blocks: the distance matrix of 50,000 points would be 20 GB at once.
    def radii(points: Tensor) -> Tensor:
        # The k-th nearest other point: index k of the sorted distances (index 0 is the point itself).
        return torch.cat([torch.cdist(block, points).kthvalue(k + 1, dim=1).values for block in points.split(BLOCK)])

    def covered(points: Tensor, manifold: Tensor, manifold_radii: Tensor) -> float:
        inside = [(torch.cdist(block, manifold) <= manifold_radii.unsqueeze(0)).any(dim=1)
                  for block in points.split(BLOCK)]
        return float(torch.cat(inside).double().mean())

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def sample_quality(network: FeatureNetwork, real: Tensor, generated: dict[str, Tensor], k: int = K_NEIGHBOURS
                   ) -> dict[str, dict[str, float]]:
    """For each set of generated images (in [0, 1], N x 3 x H x W): FID, KID (mean, std),
    precision and recall against `real` images, all in the feature space of `network`."""
    real_features = network.features(real)
    scores = {}
    for name, images in generated.items():
        features = network.features(images)
        kid, kid_std = kernel_distance(real_features, features)
        precision, recall = precision_recall(real_features, features, k)
        scores[name] = {"fid": frechet_distance(real_features, features), "kid": kid, "kid_std": kid_std,
                        "precision": precision, "recall": recall, "images": len(features)}
    return scores
