"""What an evaluation measured, as the plain data written to metrics<suffix>.json (and
sample_quality<suffix>.json): numbers and names only, nothing about how report.md shows them
(runs/report_markdown.py renders this document)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from image_autoencoding.evaluation.evaluate import SplitEvaluation
from image_autoencoding.sampling.latent_mixture import LatentMixture
from image_autoencoding.visualization.plots import ACTIVE_UNIT_KL


def metrics_document(
    evaluation: SplitEvaluation, split: str, checkpoint: Path, epoch: int, limit: int | None = None,
    mixture: LatentMixture | None = None,
) -> dict[str, Any]:
    """The scores of one checkpoint on a split: per-image metrics (mean, std, 95% CI), the original
    project's first-batch PCC, the active latent units, and the run's latent mixture when it has one
    for these weights."""
    document = {
        "split": split,
        "checkpoint": str(checkpoint),
        "epoch": epoch,
        "limit": limit,  # --limit N: only the first N images of the split were scored
        "images": evaluation.n,
        "metrics": {name: summary.as_dict() for name, summary in evaluation.summaries().items()},
        "original_first_batch_pcc": evaluation.original_batch_pcc,
        "active_latent_units": int((evaluation.kl_per_dim > ACTIVE_UNIT_KL).sum()),
    }
    if mixture is not None:
        document["latent_mixture"] = {"components": mixture.components, "bic": mixture.info.get("bic")}
    return document


def sample_quality_document(split: str, images: int, checkpoint: Path, epoch: int,
                            scores: dict[str, dict[str, float]]) -> dict[str, Any]:
    """FID, KID, precision and recall of each kind of generated images against `images` of the split."""
    return {"split": split, "images": images, "checkpoint": str(checkpoint), "epoch": epoch, "scores": scores}


def document_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2)
