"""`vae evaluate` and the end of training: load a run's model, score a whole split, and write the
metrics document (runs/metrics_document.py), the pictures (runs/evaluation_pictures.py) and
report.md (runs/report_markdown.py) into the run folder, each file atomically.

metrics.json, report.md and the latent pictures are the run's own figures: the whole validation
split scored by the `best` checkpoint, as training writes them at its end. Any other evaluation (the
train split, another checkpoint, --limit) writes under names of its own that say which (see
`output_suffix`), so it never replaces them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from image_autoencoding.atomic_files import atomic_write_or_explain
from image_autoencoding.config import Config
from image_autoencoding.data.batches import Normalizer, evaluation_batches
from image_autoencoding.data.image_data import ImageData, load_image_data
from image_autoencoding.errors import UserError
from image_autoencoding.evaluation.evaluate import evaluate_split
from image_autoencoding.evaluation.feature_networks import FeatureNetwork
from image_autoencoding.evaluation.lpips import lpips_metric
from image_autoencoding.evaluation.sample_metrics import K_NEIGHBOURS, MIN_IMAGES, sample_quality
from image_autoencoding.runs.checkpoint import CheckpointError
from image_autoencoding.runs.evaluation_pictures import (
    LATENT_SCATTER_IMAGES,
    decoded_images,
    prior_and_mixture_samples,
    sample_latents,
    training_latents_picture,
    write_pictures,
)
from image_autoencoding.runs.latent_sampler import fit_and_save, load_run_mixture
from image_autoencoding.runs.loading import TrainedModel, load_from_run, resolve_checkpoint
from image_autoencoding.runs.metrics_document import document_json, metrics_document, sample_quality_document
from image_autoencoding.runs.report_markdown import metrics_table, report_markdown
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.runtime import autocast_factory, resolve_device, resolve_precision

logger = logging.getLogger("image_autoencoding")


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


def write_report(
    run_dir: Path, config: Config, document: dict[str, Any], pictures: dict[str, Path], suffix: str = "",
    sample_quality: dict[str, Any] | None = None,
) -> Path:
    """report<suffix>.md of `document`, written atomically."""
    report = RunPaths(run_dir).report(suffix)
    _write_text(report, report_markdown(run_dir, config, document, pictures, sample_quality))
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
    lpips = lpips_metric(config.data.image_size, config.train.lpips_vgg_weights)  # where the VGG16 weights are
    evaluation = evaluate_split(model, chosen.images, normalize, torch_device, config.train.batch_size, autocast, limit,
                                lpips.to(torch_device) if lpips is not None else None)
    suffix = output_suffix(run_dir, trained.source, split, limit)
    mixture = load_run_mixture(run_dir, trained)
    document = metrics_document(evaluation, split, trained.source, trained.epoch, limit, mixture)
    metrics_json = RunPaths(run_dir).metrics_json(suffix)
    _write_text(metrics_json, document_json(document))
    pictures = write_pictures(run_dir, model, chosen.images, chosen.labels, data.class_names, evaluation, normalize,
                              torch_device, suffix, config.train.tsne_points)
    if mixture is not None:
        pictures.update(prior_and_mixture_samples(run_dir, model, mixture, normalize, torch_device, suffix))
    if split == "valid" and len(data.train.images):
        # The original drew the first two latent dimensions for the training images as well.
        train = evaluate_split(model, data.train.images, normalize, torch_device, config.train.batch_size, autocast,
                               LATENT_SCATTER_IMAGES)
        pictures["latent_dims_train"] = training_latents_picture(run_dir, train, data.train.labels, data.class_names,
                                                                 suffix)
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
    document = sample_quality_document(split, n, trained.source, trained.epoch,
                                       sample_quality(network, torch.cat(real), generated))
    path = RunPaths(run_dir).sample_quality(output_suffix(run_dir, trained.source, split, limit))
    _write_text(path, document_json(document))
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
