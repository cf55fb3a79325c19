"""The decode-once cache: contents, reuse, invalidation, killed builds, and bad files."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fixtures import broken_files, make_coco, make_fashion_mnist, make_food101, photo, save_jpeg
from image_autoencoding.cli import main
from image_autoencoding.config import load_config
from image_autoencoding.data import cache as cache_module
from image_autoencoding.data.cache import cache_directory
from image_autoencoding.data.image_data import check_split_sizes, load_image_data
from image_autoencoding.data.preprocess import load_image
from image_autoencoding.data.sources import find_source
from image_autoencoding.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, dataset="food-101", *overrides):
    return load_config(None, [
        f"data.dataset={dataset}", f"data.data_root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.image_size=16", "data.num_workers=0", *overrides,
    ]).data


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_cache_holds_the_preprocessed_pixels_and_labels(tmp_path):
    make_food101(tmp_path / "data", per_class=(2, 1))
    cfg = _config(tmp_path)
    data = load_image_data(cfg, progress=False)
    assert isinstance(data.train.images, np.memmap) and data.train.images.shape == (6, 16, 16, 3)
    first = tmp_path / "data/food-101/images/apple_pie/100.jpg"
    assert np.array_equal(data.train.images[0], load_image(first, cfg.image_crop, cfg.image_size))
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and data.valid.labels.tolist() == [0, 1, 2]
    manifest = json.loads((data.train.cache_dir / "manifest.json").read_text())
    assert manifest["format_version"] == cache_module.FORMAT_VERSION and manifest["count"] == 6
    assert manifest["params"]["image_size"] == 16
    path, size, mtime = manifest["sources"][0]
    assert path == "apple_pie/100.jpg" and size == first.stat().st_size and mtime == first.stat().st_mtime_ns


def test_cache_is_reused_without_decoding(tmp_path, monkeypatch):
    make_food101(tmp_path / "data", per_class=(2, 1))
    cfg = _config(tmp_path)
    built = load_image_data(cfg, progress=False)

    def no_decoding(*args):
        raise AssertionError("a valid cache must not decode anything")

    monkeypatch.setattr(cache_module, "_decode_file", no_decoding)
    again = load_image_data(cfg, progress=False)
    assert np.array_equal(again.train.images, built.train.images)


@pytest.mark.parametrize("change", ["touch", "add", "remove", "parameters"])
def test_cache_is_rebuilt_when_sources_or_parameters_change(tmp_path, change):
    make_food101(tmp_path / "data", per_class=(2, 1))
    cfg = _config(tmp_path)
    before = load_image_data(cfg, progress=False).train
    images = tmp_path / "data/food-101/images"
    train_txt = tmp_path / "data/food-101/meta/train.txt"
    if change == "touch":
        save_jpeg(photo(40), images / "apple_pie/100.jpg")  # same name, new picture
        os.utime(images / "apple_pie/100.jpg", ns=(1, 1))
    elif change == "add":
        save_jpeg(photo(41), images / "ramen/900.jpg")
        train_txt.write_text(train_txt.read_text() + "ramen/900\n")
        (tmp_path / "data/food-101/meta/classes.txt").write_text("apple_pie\nbaby_back_ribs\nbibimbap\nramen\n")
    elif change == "remove":
        train_txt.write_text("".join(train_txt.read_text().splitlines(keepends=True)[1:]))
    else:
        cfg = _config(tmp_path, "food-101", "data.image_crop=100")
    after = load_image_data(cfg, progress=False).train
    fresh = np.stack([load_image(path, cfg.image_crop, cfg.image_size) for path in find_source(cfg).train.paths])
    assert len(after.images) == {"touch": 6, "add": 7, "remove": 5, "parameters": 6}[change]
    assert np.array_equal(np.asarray(after.images), fresh)  # what the files hold now, not the stale cache
    assert (after.cache_dir == before.cache_dir) == (change != "parameters")


def test_interrupted_build_is_never_used(tmp_path, monkeypatch):
    make_food101(tmp_path / "data", per_class=(2, 1))
    cfg = _config(tmp_path)
    real = cache_module._decode_file
    calls = []

    def dies_on_the_fourth_image(task):
        calls.append(task)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(cache_module, "_decode_file", dies_on_the_fourth_image)
    with pytest.raises(KeyboardInterrupt):
        load_image_data(cfg, progress=False)
    assert not cache_directory(cfg, "train").exists()
    assert not list((tmp_path / "cache").glob("*.tmp-*"))
    monkeypatch.setattr(cache_module, "_decode_file", real)
    assert len(load_image_data(cfg, progress=False).train.images) == 6


def test_build_killed_with_sigkill_is_never_taken_for_a_finished_cache(tmp_path):
    make_food101(tmp_path / "data", classes=tuple(f"class_{i}" for i in range(10)), per_class=(30, 2))
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "image_autoencoding", "prepare", "-q", "data.dataset=food-101",
            f"data.data_root={tmp_path / 'data'}", f"data.cache_dir={cache}", "data.num_workers=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(argv, env=env)
    deadline = time.monotonic() + 60
    while not list(cache.glob("*.tmp-*/images.u8")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(cache.glob("*.tmp-*")), "the build should have been killed mid-way"
    assert not [p for p in cache.iterdir() if ".tmp-" not in p.name]  # no finished-looking folder
    assert main(argv[3:]) == 0
    assert not list(cache.glob("*.tmp-*"))  # the abandoned build was cleaned up
    cfg = load_config(None, argv[5:]).data
    assert len(load_image_data(cfg, progress=False).train.images) == 300


def test_parallel_workers_give_the_same_cache(tmp_path):
    make_food101(tmp_path / "data", classes=("a", "b"), per_class=(40, 2))
    serial = load_image_data(_config(tmp_path), progress=False).train
    parallel = load_image_data(_config(tmp_path, "food-101", "data.num_workers=2",
                                       f"data.cache_dir={tmp_path / 'cache2'}"), progress=False).train
    assert np.array_equal(np.asarray(serial.images), np.asarray(parallel.images))
    assert np.array_equal(serial.labels, parallel.labels)


# -- bad files ----------------------------------------------------------------------------------------


def test_bad_files_are_skipped_counted_and_listed(tmp_path):
    make_coco(tmp_path / "data", n_train=30, n_test=0, n_valid=3, broken=True)
    cfg = _config(tmp_path, "coco", "data.max_image_pixels=1000000", "data.max_bad_fraction=0.5")
    data = load_image_data(cfg, progress=False)
    bad = {Path(item.path).name: item.reason for item in data.bad_files}
    assert set(bad) == {"broken_truncated.jpg", "broken_zero_byte.jpg", "broken_html.jpg", "broken_bomb.png",
                        "broken_unreadable.jpg"}
    assert bad["broken_zero_byte.jpg"] == "empty file"
    assert bad["broken_truncated.jpg"].startswith("truncated")
    assert bad["broken_html.jpg"].startswith("not an image")
    # The limit named is the user's key, not Pillow's internal twice-the-limit.
    assert bad["broken_bomb.png"].startswith("decompression bomb")
    assert "9000000 pixels" in bad["broken_bomb.png"] and "data.max_image_pixels (1000000)" in bad["broken_bomb.png"]
    assert "not found" in bad["broken_unreadable.jpg"]
    # Every odd but valid file (grey, CMYK, RGBA, palette, 16-bit, EXIF, small, PNG named .jpg) is kept.
    assert len(data.train.images) == 30 + 8
    rows = _read_csv(data.train.cache_dir / "bad_files.csv")
    assert rows[0] == ["path", "reason"] and len(rows) == 6
    assert all(Path(path).is_absolute() for path, _ in rows[1:])


def test_too_many_bad_files_stop_with_the_first_paths(tmp_path, capsys):
    make_coco(tmp_path / "data", n_train=30, n_test=0, n_valid=3, broken=True)  # 5 of 43 bad: 12%
    code = main(["prepare", "-q", "data.dataset=coco", f"data.data_root={tmp_path / 'data'}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.max_image_pixels=1000000"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "5 of 43" in err and "max_bad_fraction=0.05" in err and "broken_" in err
    listing = next((tmp_path / "cache").glob("*.bad_files.csv"))
    assert len(_read_csv(listing)) == 6 and str(listing) in err
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # no cache folder left behind


def test_nothing_left_stops_even_with_no_limit(tmp_path, capsys):
    folder = tmp_path / "data"
    broken_files(folder)
    code = main(["prepare", "-q", "data.dataset=folder", f"data.data_root={folder}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.max_bad_fraction=1.0"])
    err = capsys.readouterr().err
    assert code == 2 and "no usable image is left" in err


def _folder_with_one_empty_file(tmp_path) -> list[str]:
    """train/: 3 photos and an empty .jpg (a quarter bad); valid/: 1 photo. The `vae prepare` arguments."""
    for index in range(3):
        save_jpeg(photo(index, 32, 24), tmp_path / f"data/train/{index}.jpg")
    (tmp_path / "data/train/empty.jpg").write_bytes(b"")
    save_jpeg(photo(3, 32, 24), tmp_path / "data/valid/0.jpg")
    return ["prepare", "-q", "data.dataset=folder", f"data.data_root={tmp_path / 'data'}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=16", "data.num_workers=0"]


def test_a_stricter_max_bad_fraction_refuses_a_cache_a_looser_run_built(tmp_path, capsys):
    prepare = _folder_with_one_empty_file(tmp_path)
    assert main([*prepare, "data.max_bad_fraction=0.5"]) == 0
    capsys.readouterr()
    assert main(prepare) == 2  # the default limit, 5%, on the cache built above
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 4" in err and "max_bad_fraction=0.05" in err and "empty.jpg" in err
    assert main([*prepare, "data.max_bad_fraction=0.5"]) == 0  # the cache itself is kept for looser runs


@pytest.mark.parametrize("damage", ["truncated", "float", "short"])
def test_a_damaged_labels_file_rebuilds_the_cache(tmp_path, capsys, damage):
    prepare = _folder_with_one_empty_file(tmp_path)
    assert main([*prepare, "data.max_bad_fraction=0.5"]) == 0
    cfg = load_config(None, [*prepare[2:], "data.max_bad_fraction=0.5"]).data
    built = load_image_data(cfg, progress=False).train
    labels_file = built.cache_dir / "labels.npy"
    if damage == "truncated":
        labels_file.write_bytes(labels_file.read_bytes()[:-4])
    else:
        np.save(labels_file, built.labels.astype(np.float32) if damage == "float" else built.labels[:-1])
    again = load_image_data(cfg, progress=False).train
    assert again.labels.dtype == np.int64 and np.array_equal(again.labels, built.labels)
    assert np.array_equal(np.asarray(again.images), np.asarray(built.images))


def test_a_cache_that_cannot_fit_is_refused_in_one_line_before_writing(tmp_path, capsys, monkeypatch):
    prepare = _folder_with_one_empty_file(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert main([*prepare, "data.max_bad_fraction=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data.cache_dir '{tmp_path / 'cache'}'" in err
    assert "needs about 3.1 KB for 4 images of 16x16" in err and "1.0 KB free" in err  # 4 x 16 x 16 x 3 + labels
    assert list((tmp_path / "cache").iterdir()) == []  # no cache, no temporary folder


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("call", ["posix_fallocate", "save"])
def test_a_disk_that_fills_while_the_cache_is_built_is_one_line(tmp_path, capsys, monkeypatch, call):
    prepare = _folder_with_one_empty_file(tmp_path)
    # posix_fallocate reserves images.u8 (where a write into the memory map would otherwise be killed
    # by SIGBUS); np.save writes labels.npy after the images.
    monkeypatch.setattr(os if call == "posix_fallocate" else np, call, _disk_full)
    assert main([*prepare, "data.max_bad_fraction=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and str(tmp_path / "cache") in err
    assert "needs about" in err and "free there" in err
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_huge_file_named_jpg_is_listed_as_bad_without_being_read(tmp_path, capsys):
    prepare = _folder_with_one_empty_file(tmp_path)
    (tmp_path / "data/train/empty.jpg").unlink()
    with (tmp_path / "data/train/movie.jpg").open("wb") as handle:
        handle.truncate(2 * 1024**3)  # 2 GiB, sparse: no disk used, but 2 GiB of memory if read whole
    tracemalloc.start()
    try:
        assert main([*prepare, "data.max_bad_fraction=0.5"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20
    cfg = load_config(None, [*prepare[2:], "data.max_bad_fraction=0.5"]).data
    (path, reason), = _read_csv(cache_directory(cfg, "train") / "bad_files.csv")[1:]
    assert path.endswith("movie.jpg") and reason.startswith("too large to be an image: 2.1 GB")
    capsys.readouterr()
    assert main([*prepare, "data.max_bad_fraction=0.5", "--verify"]) == 0  # the hash pass does not read it either
    assert "0 images re-decoded" in capsys.readouterr().out


def test_train_copies_bad_files_into_the_run_folder(tiny, tmp_path):
    make_coco(tmp_path / "data", n_train=30, n_test=0, n_valid=3, broken=True)
    assert main(["train", *tiny, "data.dataset=coco", f"data.data_root={tmp_path / 'data'}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.max_image_pixels=1000000",
                 "data.max_bad_fraction=0.5", "train.epochs=1"]) == 0
    (run,) = (tmp_path / "results/vae").iterdir()
    rows = _read_csv(run / "bad_files.csv")
    assert rows[0] == ["path", "reason"] and len(rows) == 6
    assert "5 unreadable images skipped" in (run / "train.log").read_text()


def test_a_split_too_small_to_train_on_is_refused_in_one_line_before_the_run_folder(tiny, tmp_path, capsys):
    for index in range(2):  # one image to train on, one held out
        save_jpeg(photo(index, 32, 24), tmp_path / f"data/{index}.jpg")
    code = main(["train", *tiny, "data.dataset=folder", f"data.data_root={tmp_path / 'data'}",
                 f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "the folder train split has 1 usable image; training needs at least 2" in err
    assert not list(tmp_path.rglob("vae_*"))  # no run folder


def test_an_empty_validation_split_is_refused_in_one_line(tiny, tmp_path, capsys):
    make_fashion_mnist(tmp_path / "data", n_train=40, n_test=0)
    code = main(["train", *tiny, "data.dataset=fashion-mnist", f"data.data_root={tmp_path / 'data'}",
                 f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "the fashion-mnist validation split has 0 usable images" in err
    assert not list(tmp_path.rglob("vae_*"))


def test_under_torchrun_a_train_split_smaller_than_one_global_batch_is_refused(tmp_path):
    make_fashion_mnist(tmp_path / "data", n_train=40, n_test=4)
    data = load_image_data(_config(tmp_path, "fashion-mnist"), progress=False)
    check_split_sizes(data, "fashion-mnist", batch_size=20, world_size=2)  # 40 images: one step
    with pytest.raises(UserError, match=r"train split has 40 usable images; .* = 64, .* lower train.batch_size"):
        check_split_sizes(data, "fashion-mnist", batch_size=32, world_size=2)


def test_fashion_mnist_is_cached_like_the_others(tmp_path):
    make_fashion_mnist(tmp_path / "data")
    data = load_image_data(_config(tmp_path, "fashion-mnist"), progress=False)
    assert data.train.images.shape == (40, 16, 16, 3) and data.valid.images.shape == (12, 16, 16, 3)
    assert data.train.cache_dir is not None and data.class_names[0] == "T-shirt/top"


# -- content changes that keep size and mtime ---------------------------------------------------------


def _bmp_folder(tmp_path) -> Path:
    """A folder dataset of BMPs: every BMP of the same dimensions has the same byte size."""
    root = tmp_path / "data"
    for split, first, count in (("train", 0, 4), ("valid", 10, 2)):
        for i in range(count):
            (root / split).mkdir(parents=True, exist_ok=True)
            photo(first + i, 40, 30).save(root / split / f"{i}.bmp")
    return root


def _prepare(tmp_path, capsys, *options: str) -> str:
    assert main(["prepare", "-q", *options, "data.dataset=folder", f"data.data_root={tmp_path / 'data'}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=16", "data.num_workers=0"]) == 0
    return capsys.readouterr().out


def _replace_keeping_size_and_mtime(path: Path, image) -> None:
    before = path.stat()
    image.save(path)
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `touch -r` or `rsync --times` leave it


def test_only_verify_sees_a_change_that_keeps_size_and_mtime(tmp_path, capsys, monkeypatch):
    _bmp_folder(tmp_path)
    cfg = _config(tmp_path, "folder")
    _prepare(tmp_path, capsys)
    changed = tmp_path / "data/train/1.bmp"
    old = load_image(changed, cfg.image_crop, cfg.image_size)
    _replace_keeping_size_and_mtime(changed, photo(20, 40, 30))
    new = load_image(changed, cfg.image_crop, cfg.image_size)
    assert not np.array_equal(old, new)

    # The default check trusts size and mtime: it serves the old pixels. That is the documented trade.
    _prepare(tmp_path, capsys)
    assert np.array_equal(load_image_data(cfg, progress=False).train.images[1], old)

    real, decoded = cache_module._decode_file, []

    def counting(task):
        decoded.append(Path(task[0]).name)
        return real(task)

    monkeypatch.setattr(cache_module, "_decode_file", counting)
    out = _prepare(tmp_path, capsys, "--verify")
    assert decoded == ["1.bmp"]  # only the changed image is decoded again
    assert out.strip().splitlines()[-1].startswith("1 image re-decoded because its content changed")
    assert "1.bmp" in out
    data = load_image_data(cfg, progress=False)
    fresh = np.stack([load_image(path, cfg.image_crop, cfg.image_size) for path in find_source(cfg).train.paths])
    assert np.array_equal(np.asarray(data.train.images), fresh)

    decoded.clear()
    out = _prepare(tmp_path, capsys, "--verify")
    assert decoded == [] and out.strip().splitlines()[-1].startswith("0 images re-decoded")


def test_verify_decodes_everything_when_the_cache_holds_no_hashes(tmp_path, capsys, monkeypatch):
    _bmp_folder(tmp_path)
    cfg = _config(tmp_path, "folder")
    _prepare(tmp_path, capsys)
    for split in ("train", "valid"):
        # As a cache built before hashes were stored: nothing tells whether the content is still the one decoded.
        path = cache_directory(cfg, split) / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest.pop("hashes")
        path.write_text(json.dumps(manifest))
    real, decoded = cache_module._decode_file, []
    monkeypatch.setattr(cache_module, "_decode_file", lambda task: decoded.append(task) or real(task))
    _prepare(tmp_path, capsys)
    assert decoded == []  # the default check still reuses it
    out = _prepare(tmp_path, capsys, "--verify")
    assert len(decoded) == 6 and "6 decoded again: the cache held no content hashes" in out
    decoded.clear()
    _prepare(tmp_path, capsys, "--verify")
    assert decoded == []


def test_verify_after_touch_rewrites_the_manifest_without_decoding(tmp_path, capsys, monkeypatch):
    _bmp_folder(tmp_path)
    cfg = _config(tmp_path, "folder")
    _prepare(tmp_path, capsys)
    os.utime(tmp_path / "data/train/0.bmp", ns=(1, 1))
    monkeypatch.setattr(cache_module, "_decode_file", lambda task: pytest.fail("the content did not change"))
    _prepare(tmp_path, capsys, "--verify")
    assert load_image_data(cfg, progress=False).train.images.shape == (4, 16, 16, 3)  # reused by the default check


def test_verify_rebuilds_an_array_split_whose_file_changed(tmp_path, capsys):
    make_fashion_mnist(tmp_path / "data")
    cfg = _config(tmp_path, "fashion-mnist")
    built = load_image_data(cfg, progress=False).valid
    images_file = tmp_path / "data/fashion-mnist/t10k-images-idx3-ubyte"
    before = images_file.stat()
    payload = bytearray(images_file.read_bytes())
    payload[16:] = bytes(255 - value for value in payload[16:])  # every pixel inverted, header kept
    images_file.write_bytes(payload)
    os.utime(images_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert np.array_equal(load_image_data(cfg, progress=False).valid.images, built.images)  # stale by default
    argv = ["prepare", "-q", "--verify", "data.dataset=fashion-mnist", f"data.data_root={tmp_path / 'data'}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=16", "data.num_workers=0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "12 images re-decoded because their content changed" in out and str(images_file) in out
    fresh = load_image_data(_config(tmp_path, "fashion-mnist", f"data.cache_dir={tmp_path / 'fresh'}"), progress=False)
    assert np.array_equal(load_image_data(cfg, progress=False).valid.images, fresh.valid.images)
    assert not np.array_equal(fresh.valid.images, built.images)
