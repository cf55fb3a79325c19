"""The pictures of each epoch in the run folder: reconstructions of fixed training and validation
images, and decoded samples of fixed latent vectors, so pictures of different epochs compare."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from image_autoencoding.config import Config
from image_autoencoding.data.image_data import ImageData
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.runs.tensorboard import TensorBoard
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.trainer import Trainer
from image_autoencoding.visualization.grids import save_reconstruction_grid, save_sample_grid

logger = logging.getLogger("image_autoencoding")


class EpochPictures(Callback):
    """images/{train,valid}/reconstruction_epoch_NNN.png and images/samples/samples_epoch_NNN.png,
    and the same grids in TensorBoard's images tab when given `tensorboard`."""

    def __init__(self, run_dir: Path, config: Config, data: ImageData, tensorboard: TensorBoard | None = None):
        self.paths = RunPaths(run_dir)
        self.tensorboard = tensorboard
        cfg = config.train
        self.fixed = {"train": np.array(data.train.images[: cfg.grid_images]),
                      "valid": np.array(data.valid.images[: cfg.grid_images])}
        generator = torch.Generator().manual_seed(cfg.seed + 7)  # not the run's: training draws the same either way
        self.latents = torch.randn(cfg.sample_images, config.model.latent_size(config.data.image_size),
                                   generator=generator)

    def on_epoch_end(self, trainer: Trainer, epoch: int, values) -> None:
        """Pictures are derived from the weights and can be made again: a full disk here is reported
        and training goes on (the checkpoint or metrics.csv write of the epoch reports it as an
        error if the disk stays full)."""
        try:
            self.write(trainer, epoch)
        except OSError as exc:
            logger.warning("could not write the pictures of epoch %d: %s; training continues", epoch, exc)

    @torch.no_grad()
    def write(self, trainer: Trainer, epoch: int) -> None:
        model, normalize = trainer.training_step.inference_model, trainer.normalize
        model.eval()
        for split, pixels in self.fixed.items():
            x = normalize(torch.from_numpy(pixels).to(trainer.device))
            with trainer.autocast():
                x_hat = model.reconstruct(x)
            path = self.paths.reconstruction_picture(split, epoch)
            save_reconstruction_grid(normalize.to_unit(x), normalize.to_unit(x_hat), path)
            self._to_tensorboard(f"reconstructions/{split}", path, epoch)
        with trainer.autocast():
            samples = model.decoder(self.latents.to(trainer.device))
        path = self.paths.samples_picture(epoch)
        save_sample_grid(normalize.to_unit(samples), path)
        self._to_tensorboard("samples", path, epoch)

    def _to_tensorboard(self, tag: str, path: Path, epoch: int) -> None:
        """The grid as saved (inputs above outputs, enlarged), so TensorBoard shows the PNG's picture."""
        if self.tensorboard is not None:
            with Image.open(path) as grid:
                self.tensorboard.writer.add_image(tag, np.asarray(grid.convert("RGB")), epoch, dataformats="HWC")
