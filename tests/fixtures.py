"""Tiny on-disk datasets in the real layouts (COCO 2017, Food-101, Fashion-MNIST idx files, plain
folders), cut from scikit-image's bundled photographs, with every kind of odd and broken file the
loaders must survive."""

from __future__ import annotations

import gzip
import json
import struct
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as photos

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


@cache
def _original(name: str) -> Image.Image:
    return Image.fromarray(getattr(photos, name)()).convert("RGB")


def photo(index: int, width: int = 160, height: int = 120) -> Image.Image:
    """A different real photograph crop for each index."""
    image = _original(PHOTOS[index % len(PHOTOS)])
    shift = (index // len(PHOTOS)) * 17 % 120
    box = (shift, shift, shift + min(image.width - shift, 3 * width), shift + min(image.height - shift, 3 * height))
    return image.crop(box).resize((width, height), Image.Resampling.BILINEAR)


def save_jpeg(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90, **kwargs)
    return path


def odd_but_valid_files(folder: Path, start: int = 0) -> dict[str, Path]:
    """Files that must be read, not skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["grey"] = save_jpeg(photo(start).convert("L"), folder / "grey.jpg")
    files["cmyk"] = save_jpeg(photo(start + 1).convert("CMYK"), folder / "cmyk.jpg")
    rgba = photo(start + 2).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "rgba.png")
    files["rgba"] = folder / "rgba.png"
    photo(start + 3).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    files["palette"] = folder / "palette.png"
    grey16 = (np.asarray(photo(start + 4).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    files["grey16"] = folder / "grey16.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    files["exif_rotated"] = save_jpeg(photo(start + 5).transpose(Image.Transpose.ROTATE_90), folder / "rotated.jpg",
                                      exif=exif.tobytes())
    files["small"] = save_jpeg(photo(start + 6, 50, 40), folder / "small.jpg")
    photo(start + 7).save(folder / "png_named.jpg", format="PNG")
    files["png_named_jpg"] = folder / "png_named.jpg"
    return files


def broken_files(folder: Path) -> dict[str, Path]:
    """Files that must be skipped and listed in bad_files.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    whole = save_jpeg(photo(3), folder / "whole.jpg").read_bytes()
    whole_path = folder / "whole.jpg"
    whole_path.unlink()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    files["truncated"] = folder / "truncated.jpg"
    (folder / "empty.jpg").write_bytes(b"")
    files["zero_byte"] = folder / "empty.jpg"
    (folder / "page.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    files["html"] = folder / "page.jpg"
    # 3000 x 3000 1-bit pixels in a tiny file: a decompression bomb once tests set
    # data.max_image_pixels=1000000 (Pillow refuses pictures over twice the limit).
    Image.new("1", (3000, 3000)).save(folder / "bomb.png")
    files["bomb"] = folder / "bomb.png"
    (folder / "dangling.jpg").symlink_to(folder / "deleted-long-ago.jpg")
    files["unreadable"] = folder / "dangling.jpg"
    return files


def junk_files(folder: Path) -> None:
    """Files operating systems leave behind: ignored, not even listed as bad."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")


def make_coco(root: Path, n_train: int = 12, n_test: int = 4, n_valid: int = 6, broken: bool = True) -> Path:
    """<root>/coco/coco_{train,test,valid}2017/{train,test,val}2017/<12-digit id>.jpg"""
    coco = root / "coco"
    folders = {"train": coco / "coco_train2017/train2017", "test": coco / "coco_test2017/test2017",
               "valid": coco / "coco_valid2017/val2017"}
    image_id = 1
    for split, count in (("train", n_train), ("test", n_test), ("valid", n_valid)):
        for _ in range(count):
            save_jpeg(photo(image_id, 640, 480), folders[split] / f"{image_id:012d}.jpg")
            image_id += 1
    if broken:
        for name, path in odd_but_valid_files(folders["train"], start=3).items():
            path.rename(path.with_name(f"odd_{name}{path.suffix}"))
        for name, path in broken_files(folders["train"]).items():
            path.rename(path.with_name(f"broken_{name}{path.suffix}"))
        junk_files(folders["train"])
    return root


def make_food101(root: Path, classes=("apple_pie", "baby_back_ribs", "bibimbap"), per_class: tuple[int, int] = (4, 2),
                 crlf: bool = False, json_meta: bool = False) -> Path:
    """<root>/food-101/images/<class>/<id>.jpg with meta/{train,test}.txt and meta/classes.txt."""
    base = root / "food-101"
    meta = base / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    image_id = 100
    for index, name in enumerate(classes):
        for split, count in zip(("train", "test"), per_class, strict=True):
            for _ in range(count):
                save_jpeg(photo(image_id + index, 512, 384), base / "images" / name / f"{image_id}.jpg")
                entries[split].setdefault(name, []).append(f"{name}/{image_id}")
                image_id += 1
    newline = "\r\n" if crlf else "\n"
    # classes.txt is listed out of order on purpose: labels must follow the sorted order.
    (meta / "classes.txt").write_text(newline.join(reversed(classes)) + newline)
    for split, by_class in entries.items():
        if json_meta:
            (meta / f"{split}.json").write_text(json.dumps(by_class))
        else:
            lines = [entry for values in by_class.values() for entry in values]
            (meta / f"{split}.txt").write_bytes((newline.join(lines) + newline).encode())
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def make_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 12) -> Path:
    """<root>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (train gzipped, test not)."""
    rng = np.random.default_rng(0)
    folder = root / "fashion-mnist"
    for prefix, count, suffix in (("train", n_train, ".gz"), ("t10k", n_test, "")):
        labels = np.arange(count) % 10
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            # A bright bar whose position encodes the class, with noise: learnable and checkable.
            images[i, 2 * label + 2 : 2 * label + 6, 4:24] = 200
            images[i] += rng.integers(0, 30, size=(28, 28), dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return root
