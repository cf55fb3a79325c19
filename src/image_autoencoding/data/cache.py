"""The decode-once cache: every image of a split opened, converted, cropped and resized once, into
a uint8 memory-mapped array (N x H x W x 3) that every later epoch reads without touching a JPEG.

One folder per (dataset location, split, preprocessing) holds `images.u8`, `labels.npy`,
`manifest.json` and `bad_files.csv`. The manifest records the source files with sizes and mtimes,
the preprocessing parameters and the format version; the cache is reused only when all of them
match. A build writes into `<name>.tmp-<pid>` and renames the folder into place when complete, so a
killed build is never mistaken for a finished one.

Size and mtime miss a file whose content changed but kept both (restored with `touch -r`, copied with
`rsync --times`). The manifest therefore also stores a hash of every source file, computed while
building through the very handle decoded from, and `verify=True` (`vae prepare --verify`) reads and hashes
every file, then decodes again exactly the entries whose content differs, copying the other rows
from the old cache.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from image_autoencoding.config import DataConfig
from image_autoencoding.data.preprocess import centre_crop_resize, grey_array_to_rgb, load_image
from image_autoencoding.data.sources import ArraySplit, FileSplit
from image_autoencoding.disk_space import FULL_DISK, free_bytes, free_space, human_size
from image_autoencoding.errors import UserError

logger = logging.getLogger("image_autoencoding")

FORMAT_VERSION = 1
IMAGES_FILE, LABELS_FILE, MANIFEST_FILE, BAD_FILES = "images.u8", "labels.npy", "manifest.json", "bad_files.csv"
CHUNK_SIZE = 32  # images per worker task: large enough to amortise the pickling, small enough to balance
# Detects changed files, not forgeries, so speed decides: on CPUs with the SHA extensions (current x86
# and ARM) SHA-1 hashes files about twice as fast as BLAKE2b. Stored in the manifest, so digests of
# another algorithm are never compared.
CONTENT_HASH = "sha1"
# The largest file that can hold an image within data.max_image_pixels: 8 bytes a pixel (uncompressed
# 16-bit RGBA, the widest layout of PNG and TIFF photographs) plus room for metadata (EXIF thumbnails,
# ICC profiles, XMP). A larger file named .jpg is something else (a video, a disk image) and is refused
# unread: reading it whole cost each decoding worker its size in memory (2 GB for a 2 GB file).
BYTES_PER_PIXEL_AT_MOST, METADATA_BYTES_AT_MOST = 8, 16 * 2**20


def max_file_bytes(max_pixels: int) -> int:
    return BYTES_PER_PIXEL_AT_MOST * max_pixels + METADATA_BYTES_AT_MOST


class TooManyBadFiles(UserError):
    """More of a split's files failed to decode than data.max_bad_fraction allows."""


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


@dataclass(frozen=True)
class Verification:
    """What hashing a split's source files found."""

    hashed: int  # source files read and hashed
    seconds: float  # the hash pass
    changed_files: list[str] = field(default_factory=list)  # content differs from the content cached
    redecoded: int = 0  # images decoded again because their content changed
    unhashed: int = 0  # images decoded again because the cache stored no hash to compare with


@dataclass
class CachedSplit:
    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped read-only
    labels: np.ndarray  # (N,) int64
    bad_files: list[BadFile]
    directory: Path
    reused: bool
    verification: Verification | None = None


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


def _hash_file(path: Path | str, max_bytes: int | None = None) -> str | None:
    """Hash of a file's bytes, read in chunks (None: missing, unreadable, or over `max_bytes`, which
    a build refuses unread, so a verification must not read it either)."""
    try:
        with open(path, "rb") as handle:
            if max_bytes is not None and os.fstat(handle.fileno()).st_size > max_bytes:
                return None
            return hashlib.file_digest(handle, CONTENT_HASH).hexdigest()
    except OSError:
        return None


def _hash_files(
    paths: list[Path], workers: int, desc: str, progress: bool, max_bytes: int | None = None
) -> list[str | None]:
    # Threads, not processes: reading releases the GIL and so does hashlib on buffers over 2 KiB, so
    # threads overlap disk reads and hashing with nothing to pickle.
    bar = tqdm(total=len(paths), desc=desc, unit="file", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        hashes = []
        for digest in pool.map(partial(_hash_file, max_bytes=max_bytes), paths):
            hashes.append(digest)
            bar.update(1)
    bar.close()
    return hashes


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


def _decode_file(task: tuple[str, int, int, int]) -> tuple[bytes | None, str, str | None]:
    """Runs in a worker process: (pixels, "", hash) or (None, reason, hash); hash None: unreadable or
    too large to be an image (refused before a byte is read).

    The file is opened once, hashed in chunks, then decoded from the same open file, never held whole
    in memory: the stored hash is that of the very file whose pixels are cached (a file replaced while
    it is open keeps its old content for this handle)."""
    path, image_crop, image_size, max_pixels = task
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            limit = max_file_bytes(max_pixels)
            if size > limit:
                return None, (f"too large to be an image: {human_size(size)}, more than an image of "
                              f"data.max_image_pixels ({max_pixels}) takes ({human_size(limit)})"), None
            digest = hashlib.file_digest(handle, CONTENT_HASH).hexdigest()
            handle.seek(0)
            return (*_decode(handle, size, image_crop, image_size, max_pixels), digest)
    except OSError as exc:
        return None, _unreadable(exc), None


def _unreadable(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing or unreadable (file not found)"
    reason = str(exc) or type(exc).__name__
    return f"unreadable: {reason}" if "truncated" not in reason else f"truncated: {reason}"


def _decode(
    handle: BinaryIO, size: int, image_crop: int, image_size: int, max_pixels: int
) -> tuple[bytes | None, str]:
    if not size:
        return None, "empty file"
    # load_image refuses the whole picture past max_pixels (and turns Pillow's warnings into that
    # refusal); Pillow's own checks of single frames and tiles read the module global, so it is set
    # too, and restored, since in-process decoding shares it.
    previous_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        # Pillow identifies the format from the first bytes and reads the rest only to decode.
        return load_image(handle, image_crop, image_size, max_pixels).tobytes(), ""
    except Image.DecompressionBombError as exc:
        return None, f"decompression bomb: {exc}".split(". ")[0]
    except Image.UnidentifiedImageError:
        return None, "not an image (Pillow cannot identify it)"
    except OSError as exc:
        return None, _unreadable(exc)
    except (ValueError, SyntaxError, MemoryError) as exc:
        return None, f"cannot decode: {type(exc).__name__}: {exc}"
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _decoded_files(paths: list[Path], cfg: DataConfig) -> Iterator[tuple[bytes | None, str, str | None]]:
    tasks = [(str(path), cfg.image_crop, cfg.image_size, cfg.max_image_pixels) for path in paths]
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


def _open(directory: Path, manifest: dict, reused: bool, verification: Verification | None = None) -> CachedSplit:
    size, count = manifest["image_size"], manifest["count"]
    # An empty file cannot be memory-mapped; an empty split is refused with its count by its user.
    images = (np.memmap(directory / IMAGES_FILE, dtype=np.uint8, mode="r", shape=(count, size, size, 3)) if count
              else np.zeros((0, size, size, 3), dtype=np.uint8))
    labels = np.load(directory / LABELS_FILE)
    bad = [BadFile(path, reason) for path, reason in manifest["skipped"]]
    return CachedSplit(images, labels, bad, directory, reused, verification)


def _read_manifest(directory: Path) -> dict | None:
    """The manifest of a complete cache folder, else None: images.u8 of the size and labels.npy of the
    length the manifest records (a truncated or damaged file is rebuilt, never opened)."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        size = manifest["image_size"]
        complete = (directory / IMAGES_FILE).stat().st_size == manifest["count"] * size * size * 3
        # Memory-mapped: the header and the file's length are checked without reading the labels.
        labels = np.load(directory / LABELS_FILE, mmap_mode="r")
        complete = complete and labels.dtype == np.int64 and labels.shape == (manifest["count"],)
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    return manifest if complete else None


def _matches(manifest: dict | None, expected: dict) -> bool:
    return manifest is not None and all(manifest.get(key) == value for key, value in expected.items())


def open_or_build(
    split: FileSplit | ArraySplit, cfg: DataConfig, split_name: str, progress: bool = True, verify: bool = False
) -> CachedSplit:
    """The split's cache: reused when its manifest matches the sources and parameters, else built.

    verify: also read and hash every source file, and decode again the entries whose content differs
    from what the cache was built from, even where size and mtime match."""
    directory = cache_directory(cfg, split_name)
    expected = _expected_manifest(split, cfg)
    previous = _read_manifest(directory)
    if verify:
        verified = _verify_files if isinstance(split, FileSplit) else _verify_arrays
        cached = verified(split, cfg, split_name, directory, expected, previous, progress)
    elif _matches(previous, expected):
        cached = _open(directory, previous, reused=True)
    else:
        return _build(split, cfg, split_name, directory, expected, progress)
    if cached.reused:
        # data.max_bad_fraction is not part of the cache's key: a cache a more tolerant run built is
        # checked against this run's limit.
        _check_bad_fraction(cached.bad_files, len(split.labels), cfg, split_name, directory)
    return cached


# -- verifying the content ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cached:
    """A source file as the previous cache holds it."""

    digest: str | None
    row: int  # in images.u8; -1: skipped
    reason: str  # why it was skipped


def _stored_hashes(previous: dict | None, expected: dict) -> dict[str, str | None] | None:
    """Source path -> content hash in the previous cache, when the same format and parameters made
    its pixels ({} when nothing in it is reusable); None when it stored no hashes to compare with."""
    if previous is None or any(previous.get(key) != expected[key] for key in ("format_version", "params")):
        return {}
    try:
        if previous["content_hash"] != CONTENT_HASH:
            return None
        return {name: digest for (name, *_), digest in zip(previous["sources"], previous["hashes"], strict=True)}
    except (KeyError, TypeError, ValueError):
        return None  # a cache built before hashes were stored, or a manifest edited by hand


def _cached_entries(previous: dict | None, expected: dict) -> dict[str, _Cached] | None:
    """As `_stored_hashes`, with each file's row or skip reason."""
    stored = _stored_hashes(previous, expected)
    if not stored:
        return stored
    try:
        skipped = iter(previous["skipped"])
        entries = {}
        for (name, *_), digest, row in zip(previous["sources"], previous["hashes"], previous["rows"], strict=True):
            if not -1 <= row < previous["count"]:
                return None
            entries[name] = _Cached(digest, row, next(skipped)[1] if row < 0 else "")
        return entries
    except (KeyError, TypeError, ValueError, IndexError, StopIteration):
        return None


def _verify_files(
    split: FileSplit, cfg: DataConfig, split_name: str, directory: Path, expected: dict, previous: dict | None,
    progress: bool,
) -> CachedSplit:
    if previous is None:  # nothing to compare with: a plain build, which hashes what it decodes
        return _build(split, cfg, split_name, directory, expected, progress, verification=Verification(0, 0.0))
    start = time.perf_counter()
    hashes = _hash_files(split.paths, cfg.num_workers, f"verifying {cfg.dataset} {split_name}", progress,
                         max_file_bytes(cfg.max_image_pixels))
    seconds = time.perf_counter() - start
    cached = _cached_entries(previous, expected)
    reuse: dict[int, _Cached] = {}
    changed, unhashed = [], 0
    previous_names = {name for name, *_ in previous.get("sources", [])} if cached is None else set()
    for index, ((name, *_), digest) in enumerate(zip(expected["sources"], hashes, strict=True)):
        if cached is None:
            unhashed += name in previous_names
            continue
        entry = cached.get(name)
        if entry is None:
            continue  # new to the split: decoded as in any build
        if entry.digest == digest:  # None == None: unreadable then and now, skipped again for the same reason
            reuse[index] = entry
        else:
            changed.append(str(split.paths[index]))
    verification = Verification(len(hashes), seconds, changed, len(changed), unhashed)
    if len(reuse) == len(hashes) and _matches(previous, expected):
        return _open(directory, previous, reused=True, verification=verification)
    return _build(split, cfg, split_name, directory, expected, progress, reuse=reuse, previous=previous,
                  verification=verification)


def _verify_arrays(
    split: ArraySplit, cfg: DataConfig, split_name: str, directory: Path, expected: dict, previous: dict | None,
    progress: bool,
) -> CachedSplit:
    """Images read from a few big files (Fashion-MNIST's idx): a changed file rebuilds the whole split."""
    if previous is None:
        return _build(split, cfg, split_name, directory, expected, progress, verification=Verification(0, 0.0))
    start = time.perf_counter()
    hashes = [_hash_file(path) for path in split.origin]
    seconds = time.perf_counter() - start
    stored = _stored_hashes(previous, expected)
    changed = [name for (name, *_), digest in zip(expected["sources"], hashes, strict=True)
               if stored and name in stored and stored[name] != digest]
    total = len(split.labels)
    unhashed = total if stored is None else 0
    verification = Verification(len(hashes), seconds, changed, total if changed else 0, unhashed)
    if stored is not None and not changed and _matches(previous, expected):
        return _open(directory, previous, reused=True, verification=verification)
    return _build(split, cfg, split_name, directory, expected, progress, hashes=hashes, verification=verification)


# -- building -----------------------------------------------------------------------------------------


def _file_entries(
    split: FileSplit, cfg: DataConfig, reuse: dict[int, _Cached], old_images: np.ndarray | None
) -> Iterator[tuple[bytes | None, str, str | None]]:
    """Each file's (pixels, reason, hash) in order: copied from the old cache where `reuse` holds it
    (content unchanged), decoded otherwise."""
    decoded = _decoded_files([path for index, path in enumerate(split.paths) if index not in reuse], cfg)
    for index in range(len(split.paths)):
        entry = reuse.get(index)
        if entry is None:
            yield next(decoded)
        else:
            yield (old_images[entry.row].tobytes() if entry.row >= 0 else None), entry.reason, entry.digest


def _build(
    split: FileSplit | ArraySplit, cfg: DataConfig, split_name: str, directory: Path, expected: dict, progress: bool,
    reuse: dict[int, _Cached] | None = None, previous: dict | None = None, hashes: list[str | None] | None = None,
    verification: Verification | None = None,
) -> CachedSplit:
    """Builds the split's cache in a temporary folder; `reuse`: files whose rows are copied from the
    `previous` cache (same folder) instead of decoded."""
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_builds(directory)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"{_cache_root(cfg, directory)}: cannot make a folder for the cache there: "
                        f"{exc.strerror or exc}") from None
    total = len(split.labels)
    size = cfg.image_size
    needed = max(total, 1) * size * size * 3 + 8 * total  # images.u8 before skipped rows are cut, labels.npy
    start = time.perf_counter()
    if isinstance(split, FileSplit):
        names = [str(path) for path in split.paths]
        old_images = _open(directory, previous, reused=True).images if reuse else None
        entries = _file_entries(split, cfg, reuse or {}, old_images)
    else:
        names, old_images = None, None
        # The images are in memory already; the files they came from are hashed as a whole.
        hashes = hashes if hashes is not None else [_hash_file(path) for path in split.origin]
        entries = ((pixels, reason, None) for pixels, reason in _decoded_arrays(split, cfg))
    try:
        # A write into a memory map on a full disk is a SIGBUS that kills the process without a word:
        # the room is checked, then claimed, before any pixel is written.
        free = free_bytes(tmp)
        if free is not None and free < needed:
            raise _disk_full(cfg, directory, needed, total, "not enough room")
        images = np.memmap(tmp / IMAGES_FILE, dtype=np.uint8, mode="w+", shape=(max(total, 1), size, size, 3))
        _allocate(tmp / IMAGES_FILE, images.nbytes)
        kept, bad, rows, digests = [], [], [], []
        bar = tqdm(total=total, desc=f"preparing {cfg.dataset} {split_name}", unit="img", disable=not progress,
                   dynamic_ncols=True)
        for index, (pixels, reason, digest) in enumerate(entries):
            if pixels is None:
                bad.append(BadFile(names[index] if names else str(index), reason))
                rows.append(-1)
            else:
                images[len(kept)] = np.frombuffer(pixels, dtype=np.uint8).reshape(size, size, 3)
                rows.append(len(kept))
                kept.append(index)
            digests.append(digest)
            bar.update(1)
        bar.close()
        images.flush()
        del images, entries
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
            # Aligned with "sources"; "rows" maps each file to its row in images.u8 (-1: skipped), so a
            # verified rebuild copies the unchanged rows.
            "content_hash": CONTENT_HASH,
            "hashes": digests if names is not None else hashes,
            **({"rows": rows} if names is not None else {}),
            "seconds": round(time.perf_counter() - start, 3),
        }
        # The manifest is written last and the folder renamed last: a cache folder without both is
        # never opened.
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
        _fsync_folder(tmp)
        del old_images
        _replace(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in FULL_DISK:
            raise _disk_full(cfg, directory, needed, total, exc.strerror or str(exc)) from None
        raise
    seconds = time.perf_counter() - start
    copied = f", {len(reuse)} unchanged copied from the previous cache" if reuse else ""
    logger.info(
        "cached %d %s %s images in %.1f s (%.0f img/s)%s, %d skipped -> %s",
        len(kept), cfg.dataset, split_name, seconds, total / max(seconds, 1e-9), copied, len(bad), directory,
    )
    return _open(directory, manifest, reused=False, verification=verification)


def _cache_root(cfg: DataConfig, directory: Path) -> str:
    return f"data.cache_dir '{cfg.cache_dir}'" if cfg.cache_dir else f"the cache folder '{directory.parent}'"


def _disk_full(cfg: DataConfig, directory: Path, needed: int, total: int, reason: str) -> UserError:
    size = cfg.image_size
    return UserError(
        f"{_cache_root(cfg, directory)}: cannot build the cache there: {reason} (it needs about "
        f"{human_size(needed)} for {total} images of {size}x{size}; {free_space(directory.parent)} free there)"
    )


def _allocate(path: Path, nbytes: int) -> None:
    """Reserve the file's blocks, so a disk that fills while the cache is written fails here with
    ENOSPC instead of with a SIGBUS at a page write. File systems that cannot reserve (some network
    and copy-on-write ones) keep the free-space check alone."""
    if not hasattr(os, "posix_fallocate"):
        return
    with path.open("rb+") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, nbytes)
        except OSError as exc:
            if exc.errno in FULL_DISK:
                raise


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
