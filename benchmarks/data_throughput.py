"""Data pipeline throughput: the original per-epoch pipeline against the decode-once cache.

    python benchmarks/data_throughput.py [--images 2000] [--workers 2] [--json out.json]

Builds two JPEG sets from real photographs (the Debian `mate-backgrounds` / `gnome-backgrounds`
pictures when installed, plus scikit-image's bundled photos): one shaped like Food-101 (longest side
512) and one like COCO (640x480). On each it measures, in one run:

1. the original pipeline: every epoch, PIL decode + torchvision CenterCrop(375), Resize(64),
   RandomHorizontalFlip, ToTensor, grey-to-RGB, Normalize in a DataLoader with `--workers` processes;
2. cache preparation (`vae prepare`): decode once, with the same number of worker processes;
3. one epoch read from the cache: shuffled batches, flip and normalisation (what training does).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe
from photo_sets import COCO_SHAPE, FOOD101_SHAPE, make_jpeg_set, original_loader

BATCH_SIZE = 64


def time_original_epoch(paths: list[Path], workers: int, image_crop: int, image_size: int) -> float:
    loader = original_loader(paths, BATCH_SIZE, workers, image_crop, image_size)
    start = time.perf_counter()
    seen = sum(batch.shape[0] for batch in loader)
    assert seen == len(paths)
    return time.perf_counter() - start


def time_cache_build(paths: list[Path], cache_dir: Path, workers: int, image_crop: int, image_size: int):
    from image_autoencoding.config import load_config
    from image_autoencoding.data.cache import open_or_build
    from image_autoencoding.data.sources import FileSplit

    cfg = load_config(None, [
        "data.dataset=folder", f"data.data_root={paths[0].parent}", f"data.cache_dir={cache_dir}",
        f"data.num_workers={workers}", f"data.image_crop={image_crop}", f"data.image_size={image_size}",
    ]).data
    split = FileSplit(paths[0].parent, paths, np.full(len(paths), -1, dtype=np.int64))
    start = time.perf_counter()
    cached = open_or_build(split, cfg, "train", progress=False)
    seconds = time.perf_counter() - start
    assert not cached.reused and len(cached.images) == len(paths)
    return seconds, cached.images, cfg


def time_cache_epoch(images: np.ndarray, cfg) -> float:
    from image_autoencoding.data.batches import Normalizer, training_batches

    device = torch.device("cpu")
    start = time.perf_counter()
    seen = 0
    for x in training_batches(images, BATCH_SIZE, seed=0, epoch=1, device=device, normalize=Normalizer(cfg, device)):
        seen += x.shape[0]
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs per set")
    parser.add_argument("--workers", type=int, default=2, help="decode processes for both pipelines")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--image-crop", type=int, default=375)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "vae-data-throughput")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results = []
    for name, shape in (("food-101", FOOD101_SHAPE), ("coco", COCO_SHAPE)):
        paths = make_jpeg_set(args.work_dir / name, args.images, shape, seed=len(name))
        original = time_original_epoch(paths, args.workers, args.image_crop, args.image_size)
        cache_dir = args.work_dir / f"cache-{name}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        build, images, cfg = time_cache_build(paths, cache_dir, args.workers, args.image_crop, args.image_size)
        epoch = time_cache_epoch(images, cfg)
        n = len(paths)
        results.append({
            "set": name, "images": n,
            "original_epoch_img_s": n / original, "cache_prepare_img_s": n / build, "cache_epoch_img_s": n / epoch,
            "prepare_vs_original": original / build, "cache_epoch_vs_original": original / epoch,
        })

    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"machine: {describe()}; {args.workers} decode workers; {args.image_size} px; command: {command}")
    header = ("set", "images", "original epoch img/s", "prepare img/s", "cache epoch img/s", "prepare x",
              "cache epoch x")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        print(f"| {r['set']} | {r['images']} | {r['original_epoch_img_s']:.0f} | {r['cache_prepare_img_s']:.0f} | "
              f"{r['cache_epoch_img_s']:.0f} | {r['prepare_vs_original']:.1f}x | {r['cache_epoch_vs_original']:.0f}x |")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
