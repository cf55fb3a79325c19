"""Figures of a run (matplotlib, Agg backend: no display needed): the latent space coloured by
class, latent interpolations, per-dimension KL and training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from image_autoencoding.visualization.grids import _enlarge  # noqa: E402

MAX_LEGEND_CLASSES = 20  # Food-101's 101 names would cover the plot; beyond this a colour bar
ACTIVE_UNIT_KL = 0.01  # nats; below this a latent unit carries (almost) no information


def _colours(labels: np.ndarray, class_names: list[str]):
    """One colour per class present (tab10 / tab20 / a continuous map), grey for unlabelled."""
    classes = sorted(set(labels.tolist()) - {-1})
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo")
    span = max(len(classes) - 1, 1)
    return {c: cmap(i if len(classes) <= 20 else i / span) for i, c in enumerate(classes)}


def _scatter(ax, points: np.ndarray, labels: np.ndarray, class_names: list[str]) -> None:
    colours = _colours(labels, class_names)
    if not colours:
        ax.scatter(points[:, 0], points[:, 1], s=8, color="tab:blue", alpha=0.7, linewidths=0)
        return
    for label, colour in colours.items():
        chosen = labels == label
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        ax.scatter(points[chosen, 0], points[chosen, 1], s=8, color=colour, alpha=0.8, linewidths=0, label=name)
    if (labels == -1).any():
        chosen = labels == -1
        ax.scatter(points[chosen, 0], points[chosen, 1], s=8, color="0.6", alpha=0.6, linewidths=0, label="unlabelled")
    if len(colours) <= MAX_LEGEND_CLASSES:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2, frameon=False)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_latent_dims(
    mu: Tensor, labels: np.ndarray, class_names: list[str], path: Path, n: int = 512, split: str = "validation"
) -> Path:
    """The original's picture: the first two latent dimensions of mu on a batch of `n` images."""
    points, labels = mu[:n, :2].numpy(), labels[:n]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    _scatter(ax, points, labels, class_names)
    ax.set(title=f"Latent means, dimensions 1 and 2 ({len(points)} {split} images)",
           xlabel="mu[0]", ylabel="mu[1]")
    return _save(fig, path)


def save_latent_projection(
    mu: Tensor, labels: np.ndarray, class_names: list[str], path: Path, method: str = "pca", n: int = 2000
) -> Path:
    """All latent dimensions projected to 2-D: PCA (linear, fast) or t-SNE (local neighbourhoods)."""
    data = mu[:n].double().numpy()
    labels = labels[:n]
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=0)
        points = pca.fit_transform(data)
        explained = pca.explained_variance_ratio_
        axes = (f"PC 1 ({explained[0]:.0%} of variance)", f"PC 2 ({explained[1]:.0%})")
        title = f"Latent means, PCA of all {data.shape[1]} dimensions"
    else:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(data) - 1) / 3)  # t-SNE needs perplexity < number of points
        points = TSNE(n_components=2, init="pca", random_state=0, perplexity=perplexity).fit_transform(data)
        axes = ("t-SNE 1", "t-SNE 2")
        title = f"Latent means, t-SNE of all {data.shape[1]} dimensions"
    fig, ax = plt.subplots(figsize=(6.5, 5))
    _scatter(ax, points, labels, class_names)
    ax.set(title=f"{title} ({len(data)} validation images)", xlabel=axes[0], ylabel=axes[1])
    return _save(fig, path)


def save_interpolation(rows: Tensor, path: Path) -> Path:
    """rows: (pairs, steps, 3, H, W) in [0, 1]; each row goes from one image to another through
    the latent space (first and last tiles are the decoded endpoints)."""
    pairs, steps = rows.shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(_enlarge(rows.flatten(0, 1).float()), path, nrow=steps, padding=2, pad_value=1.0)
    return path


def save_kl_per_dimension(kl_per_dim: Tensor, path: Path) -> Path:
    """Mean KL of each latent unit, largest first: units near zero are unused (posterior collapse)."""
    values = kl_per_dim.double().numpy()
    order = np.argsort(values)[::-1]
    active = int((values > ACTIVE_UNIT_KL).sum())
    fig, ax = plt.subplots(figsize=(max(6.0, len(values) * 0.06), 4))
    colours = ["tab:blue" if v > ACTIVE_UNIT_KL else "0.7" for v in values[order]]
    ax.bar(np.arange(len(values)), values[order], color=colours)
    ax.axhline(ACTIVE_UNIT_KL, color="tab:red", linewidth=0.8, linestyle="--", label=f"{ACTIVE_UNIT_KL} nats")
    ax.set_yscale("symlog", linthresh=ACTIVE_UNIT_KL)
    ax.set(title=f"KL per latent unit (sorted): {active} of {len(values)} active",
           xlabel="latent unit (sorted by KL)", ylabel="mean KL (nats)")
    ax.legend(frameon=False)
    return _save(fig, path)


def save_training_curves(rows: list[dict[str, str]], path: Path) -> Path:
    """Losses and validation metrics against epoch, from metrics.csv rows."""
    def series(key: str) -> tuple[list[int], list[float]]:
        pairs = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, (losses, quality) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_recon", "train reconstruction"), ("valid_recon", "valid reconstruction"),
                       ("train_kl", "train KL"), ("valid_kl", "valid KL")):
        epochs, values = series(key)
        if epochs:
            losses.plot(epochs, values, marker="o", markersize=3, label=label)
    # Log scale: the first epochs' losses are often 10-1000x the later ones, which flattens every
    # later epoch on a linear axis.
    drawn = [value for line in losses.get_lines() for value in line.get_ydata()]
    losses.set_yscale("log" if drawn and min(drawn) > 0 else "symlog")
    losses.set(title="Losses per image (log scale)", xlabel="epoch", ylabel="nats (summed over pixels / units)")
    losses.legend(frameon=False)
    for key, label in (("valid_ssim", "SSIM"), ("valid_pcc", "PCC")):
        epochs, values = series(key)
        if epochs:
            quality.plot(epochs, values, marker="o", markersize=3, label=label)
    quality.set(title="Validation metrics (mean per image)", xlabel="epoch", ylabel="score")
    quality.legend(frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def interpolate_latents(a: Tensor, b: Tensor, steps: int) -> Tensor:
    """(pairs, latent) endpoints -> (pairs, steps, latent), linear in latent space."""
    weights = torch.linspace(0, 1, steps, device=a.device).view(1, steps, 1)
    return a.unsqueeze(1) * (1 - weights) + b.unsqueeze(1) * weights
