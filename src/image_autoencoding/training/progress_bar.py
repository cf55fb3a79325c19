"""The console's progress bar of an epoch (tqdm), with the running loss and the images per second."""

from __future__ import annotations

from tqdm import tqdm

from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.trainer import Trainer

UPDATE_EVERY = 10  # steps between updates of the loss shown (each one waits for the device)


class ProgressBar(Callback):
    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.bar = tqdm(total=trainer.epoch_steps, initial=trainer.progress.steps, unit="step", leave=False,
                        desc=f"epoch {epoch}/{trainer.cfg.epochs}", dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, batch, sums) -> None:
        progress = trainer.progress
        self.bar.update(1)
        if progress.images and (progress.steps % UPDATE_EVERY == 0 or progress.steps == trainer.epoch_steps):
            recon, kl = progress.mean_losses()
            self.bar.set_postfix(loss=f"{recon + trainer.alpha * kl:.1f}",
                                 img_s=f"{progress.images / progress.seconds:.0f}")
        if progress.steps == trainer.epoch_steps:
            self.teardown(trainer)

    def teardown(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
