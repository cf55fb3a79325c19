"""Shared by the benchmarks: JPEG sets cut from real photographs, and the original project's
per-epoch data pipeline (PIL decode + torchvision transforms in a DataLoader)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FOOD101_SHAPE = None  # random aspect, longest side 512
COCO_SHAPE = (640, 480)


def source_photographs() -> list[Image.Image]:
    photos = []
    for pattern in ("mate/nature/*.jpg", "mate/abstract/Elephants.jpg", "mate/desktop/GreenTraditional.jpg"):
        for path in sorted(Path("/usr/share/backgrounds").glob(pattern)):
            photos.append(Image.open(path).convert("RGB"))
    from skimage import data

    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
        photos.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
    return photos


def make_jpeg_set(folder: Path, count: int, shape: tuple[int, int] | None, seed: int) -> list[Path]:
    """`count` JPEGs cut at random places and scales from the photographs (kept between runs), written
    by one process per core; image i depends only on (seed, i), not on the number of processes."""
    paths = [folder / f"{i:06d}.jpg" for i in range(count)]
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    if not missing:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    workers = min(os.cpu_count() or 1, max(1, len(missing) // 200))
    chunks = [missing[k::workers] for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_jpegs, [folder] * workers, chunks, [shape] * workers, [seed] * workers))
    return paths


def _write_jpegs(folder: Path, indices: list[int], shape: tuple[int, int] | None, seed: int) -> None:
    photos = source_photographs()
    for i in indices:
        rng = np.random.default_rng([seed, i])
        photo = photos[rng.integers(len(photos))]
        if shape is None:  # Food-101: longest side 512, aspect between 3:4 and 4:3
            long, short = 512, int(rng.integers(384, 513))
            width, height = (long, short) if rng.random() < 0.7 else (short, long)
        else:
            width, height = shape
        smallest = max(width / photo.width, height / photo.height)  # > 1: the photo must be enlarged
        scale = rng.uniform(smallest, max(smallest, 1.0))
        box_w, box_h = min(photo.width, round(width / scale)), min(photo.height, round(height / scale))
        left = int(rng.integers(0, photo.width - box_w + 1))
        top = int(rng.integers(0, photo.height - box_h + 1))
        crop = photo.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + box_w, top + box_h))
        crop.save(folder / f"{i:06d}.jpg", quality=90)


class OriginalDataset(torch.utils.data.Dataset):
    """The original's CocoDataloader + transforms: open and transform every image, every epoch."""

    def __init__(self, paths: list[Path], image_crop: int, image_size: int):
        from torchvision import transforms

        self.paths = paths
        self.transform = transforms.Compose([
            transforms.CenterCrop(image_crop),
            transforms.Resize(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Lambda(lambda x: x.expand(3, -1, -1) if x.shape[0] == 1 else x),  # GreyToColor
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(Image.open(self.paths[index]))


def original_loader(
    paths: list[Path], batch_size: int, workers: int, image_crop: int = 375, image_size: int = 64,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        OriginalDataset(paths, image_crop, image_size), batch_size=batch_size, shuffle=True, num_workers=workers,
        drop_last=drop_last,
    )
