"""The run's TensorBoard event file (`tensorboard/`), one writer shared by the callbacks that log to it."""

from __future__ import annotations

from pathlib import Path

from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.trainer import Trainer


class TensorBoard(Callback):
    """Made on first use (importing TensorBoard costs ~1 s); closed at the end of `fit`. Give it to
    `fit` after the callbacks that write to it, so its teardown closes the file last."""

    def __init__(self, run_dir: Path):
        self.folder = RunPaths(run_dir).tensorboard
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder))
        return self._writer

    def teardown(self, trainer: Trainer) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
