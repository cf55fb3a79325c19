"""Shared by the benchmarks: JPEG sets cut from real photographs, and the original project's
per-epoch data pipeline (PIL decode + torchvision transforms in a DataLoader)."""

from __future__ import annotations

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
    """`count` JPEGs cut at random places and scales from the photographs (kept between runs)."""
    paths = [folder / f"{i:06d}.jpg" for i in range(count)]
    if all(path.exists() for path in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = source_photographs()
    for path in paths:
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
        crop.save(path, quality=90)
    return paths


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
