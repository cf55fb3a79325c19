"""What a run records of its training as it goes: metrics.csv (one row per epoch), TensorBoard
scalars (per epoch, and every few steps the running loss and the objective's own terms) and the
console / train.log line of each epoch."""

from __future__ import annotations

import logging
from pathlib import Path

from image_autoencoding.runs.metrics_log import MetricsLog
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.runs.tensorboard import TensorBoard
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.trainer import Trainer

logger = logging.getLogger("image_autoencoding")


class EpochLog(Callback):
    def __init__(self, run_dir: Path, tensorboard: TensorBoard | None = None):
        self.metrics = MetricsLog(RunPaths(run_dir).metrics_csv)
        self.tensorboard = tensorboard

    def on_fit_start(self, trainer: Trainer) -> None:
        # A resumed run drops the rows written after the checkpoint it continues from.
        self.metrics.keep_epochs_up_to(trainer.epoch)

    def on_step_end(self, trainer: Trainer, batch, sums) -> None:
        progress = trainer.progress
        if self.tensorboard is not None and progress.running_loss_due(trainer.epoch_steps):
            writer = self.tensorboard.writer
            writer.add_scalar("train/step_encoder_loss", progress.running_encoder_loss(trainer.alpha), trainer.step)
            # The objective's own terms, each the mean over the steps since the last showing (the
            # device was just waited for, so reading them costs no second wait).
            for key, value in trainer.training_step.take_window_stats().items():
                writer.add_scalar(f"train/step_{key}", value, trainer.step)

    def on_epoch_end(self, trainer: Trainer, epoch: int, values) -> None:
        self.metrics.append({"epoch": epoch, "step": trainer.step, **values})
        if self.tensorboard is not None:
            writer = self.tensorboard.writer
            for key, value in values.items():
                writer.add_scalar(f"epoch/{key}", value, epoch)
            writer.flush()
        logger.info(
            "epoch %d/%d  loss %.2f (recon %.2f, kl %.2f)  valid SSIM %.4f  valid recon %.2f  %.0f s  %.0f img/s%s",
            epoch, trainer.cfg.epochs, values["train_loss"], values["train_recon"], values["train_kl"],
            values["valid_ssim"], values["valid_recon"], values["seconds"], values["images_per_s"],
            f"  (best {trainer.monitor.name} so far)" if trainer.monitor.improved else "",
        )
