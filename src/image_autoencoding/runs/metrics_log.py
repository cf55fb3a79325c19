"""metrics.csv: one row per epoch, never a duplicate epoch, never a half-written row.

Columns: epoch, step (steps done at its end), train_loss (the encoder's objective per image,
train_recon + alpha x train_kl, over the epoch's steps), train_recon (0.5 x summed squared error
per image), train_kl (nats per image), images_per_s, seconds, lr (the encoder's and decoder's at the
epoch's end), skipped_steps (non-finite), the objective's own terms over the epoch
(TrainingStep.take_stats: vae-gan d_real, d_recon; ldm pixel, lpips, nll, logvar, disc_factor and,
once the discriminator runs, g_loss, d_weight, disc_loss, logits_real, logits_fake), then
valid_<metric> (means over the validation images: ssim, pcc, mse, psnr, recon, kl).

Every change rewrites the whole file atomically (see atomic_files): a crash or a full disk
mid-write leaves the previous file as it was. With one row per epoch the rewrite
costs nothing worth saving.
"""

from __future__ import annotations

import csv
from pathlib import Path

from image_autoencoding.atomic_files import atomic_write
from image_autoencoding.errors import UserError


class MetricsWriteError(UserError):
    """metrics.csv could not be written (full disk, no permission); the previous file is intact."""


# Columns of files written before the training columns were named for what they are: read under
# today's names, so a resumed run's file keeps one column per value. decoder_loss repeated recon.
RENAMED = {"encoder_loss": "train_loss", "recon": "train_recon", "kl": "train_kl"}
DROPPED = ("decoder_loss",)


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="", encoding="utf-8") as handle:
            return [{RENAMED.get(key, key): value for key, value in row.items() if key not in DROPPED}
                    for row in csv.DictReader(handle)]

    def keep_epochs_up_to(self, epoch: int) -> None:
        """On resume: drop rows written after the checkpoint we continue from."""
        rows = [row for row in self.rows() if int(row["epoch"]) <= epoch]
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        self._write(list(rows[0].keys()), rows)

    def append(self, row: dict[str, float | int]) -> None:
        formatted = {key: _format(value) for key, value in row.items()}
        existing = self.rows()
        # A column added since the file was started (e.g. after a resume) widens the header.
        fields = list(dict.fromkeys([*(existing[0].keys() if existing else []), *formatted.keys()]))
        self._write(fields, [*existing, formatted])

    def _write(self, fields: list[str], rows: list[dict[str, str]]) -> None:
        def write(handle) -> None:
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)

        try:
            atomic_write(self.path, write, binary=False)
        except OSError as exc:
            raise MetricsWriteError(
                f"cannot write '{self.path}': {exc.strerror or exc}; it still holds the earlier epochs; "
                f"free space, then continue with: vae train --resume {self.path.parent}"
            ) from None


def _format(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"
