"""The decode-once cache: every image of a split opened, converted, cropped and resized once, into
a uint8 memory-mapped array (N x H x W x 3) that every later epoch reads without touching a JPEG.

One folder per (dataset location, split, preprocessing) holds `images.u8`, `labels.npy`,
`manifest.json` and `bad_files.csv`. The manifest records the source files with sizes and mtimes,
the preprocessing parameters and the format version; the cache is reused only when all of them
match. A build writes into `<name>.tmp-<pid>` and renames the folder into place when complete, so a
killed build is never mistaken for a finished one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from image_autoencoding.config import DataConfig
from image_autoencoding.data.preprocess import centre_crop_resize, grey_array_to_rgb, load_image
from image_autoencoding.data.sources import ArraySplit, FileSplit
from image_autoencoding.errors import UserError

logger = logging.getLogger("image_autoencoding")

FORMAT_VERSION = 1
IMAGES_FILE, LABELS_FILE, MANIFEST_FILE, BAD_FILES = "images.u8", "labels.npy", "manifest.json", "bad_files.csv"
CHUNK_SIZE = 32  # images per worker task: large enough to amortise the pickling, small enough to balance


class TooManyBadFiles(UserError):
    """More of a split's files failed to decode than data.max_bad_fraction allows."""


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


@dataclass
class CachedSplit:
    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped read-only
    labels: np.ndarray  # (N,) int64
    bad_files: list[BadFile]
    directory: Path
    reused: bool


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "image-autoencoding"


def preprocessing_params(cfg: DataConfig) -> dict:
    """Everything that changes the cached pixels or which files are skipped."""
    return {
        "image_crop": cfg.image_crop,
        "image_size": cfg.image_size,
        "max_image_pixels": cfg.max_image_pixels,
        "exif_orientation": True,
        "transparent_background": "white",
        "small_images": "crop to short side",
    }


def cache_directory(cfg: DataConfig, split: str) -> Path:
    """<cache root>/<dataset>-<split>-<size>px-<hash of data location and parameters>."""
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_root()
    key = json.dumps([cfg.dataset, str(Path(cfg.data_root).resolve()), split, preprocessing_params(cfg)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return root / f"{cfg.dataset}-{split}-{cfg.image_size}px-{digest}"


# -- what the cache was built from --------------------------------------------------------------------


def _stat(path: Path) -> list:
    try:
        info = path.stat()
        return [info.st_size, info.st_mtime_ns]
    except OSError:
        return [-1, 0]


def source_listing(split: FileSplit | ArraySplit) -> list[list]:
    """[path, size, mtime_ns] of every file the split is made of (size -1: missing)."""
    if isinstance(split, FileSplit):
        return [[_relative(path, split.root), *_stat(path)] for path in split.paths]
    return [[str(path), *_stat(path)] for path in split.origin]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def _expected_manifest(split: FileSplit | ArraySplit, cfg: DataConfig) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "params": preprocessing_params(cfg),
        "labels_sha1": _labels_digest(split.labels),
        "sources": source_listing(split),
    }


# -- decoding -----------------------------------------------------------------------------------------


def _decode_file(task: tuple[str, int, int, int]) -> tuple[bytes | None, str]:
    """Runs in a worker process: (pixels, "") or (None, reason)."""
    path, image_crop, image_size, max_pixels = task
    # Pillow reads its limit from a module global; restore it, since in-process decoding shares it.
    previous_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file"
        return load_image(path, image_crop, image_size).tobytes(), ""
    except Image.DecompressionBombError as exc:
        return None, f"decompression bomb: {exc}".split(". ")[0]
    except Image.DecompressionBombWarning:
        return None, f"decompression bomb: more than {max_pixels} pixels"
    except Image.UnidentifiedImageError:
        return None, "not an image (Pillow cannot identify it)"
    except FileNotFoundError:
        return None, "missing or unreadable (file not found)"
    except OSError as exc:
        reason = str(exc) or type(exc).__name__
        return None, f"unreadable: {reason}" if "truncated" not in reason else f"truncated: {reason}"
    except (ValueError, SyntaxError, MemoryError) as exc:
        return None, f"cannot decode: {type(exc).__name__}: {exc}"
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _decoded_files(split: FileSplit, cfg: DataConfig) -> Iterator[tuple[bytes | None, str]]:
    tasks = [(str(path), cfg.image_crop, cfg.image_size, cfg.max_image_pixels) for path in split.paths]
    if cfg.num_workers == 0 or len(tasks) < 2 * CHUNK_SIZE:
        yield from map(_decode_file, tasks)
        return
    # fork: workers start instantly and need nothing pickled but the paths (spawn elsewhere).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(cfg.num_workers) as pool:
        yield from pool.imap(_decode_file, tasks, chunksize=CHUNK_SIZE)


def _decoded_arrays(split: ArraySplit, cfg: DataConfig) -> Iterator[tuple[bytes | None, str]]:
    for image in split.images:
        if image.ndim == 2:
            yield grey_array_to_rgb(image, cfg.image_crop, cfg.image_size).tobytes(), ""
        else:
            yield centre_crop_resize(Image.fromarray(image), cfg.image_crop, cfg.image_size).tobytes(), ""


def preprocess_in_memory(split: ArraySplit, cfg: DataConfig) -> np.ndarray:
    """For bundled, tiny datasets: the cached pixels without the cache."""
    size = cfg.image_size
    pixels = [np.frombuffer(data, dtype=np.uint8) for data, _ in _decoded_arrays(split, cfg)]
    return np.stack(pixels).reshape(len(pixels), size, size, 3)


# -- building and opening -----------------------------------------------------------------------------


def write_bad_files(bad: list[BadFile], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows([item.path, item.reason] for item in bad)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned_builds(directory: Path) -> None:
    """Temporary folders of builds whose process is gone (killed, machine rebooted)."""
    for tmp in directory.parent.glob(f"{directory.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _open(directory: Path, manifest: dict, reused: bool) -> CachedSplit:
    size = manifest["image_size"]
    images = np.memmap(directory / IMAGES_FILE, dtype=np.uint8, mode="r", shape=(manifest["count"], size, size, 3))
    labels = np.load(directory / LABELS_FILE)
    bad = [BadFile(path, reason) for path, reason in manifest["skipped"]]
    return CachedSplit(images, labels, bad, directory, reused)


def _valid_manifest(directory: Path, expected: dict) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        size = manifest["image_size"]
        complete = (directory / IMAGES_FILE).stat().st_size == manifest["count"] * size * size * 3
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not complete or any(manifest.get(key) != value for key, value in expected.items()):
        return None
    return manifest


def open_or_build(
    split: FileSplit | ArraySplit, cfg: DataConfig, split_name: str, progress: bool = True
) -> CachedSplit:
    """The split's cache: reused when its manifest matches the sources and parameters, else built."""
    directory = cache_directory(cfg, split_name)
    expected = _expected_manifest(split, cfg)
    manifest = _valid_manifest(directory, expected)
    if manifest is not None:
        return _open(directory, manifest, reused=True)
    return _build(split, cfg, split_name, directory, expected, progress)


def _build(
    split: FileSplit | ArraySplit, cfg: DataConfig, split_name: str, directory: Path, expected: dict, progress: bool
) -> CachedSplit:
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    total = len(split.labels)
    size = cfg.image_size
    start = time.perf_counter()
    names = [str(path) for path in split.paths] if isinstance(split, FileSplit) else None
    decoded = _decoded_files(split, cfg) if isinstance(split, FileSplit) else _decoded_arrays(split, cfg)
    try:
        images = np.memmap(tmp / IMAGES_FILE, dtype=np.uint8, mode="w+", shape=(max(total, 1), size, size, 3))
        kept, bad = [], []
        bar = tqdm(total=total, desc=f"preparing {cfg.dataset} {split_name}", unit="img", disable=not progress,
                   dynamic_ncols=True)
        for index, (pixels, reason) in enumerate(decoded):
            if pixels is None:
                bad.append(BadFile(names[index] if names else str(index), reason))
            else:
                images[len(kept)] = np.frombuffer(pixels, dtype=np.uint8).reshape(size, size, 3)
                kept.append(index)
            bar.update(1)
        bar.close()
        images.flush()
        del images
        _check_bad_fraction(bad, total, cfg, split_name, directory)
        os.truncate(tmp / IMAGES_FILE, len(kept) * size * size * 3)
        np.save(tmp / LABELS_FILE, np.asarray(split.labels)[kept].astype(np.int64))
        write_bad_files(bad, tmp / BAD_FILES)
        manifest = {
            **expected,
            "dataset": cfg.dataset,
            "split": split_name,
            "data_root": str(Path(cfg.data_root).resolve()),
            "image_size": size,
            "count": len(kept),
            "skipped": [[item.path, item.reason] for item in bad],
            "seconds": round(time.perf_counter() - start, 3),
        }
        # The manifest is written last and the folder renamed last: a cache folder without both is
        # never opened.
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
        _fsync_folder(tmp)
        _replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    logger.info(
        "cached %d %s %s images in %.1f s (%.0f img/s), %d skipped -> %s",
        len(kept), cfg.dataset, split_name, seconds, total / max(seconds, 1e-9), len(bad), directory,
    )
    return _open(directory, manifest, reused=False)


def _check_bad_fraction(bad: list[BadFile], total: int, cfg: DataConfig, split_name: str, directory: Path) -> None:
    if not bad or (len(bad) < total and len(bad) <= cfg.max_bad_fraction * total):
        return
    listing = directory.with_name(f"{directory.name}.{BAD_FILES}")
    write_bad_files(bad, listing)
    first = "; ".join(f"{item.path} ({item.reason})" for item in bad[:3])
    limit = f"more than data.max_bad_fraction={cfg.max_bad_fraction:g}"
    what = "no usable image is left" if len(bad) == total else limit
    raise TooManyBadFiles(
        f"{len(bad)} of {total} {cfg.dataset} {split_name} files could not be read ({what}); first: {first}; "
        f"full list: {listing}"
    )


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb+") as handle:
            os.fsync(handle.fileno())


def _replace(tmp: Path, directory: Path) -> None:
    if directory.exists():
        old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)  # open memory maps of the old cache stay valid until closed
    else:
        tmp.rename(directory)
