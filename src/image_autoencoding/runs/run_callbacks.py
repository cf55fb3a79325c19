"""The callbacks that make a training run's folder (see runs/): what `vae train` gives its trainer
on the rank that writes."""

from __future__ import annotations

from pathlib import Path

from image_autoencoding.config import Config
from image_autoencoding.data.image_data import ImageData
from image_autoencoding.runs.checkpointing import Checkpointing
from image_autoencoding.runs.epoch_log import EpochLog
from image_autoencoding.runs.epoch_pictures import EpochPictures
from image_autoencoding.runs.tensorboard import TensorBoard
from image_autoencoding.training.callbacks import Callback


def run_folder_callbacks(run_dir: Path, config: Config, data: ImageData) -> list[Callback]:
    """In the order their files are written at an epoch's end: metrics.csv and TensorBoard,
    pictures, then checkpoints (a crash between them leaves a row that a resume from the earlier
    checkpoint drops); the TensorBoard file last, so it is closed after the others wrote to it."""
    tensorboard = TensorBoard(run_dir)
    return [EpochLog(run_dir, tensorboard), EpochPictures(run_dir, config, data, tensorboard),
            Checkpointing(run_dir, config.train), tensorboard]
