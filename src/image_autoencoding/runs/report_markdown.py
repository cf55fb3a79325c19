"""report.md: a metrics document (runs/metrics_document.py) and the run's pictures rendered as
Markdown for people. Reads nothing but which pictures exist; writes nothing (runs/report.py does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from image_autoencoding.config import Config, ModelConfig
from image_autoencoding.evaluation.feature_networks import MissingWeights, inception_weights
from image_autoencoding.evaluation.lpips import lpips_unavailable
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.training import lr_schedule
from image_autoencoding.visualization.plots import ACTIVE_UNIT_KL

METRIC_LABELS = {"ssim": "SSIM", "pcc": "PCC", "mse": "MSE", "psnr": "PSNR (dB)", "recon": "reconstruction loss",
                 "kl": "KL (nats)", "lpips": "LPIPS (VGG16)"}


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


def lpips_note(document: dict[str, Any], config: Config) -> list[str]:
    """Why the metrics have no LPIPS row, when they have none."""
    if "lpips" in document["metrics"]:
        return []
    why = lpips_unavailable(config.data.image_size, config.train.lpips_vgg_weights)
    return [f"LPIPS (VGG16, Zhang et al. 2018): not computed: {why}", ""] if why else []


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
    if model.arch == "autoencoder-kl":
        side = model.feature_side(image_size)
        start = f", started from {model.init_from}" if model.init_from else ""
        return (f"autoencoder-kl (diffusers' AutoencoderKL), levels {model.block_out_channels}, "
                f"{model.layers_per_block} residual block(s) each, spatial latent {model.latent_channels}x{side}x{side}"
                f"{start}")
    return (f"seed (the original's), latent {model.latent_dim}, encoder {model.encoder_channels}, "
            f"decoder {model.decoder_channels}, FC {model.fc_dim}")


def report_markdown(
    run_dir: Path, config: Config, document: dict[str, Any], pictures: dict[str, Path],
    sample_quality: dict[str, Any] | None = None,
) -> str:
    """The report of `document` (with `sample_quality`, a sample quality document, when computed):
    configuration, metrics, and those of `pictures` and of the scored epoch's pictures that exist."""
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
        *lpips_note(document, config),
        f"The original project's figure, one PCC over its first batch flattened together: "
        f"{document['original_first_batch_pcc']:.4f} (not comparable with the per-image PCC above).",
        f"Active latent units (mean KL > {ACTIVE_UNIT_KL} nats): {document['active_latent_units']} of "
        f"{model.latent_size(data.image_size)}.",
        "",
        "## Sample quality",
        "",
        *sample_quality_section(run_dir, sample_quality),
        "",
        "## Pictures",
        "",
    ]
    paths, epoch = RunPaths(run_dir), document["epoch"]
    mixture = document.get("latent_mixture") or {}
    mixture_note = f"{mixture.get('components')} components, fitted to training latents"
    # The pictures of the epoch whose weights the metrics above scored (best.pt's), not the last one's.
    figures = [
        (f"Validation reconstructions (inputs above outputs), epoch {epoch}",
         paths.reconstruction_picture("valid", epoch)),
        (f"Training reconstructions, epoch {epoch}", paths.reconstruction_picture("train", epoch)),
        (f"Samples from random latent vectors, epoch {epoch}", paths.samples_picture(epoch)),
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
    return "\n".join(lines)
