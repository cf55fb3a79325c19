"""`vae evaluate` and the end of training: load a run's model, score a whole split, draw the
pictures and write metrics.json and report.md into the run folder.

metrics.json, report.md and the latent pictures are the run's own figures: the whole validation
split scored by the `best` checkpoint, as training writes them at its end. Any other evaluation (the
train split, another checkpoint, --limit) writes under names of its own that say which (see
`output_suffix`), so it never replaces them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from image_autoencoding.atomic_files import atomic_write_or_explain
from image_autoencoding.config import Config, ModelConfig
from image_autoencoding.data.batches import Normalizer, evaluation_batches
from image_autoencoding.data.image_data import ImageData, load_image_data
from image_autoencoding.errors import UserError
from image_autoencoding.evaluation.evaluate import SplitEvaluation, evaluate_split
from image_autoencoding.evaluation.feature_networks import FeatureNetwork, MissingWeights, inception_weights
from image_autoencoding.evaluation.sample_metrics import K_NEIGHBOURS, MIN_IMAGES, sample_quality
from image_autoencoding.models.vae import VAE
from image_autoencoding.runs.checkpoint import CheckpointError
from image_autoencoding.runs.latent_sampler import fit_and_save, load_run_mixture
from image_autoencoding.runs.loading import TrainedModel, load_from_run, resolve_checkpoint
from image_autoencoding.runs.metrics_log import MetricsLog
from image_autoencoding.runtime import autocast_factory, resolve_device, resolve_precision
from image_autoencoding.sampling.latent_mixture import LatentMixture
from image_autoencoding.training import lr_schedule
from image_autoencoding.visualization import plots
from image_autoencoding.visualization.grids import save_sample_grid

logger = logging.getLogger("image_autoencoding")

INTERPOLATION_PAIRS, INTERPOLATION_STEPS = 6, 10
LATENT_SCATTER_IMAGES = 512  # the original's batch for its mu[0] / mu[1] scatter
SAMPLE_PICTURE_IMAGES = 64
METRIC_LABELS = {"ssim": "SSIM", "pcc": "PCC", "mse": "MSE", "psnr": "PSNR (dB)", "recon": "reconstruction loss",
                 "kl": "KL (nats)"}


# -- pictures -----------------------------------------------------------------------------------------


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


def _prior_and_mixture_samples(run_dir: Path, model: VAE, mixture: LatentMixture, normalize: Normalizer,
                               device: torch.device, suffix: str) -> dict[str, Path]:
    """Samples from the prior and from the latent mixture side by side: the same decoder, the same
    number of images."""
    pictures = {}
    for name, z in sample_latents(model, mixture, SAMPLE_PICTURE_IMAGES).items():
        path = run_dir / "images" / "samples" / f"samples_{name}{suffix}.png"
        save_sample_grid(decoded_images(model, normalize, z, device, SAMPLE_PICTURE_IMAGES), path)
        pictures[f"samples_{name}"] = path
    return pictures


def write_pictures(
    run_dir: Path, model: VAE, images: np.ndarray, labels: np.ndarray, class_names: list[str],
    evaluation: SplitEvaluation, normalize: Normalizer, device: torch.device, suffix: str = "", tsne_points: int = 1000,
) -> dict[str, Path]:
    latent = run_dir / "images" / "latent"
    model.eval()
    labels = np.asarray(labels[: evaluation.n])
    mu = evaluation.mu
    pictures = {
        "latent_dims": plots.save_latent_dims(mu, labels, class_names, latent / f"latent_mu_dims_0_1{suffix}.png",
                                              LATENT_SCATTER_IMAGES),
        "latent_pca": plots.save_latent_projection(mu, labels, class_names, latent / f"latent_pca{suffix}.png"),
        "kl_per_dimension": plots.save_kl_per_dimension(
            evaluation.kl_per_dim, latent / f"kl_per_dimension{suffix}.png"
        ),
    }
    if evaluation.n >= 10 and tsne_points > 0:
        pictures["latent_tsne"] = plots.save_latent_projection(
            mu, labels, class_names, latent / f"latent_tsne{suffix}.png", method="tsne", n=tsne_points
        )
    if len(images) >= 2:
        rows = _interpolation_rows(model, images, normalize, device)
        pictures["interpolation"] = plots.save_interpolation(rows, latent / f"interpolation{suffix}.png")
    metrics_csv = run_dir / "metrics.csv"
    if metrics_csv.is_file():
        rows_csv = MetricsLog(metrics_csv).rows()
        if rows_csv:
            curves = run_dir / "images" / "training_curves.png"
            pictures["training_curves"] = plots.save_training_curves(rows_csv, curves)
    return pictures


# -- metrics.json and report.md -----------------------------------------------------------------------


def output_suffix(run_dir: Path, checkpoint: Path, split: str, limit: int | None) -> str:
    """What an evaluation adds to metrics.json, report.md and the picture names: "" for the run's own
    figures, else `_train` for the train split, the checkpoint's name unless it is the one `best`
    means, and `_limit_N`, in that order: metrics_train_epoch_3_limit_100.json."""
    parts = [split] if split != "valid" else []
    try:
        default = resolve_checkpoint(run_dir, "best").resolve()
    except CheckpointError:  # neither best.pt nor last.pt: a checkpoint given by path is never the default
        default = None
    if checkpoint.resolve() != default:
        parts.append(checkpoint.stem)
    if limit is not None:
        parts.append(f"limit_{limit}")
    return "".join(f"_{part}" for part in parts)


def metrics_document(
    evaluation: SplitEvaluation, split: str, checkpoint: Path, epoch: int, limit: int | None = None
) -> dict[str, Any]:
    return {
        "split": split,
        "checkpoint": str(checkpoint),
        "epoch": epoch,
        "limit": limit,  # --limit N: only the first N images of the split were scored
        "images": evaluation.n,
        "metrics": {name: summary.as_dict() for name, summary in evaluation.summaries().items()},
        "original_first_batch_pcc": evaluation.original_batch_pcc,
        "active_latent_units": int((evaluation.kl_per_dim > plots.ACTIVE_UNIT_KL).sum()),
    }


def metrics_table(document: dict[str, Any]) -> str:
    lines = ["| metric | mean | std | 95% CI of the mean |", "|---|---|---|---|"]
    for name, s in document["metrics"].items():
        lines.append(f"| {METRIC_LABELS.get(name, name)} | {s['mean']:.4f} | {s['std']:.4f} | "
                     f"{s['ci95_low']:.4f} to {s['ci95_high']:.4f} |")
    return "\n".join(lines)


def sample_quality_table(scores: dict[str, dict[str, float]]) -> str:
    lines = ["| images (Inception-v3 features) | FID | KID | precision | recall |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['fid']:.2f} | {s['kid']:.4f} | {s['precision']:.3f} | {s['recall']:.3f} |"
              for name, s in scores.items()]
    return "\n".join(lines)


def sample_quality_section(run_dir: Path, quality: dict[str, Any] | None) -> list[str]:
    """The report's FID / KID table when `vae evaluate --fid` computed it; otherwise how to get it
    and, when the Inception-v3 weights are not on this machine, which file to put where."""
    if quality is not None:
        return [f"{quality['images']} images of each kind against as many of the split's "
                f"(`vae evaluate --fid`; torchvision's Inception-v3, so compare these FIDs with each other, "
                f"not with published ones):", "", sample_quality_table(quality["scores"])]
    command = f"`vae evaluate {run_dir} --fid`"
    try:
        weights = f"the Inception-v3 weights are at {inception_weights()}."
    except MissingWeights as missing:
        weights = f"not on this machine: {missing}."
    return [f"FID, KID, precision and recall of reconstructions, prior and mixture samples: not computed "
            f"during training (Inception-v3 on every validation image takes minutes on a CPU). {command} "
            f"computes them; {weights}"]


def describe_model(model: ModelConfig, image_size: int) -> str:
    if model.arch == "resnet":
        side = model.feature_side(image_size)
        latent = (f"spatial latent {model.latent_channels}x{side}x{side}" if model.latent_channels is not None
                  else f"latent {model.latent_dim}")
        return f"resnet, levels {model.resnet_channels}, {model.resnet_blocks} residual block(s) each, {latent}"
    return (f"seed (the original's), latent {model.latent_dim}, encoder {model.encoder_channels}, "
            f"decoder {model.decoder_channels}, FC {model.fc_dim}")


def write_report(
    run_dir: Path, config: Config, document: dict[str, Any], pictures: dict[str, Path], suffix: str = "",
    sample_quality: dict[str, Any] | None = None,
) -> Path:
    data, model, train = config.data, config.model, config.train
    limit = document.get("limit")
    subset = f" (the first {limit}: --limit {limit})" if limit is not None else ""
    rel = lambda p: p.relative_to(run_dir).as_posix()  # noqa: E731
    lines = [
        f"# Run {run_dir.name}",
        "",
        "## Configuration",
        "",
        f"- data: `{data.dataset}` at {data.image_size} px (centre crop {data.image_crop}), root `{data.data_root}`",
        f"- model: {describe_model(model, data.image_size)}",
        f"- training: {train.epochs} epochs, batch {train.batch_size}, {train.optimizer} "
        f"{lr_schedule.describe(train)}, alpha {train.alpha}, precision {train.precision}, seed {train.seed}",
        "",
        f"## Metrics: {document['split']} split, {document['images']} images{subset}, checkpoint "
        f"`{Path(document['checkpoint']).name}` (epoch {document['epoch']})",
        "",
        "Per image, then averaged (SSIM: 11x11 Gaussian window, sigma 1.5, images in [0, 1]).",
        "",
        metrics_table(document),
        "",
        f"The original project's figure, one PCC over its first batch flattened together: "
        f"{document['original_first_batch_pcc']:.4f} (not comparable with the per-image PCC above).",
        f"Active latent units (mean KL > {plots.ACTIVE_UNIT_KL} nats): {document['active_latent_units']} of "
        f"{model.latent_size(data.image_size)}.",
        "",
        "## Sample quality",
        "",
        *sample_quality_section(run_dir, sample_quality),
        "",
        "## Pictures",
        "",
    ]
    images, epoch = run_dir / "images", document["epoch"]
    mixture = document.get("latent_mixture") or {}
    mixture_note = f"{mixture.get('components')} components, fitted to training latents"
    # The pictures of the epoch whose weights the metrics above scored (best.pt's), not the last one's.
    figures = [
        (f"Validation reconstructions (inputs above outputs), epoch {epoch}",
         images / "valid" / f"reconstruction_epoch_{epoch:03d}.png"),
        (f"Training reconstructions, epoch {epoch}", images / "train" / f"reconstruction_epoch_{epoch:03d}.png"),
        (f"Samples from random latent vectors, epoch {epoch}", images / "samples" / f"samples_epoch_{epoch:03d}.png"),
        ("Samples from the prior N(0, I), seed 0", pictures.get("samples_prior")),
        (f"Samples from the latent mixture ({mixture_note}), seed 0", pictures.get("samples_gmm")),
        ("Training curves", pictures.get("training_curves")),
        ("Latent means, first two dimensions", pictures.get("latent_dims")),
        ("Latent means of training images, first two dimensions", pictures.get("latent_dims_train")),
        ("Latent means, PCA", pictures.get("latent_pca")),
        ("Latent means, t-SNE", pictures.get("latent_tsne")),
        ("Interpolations between validation images", pictures.get("interpolation")),
        ("KL per latent unit", pictures.get("kl_per_dimension")),
    ]
    for title, path in figures:
        if path is not None and path.is_file():
            lines += [f"### {title}", "", f"![{title}]({rel(path)})", ""]
    report = run_dir / f"report{suffix}.md"
    _write_text(report, "\n".join(lines))
    return report


def _write_text(path: Path, text: str) -> None:
    """Atomically: a full disk leaves the previous report or metrics file whole."""
    atomic_write_or_explain(path, lambda handle: handle.write(text), binary=False)


def evaluate_and_write(
    run_dir: Path, trained: TrainedModel, split: str = "valid", limit: int | None = None,
    data: ImageData | None = None, device: str | None = None, sample_quality: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Score a run's trained model (runs/loading.py) on a whole split (or its first `limit`
    images); write the metrics document, the pictures and a report (with `sample_quality`, the
    document of write_sample_quality, when given), under names from `output_suffix`. Returns the
    document and the files written."""
    config = trained.config
    data = data if data is not None else load_image_data(config.data, progress=False)
    chosen = data.valid if split == "valid" else data.train
    torch_device = resolve_device(device or config.train.device)
    model = trained.model.to(torch_device)
    normalize = Normalizer(config.data, torch_device)
    autocast = autocast_factory(torch_device, resolve_precision(config.train.precision, torch_device))
    evaluation = evaluate_split(model, chosen.images, normalize, torch_device, config.train.batch_size, autocast, limit)
    suffix = output_suffix(run_dir, trained.source, split, limit)
    document = metrics_document(evaluation, split, trained.source, trained.epoch, limit)
    mixture = load_run_mixture(run_dir, trained)
    if mixture is not None:
        document["latent_mixture"] = {"components": mixture.components, "bic": mixture.info.get("bic")}
    metrics_json = run_dir / f"metrics{suffix}.json"
    _write_text(metrics_json, json.dumps(document, indent=2))
    pictures = write_pictures(run_dir, model, chosen.images, chosen.labels, data.class_names, evaluation, normalize,
                              torch_device, suffix, config.train.tsne_points)
    if mixture is not None:
        pictures.update(_prior_and_mixture_samples(run_dir, model, mixture, normalize, torch_device, suffix))
    if split == "valid" and len(data.train.images):
        # The original drew the first two latent dimensions for the training images as well.
        train = evaluate_split(model, data.train.images, normalize, torch_device, config.train.batch_size, autocast,
                               LATENT_SCATTER_IMAGES)
        pictures["latent_dims_train"] = plots.save_latent_dims(
            train.mu, np.asarray(data.train.labels[: train.n]), data.class_names,
            run_dir / "images" / "latent" / f"latent_mu_dims_0_1_train{suffix}.png", split="training")
    report = write_report(run_dir, config, document, pictures, suffix, sample_quality)
    return document, [metrics_json, report, *pictures.values()]


@torch.no_grad()
def write_sample_quality(run_dir: Path, trained: TrainedModel, network: FeatureNetwork, split: str = "valid",
                         limit: int | None = None, data: ImageData | None = None, device: str | None = None,
                         ) -> tuple[dict[str, Any], Path]:
    """FID, KID, precision and recall against the split's images (its first `limit`) of: their
    reconstructions, as many prior samples and, when the run has a latent mixture for these weights,
    as many mixture samples (seed 0). Written to sample_quality<suffix>.json."""
    config = trained.config
    data = data if data is not None else load_image_data(config.data, progress=False)
    images = (data.valid if split == "valid" else data.train).images
    images = images[:limit] if limit is not None else images
    if len(images) < MIN_IMAGES:  # before any image goes through a network
        given = f"--limit {limit}: " if limit is not None else ""
        raise UserError(f"FID / KID / precision / recall need at least {MIN_IMAGES} images (precision and recall "
                        f"use each image's {K_NEIGHBOURS} nearest neighbours); {given}the {split} split gives "
                        f"{len(images)}")
    torch_device = resolve_device(device or config.train.device)
    model = trained.model.to(torch_device).eval()
    normalize = Normalizer(config.data, torch_device)
    real, recon = [], []
    with torch.no_grad():
        for x in evaluation_batches(images, config.train.batch_size, torch_device, normalize):
            real.append(normalize.to_unit(x).cpu())
            recon.append(normalize.to_unit(model.reconstruct(x)).cpu())
    n = sum(len(batch) for batch in real)
    generated = {"reconstructions": torch.cat(recon)}
    names = {"prior": "prior_samples", "gmm": "mixture_samples"}
    for name, z in sample_latents(model, load_run_mixture(run_dir, trained), n).items():
        generated[names[name]] = decoded_images(model, normalize, z, torch_device, config.train.batch_size)
    document = {"split": split, "images": n, "checkpoint": str(trained.source), "epoch": trained.epoch,
                "scores": sample_quality(network, torch.cat(real), generated)}
    path = run_dir / f"sample_quality{output_suffix(run_dir, trained.source, split, limit)}.json"
    _write_text(path, json.dumps(document, indent=2))
    return document, path


def final_report(run_dir: Path, data: ImageData, device: str) -> dict[str, Any]:
    """The end of a finished training run: the latent mixture fitted to `best`'s training latents,
    then `best` on the whole validation split, written as the run's own metrics.json, pictures and
    report.md, and logged."""
    trained = load_from_run(run_dir, "best")
    config = trained.config
    fit_and_save(run_dir, trained, data.train.images, resolve_device(device), config.train.batch_size,
                 config.train.seed)
    document, _ = evaluate_and_write(run_dir, trained, data=data, device=device)
    logger.info(
        "validation metrics of %s (epoch %d, %d images), written to metrics.json and report.md:\n%s",
        Path(document["checkpoint"]).name, document["epoch"], document["images"], metrics_table(document),
    )
    return document
