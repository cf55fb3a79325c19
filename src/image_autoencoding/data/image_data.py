"""The pixels a run trains and evaluates on: a dataset's source, decoded once through the cache
(or in memory for the bundled digits), as uint8 arrays with labels and the list of skipped files."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from image_autoencoding.config import DataConfig
from image_autoencoding.data.batches import steps_per_epoch
from image_autoencoding.data.cache import BadFile, Verification, open_or_build, preprocess_in_memory, write_bad_files
from image_autoencoding.data.sources import find_source
from image_autoencoding.errors import UserError

logger = logging.getLogger("image_autoencoding")


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8; memory-mapped for cached datasets
    labels: np.ndarray  # (N,) int64, -1 where unlabelled
    cache_dir: Path | None = None
    verification: Verification | None = None  # what load_image_data(verify=True) found


@dataclass
class ImageData:
    train: Split
    valid: Split
    class_names: list[str]
    bad_files: list[BadFile] = field(default_factory=list)

    def write_bad_files(self, path: Path) -> None:
        """bad_files.csv (path, reason) in the run folder, when anything was skipped."""
        if self.bad_files:
            write_bad_files(self.bad_files, path)


def load_image_data(cfg: DataConfig, progress: bool = True, verify: bool = False) -> ImageData:
    """Checks the dataset layout first (one-line error, nothing built), then opens or builds each
    split's cache. verify: compare the files' content hashes too, not only sizes and mtimes."""
    source = find_source(cfg)
    if source.in_memory:
        return ImageData(
            train=Split(preprocess_in_memory(source.train, cfg), source.train.labels),
            valid=Split(preprocess_in_memory(source.valid, cfg), source.valid.labels),
            class_names=source.class_names,
        )
    splits, bad = {}, []
    for name, split in (("train", source.train), ("valid", source.valid)):
        cached = open_or_build(split, cfg, name, progress=progress, verify=verify)
        if cached.reused:
            logger.info("using cache %s (%d images)", cached.directory, len(cached.labels))
        splits[name] = Split(cached.images, cached.labels, cached.directory, cached.verification)
        bad += cached.bad_files
    if bad:
        logger.warning("skipped %d unreadable files (listed in bad_files.csv)", len(bad))
    return ImageData(splits["train"], splits["valid"], source.class_names, bad)


def check_split_sizes(data: ImageData, dataset: str, batch_size: int, world_size: int = 1) -> None:
    """Refuses splits too small to train on, before a run folder is made: a train split of no full
    step trains nothing for every epoch (and the latent mixture is then fit on nothing), and an empty
    validation split leaves nothing to score or choose best.pt by."""
    n_train, n_valid = len(data.train.labels), len(data.valid.labels)
    if steps_per_epoch(n_train, batch_size, None, world_size) == 0:
        if world_size > 1:
            need = (f"one global batch of train.batch_size={batch_size} x {world_size} processes = "
                    f"{batch_size * world_size}, as every process takes a full share of each step; "
                    "lower train.batch_size or add images")
        else:
            need = "2, as a batch of one image cannot be normalised; add images"
        raise UserError(f"the {dataset} train split has {_images(n_train)}; training needs at least {need}")
    if n_valid == 0:
        raise UserError(f"the {dataset} validation split has {_images(n_valid)}; evaluation needs at least 1")


def _images(count: int) -> str:
    return f"{count} usable image" if count == 1 else f"{count} usable images"
