"""Costs of the decode-once cache's content check (`vae prepare --verify`) against a build and a plain reuse.

    python benchmarks/cache_verify.py [--images 2000] [--workers 2] [--repeats 3] [--json out.json]

On a Food-101-shaped and a COCO-shaped JPEG set (see photo_sets.py) and, when `--photos` holds images
(default /usr/share/backgrounds: `apt-get install mate-backgrounds`), on a copy of those photographs,
it measures through `open_or_build` with a FileSplit (what `vae prepare` does for data.dataset=folder):

1. a full cache build, in a fresh cache_dir each time;
2. a reuse with the default check (size and mtime of every file, nothing read), nothing changed;
3. `verify=True` (`vae prepare --verify`) with nothing changed: every file read and hashed;
4. `verify=True` after 5 files' content changed with size and mtime kept (one byte flipped inside the
   JPEG's entropy-coded data, mtime restored with os.utime): it must decode again exactly those 5;
5. the hash pass alone, with the files in the page cache and after evicting them from it with
   posix_fadvise(DONTNEED) (best-effort: on a virtual disk the host may still cache them).

Items 1-4 read the files from the page cache. Every figure is the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe
from photo_sets import COCO_SHAPE, FOOD101_SHAPE, make_jpeg_set

CHANGED = 5


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages (a file just generated or edited) are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def entropy_byte(data: bytes) -> int:
    """Offset of a byte inside the first scan's entropy-coded data, with no marker (0xFF) near it."""
    pos = 2
    while data[pos] == 0xFF and data[pos + 1] != 0xDA:  # walk the segments up to the start of scan
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    start = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    for i in range(start + (len(data) - start) // 2, len(data) - 8):
        if 0xFF not in data[i - 4:i + 5] and data[i] != 0xFE:
            return i
    raise ValueError("no entropy-coded byte found")


def flip_content(paths: list[Path]) -> None:
    """Changes one byte of each file in place (a second call restores it), keeping size and mtime."""
    for path in paths:
        info = path.stat()
        data = bytearray(path.read_bytes())
        data[entropy_byte(bytes(data))] ^= 0x01
        path.write_bytes(bytes(data))
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        assert path.stat().st_size == info.st_size and path.stat().st_mtime_ns == info.st_mtime_ns


def measure(name: str, folder: Path, args) -> dict:
    from image_autoencoding.config import load_config
    from image_autoencoding.data import cache
    from image_autoencoding.data.cache import open_or_build
    from image_autoencoding.data.sources import FileSplit, list_images

    paths = list_images(folder, recursive=True)
    split = FileSplit(folder, paths, np.full(len(paths), -1, dtype=np.int64))
    n, mb = len(paths), sum(p.stat().st_size for p in paths) / 1e6
    jpegs = [p for p in paths if p.suffix.lower() in (".jpg", ".jpeg")]
    changed = [jpegs[k * len(jpegs) // CHANGED] for k in range(CHANGED)]  # spread over the set

    def config(cache_dir: Path):
        return load_config(None, ["data.dataset=folder", f"data.data_root={folder}", f"data.cache_dir={cache_dir}",
                                  f"data.num_workers={args.workers}"]).data

    runs: dict[str, list[float]] = {key: [] for key in
                                     ("build", "reuse", "verify", "verify_changed", "hash_cached", "hash_evicted")}
    for r in range(args.repeats):
        cache_dir = args.work_dir / f"cache-{folder.name}-{r}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        cfg = config(cache_dir)
        seconds, built = timed(lambda c=cfg: open_or_build(split, c, "train", progress=False))
        assert not built.reused and len(built.images) + len(built.bad_files) == n
        runs["build"].append(seconds)
    # The rest on the last build, whose cache folder is kept until the set is done.
    for _ in range(args.repeats):
        seconds, same = timed(lambda: open_or_build(split, cfg, "train", progress=False))
        assert same.reused
        runs["reuse"].append(seconds)
        seconds, same = timed(lambda: open_or_build(split, cfg, "train", progress=False, verify=True))
        assert same.reused and same.verification.redecoded == 0
        runs["verify"].append(seconds)
    try:
        for _ in range(args.repeats):
            flip_content(changed)  # toggles: each run differs from the cache the run before it wrote in 5 files
            seconds, rebuilt = timed(lambda: open_or_build(split, cfg, "train", progress=False, verify=True))
            assert rebuilt.verification.redecoded == CHANGED, rebuilt.verification
            assert sorted(rebuilt.verification.changed_files) == sorted(map(str, changed))
            runs["verify_changed"].append(seconds)
    finally:
        if args.repeats % 2:
            flip_content(changed)  # leave the set as generated
    for _ in range(args.repeats):
        # The hash pass alone has no public entry point (verify=True also compares and opens or rebuilds
        # the cache), so this calls the private function `vae prepare --verify` runs, with its workers.
        cache._hash_files(paths, args.workers, "", False)  # read once: in the page cache
        runs["hash_cached"].append(timed(lambda: cache._hash_files(paths, args.workers, "", False))[0])
        evict(paths)
        runs["hash_evicted"].append(timed(lambda: cache._hash_files(paths, args.workers, "", False))[0])
    for r in range(args.repeats):
        shutil.rmtree(args.work_dir / f"cache-{folder.name}-{r}", ignore_errors=True)
    median = {key: statistics.median(values) for key, values in runs.items()}
    return {"set": name, "files": n, "MB": round(mb, 1), "mean_KB": round(mb * 1000 / n),
            "redecoded": CHANGED, **{f"{key}_s": round(value, 4) for key, value in median.items()},
            **{f"{key}_s_per_1000": round(value / n * 1000, 4) for key, value in median.items()},
            "runs": {key: [round(v, 4) for v in values] for key, values in runs.items()}}


def photographs(source: Path, work_dir: Path) -> Path | None:
    """A copy (mtimes kept) of the images under `source`, so that item 4 never edits system files."""
    from image_autoencoding.data.sources import list_images

    if not source.is_dir() or not list_images(source, recursive=True):
        return None
    target = work_dir / "photographs"
    if not target.exists():
        shutil.copytree(source, target.with_suffix(".tmp"), dirs_exist_ok=True)
        target.with_suffix(".tmp").rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs per generated set")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers: decode processes, hash threads")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is shown")
    parser.add_argument("--photos", type=Path, default=Path("/usr/share/backgrounds"),
                        help="photographs to measure too, when the folder holds images")
    parser.add_argument("--no-photos", action="store_true", help="skip the photographs")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "vae-cache-verify")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    sets = [(name, args.work_dir / name, shape) for name, shape in (("food-101", FOOD101_SHAPE), ("coco", COCO_SHAPE))]
    for name, folder, shape in sets:
        make_jpeg_set(folder, args.images, shape, seed=len(name))
    photos = None if args.no_photos else photographs(args.photos, args.work_dir)
    results = [measure(name, folder, args) for name, folder, _ in sets]
    if photos is not None:
        results.append(measure(f"photographs ({args.photos})", photos, args))

    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    machine = describe()
    print(f"machine: {machine}; data.num_workers={args.workers}; median of {args.repeats} runs; command: {command}")
    print("Build, reuse and --verify read the files from the page cache. Hash 'evicted': after "
          "posix_fadvise(DONTNEED), best-effort on a virtual disk (the host may still cache the files).")
    header = ("set", "files", "mean KB", "build s (s/1000)", "reuse s", "--verify s (s/1000)",
              f"--verify, {CHANGED} changed: re-decoded, s", "hash s/1000 cached", "hash s/1000 evicted")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        print(f"| {r['set']} | {r['files']} | {r['mean_KB']} | {r['build_s']:.2f} ({r['build_s_per_1000']:.2f}) | "
              f"{r['reuse_s']:.3f} | {r['verify_s']:.2f} ({r['verify_s_per_1000']:.2f}) | "
              f"{r['redecoded']}, {r['verify_changed_s']:.2f} | {r['hash_cached_s_per_1000']:.2f} | "
              f"{r['hash_evicted_s_per_1000']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "machine": machine, "workers": args.workers,
                                         "repeats": args.repeats, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
