"""The console's progress bar of an epoch (tqdm), with the running loss and the images per second."""

from __future__ import annotations

from tqdm import tqdm

from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.trainer import Trainer


class ProgressBar(Callback):
    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.bar = tqdm(total=trainer.epoch_steps, initial=trainer.progress.steps, unit="step", leave=False,
                        desc=f"epoch {epoch}/{trainer.cfg.epochs}", dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, batch, sums) -> None:
        progress = trainer.progress
        self.bar.update(1)
        if progress.running_loss_due(trainer.epoch_steps):
            self.bar.set_postfix(loss=f"{progress.running_encoder_loss(trainer.alpha):.1f}",
                                 img_s=f"{progress.images_per_second():.0f}")
        if progress.steps == trainer.epoch_steps:
            self.teardown(trainer)

    def teardown(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
