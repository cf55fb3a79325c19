"""Where images come from: for each dataset, which files (or in-memory arrays) make the train and
validation splits, and which label each one has. Nothing is decoded here; `cache.py` does that.

Every layout problem is found here, before anything is built, and reported in one line that names
the expected path and shows the expected layout.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from image_autoencoding.config import DataConfig
from image_autoencoding.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# Files operating systems leave in photo folders: never images, never worth a line in bad_files.csv.
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
VALID_FOLDER_NAMES = ("valid", "val", "validation", "test")


class DatasetLayoutError(UserError):
    """A dataset folder or split file is missing or has the wrong layout."""


@dataclass(frozen=True)
class FileSplit:
    """Image files and their labels (-1 where unlabelled). Paths are reported relative to `root`."""

    root: Path
    paths: list[Path]
    labels: np.ndarray


@dataclass(frozen=True)
class ArraySplit:
    """Images already in memory before crop / resize: (N, h, w) grey or (N, h, w, 3) RGB uint8.
    `origin` lists the files they were read from; their sizes and mtimes validate a cache of them."""

    images: np.ndarray
    labels: np.ndarray
    origin: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetSource:
    name: str
    train: FileSplit | ArraySplit
    valid: FileSplit | ArraySplit
    class_names: list[str]
    # Bundled, tiny datasets are preprocessed in memory on every run instead of cached on disk.
    in_memory: bool = False


def seeded_split(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a reproducible train / validation split of n items."""
    order = np.random.default_rng(seed).permutation(n)
    n_valid = max(1, round(n * valid_fraction))
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def is_image_file(path: Path) -> bool:
    name = path.name
    return (
        path.suffix.lower() in IMAGE_SUFFIXES
        and not name.startswith("._")  # macOS AppleDouble resource forks
        and name.lower() not in JUNK_NAMES
    )


def list_images(folder: Path, recursive: bool) -> list[Path]:
    """Image files under `folder`, sorted, skipping hidden folders (caches, .git) and junk files."""
    found = []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    for path in candidates:
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts[:-1]):
            continue
        if is_image_file(path) and (path.is_file() or path.is_symlink()):
            found.append(path)
    return sorted(found)


def _require_dir(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise DatasetLayoutError(f"dataset folder '{path}' not found; expected layout: {layout}")


# -- digits (bundled) ---------------------------------------------------------------------------------


def digits_source(cfg: DataConfig) -> DatasetSource:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), bundled: no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train, valid = seeded_split(len(grey), cfg.valid_fraction, cfg.split_seed)
    return DatasetSource(
        name="digits",
        train=ArraySplit(grey[train], labels[train]),
        valid=ArraySplit(grey[valid], labels[valid]),
        class_names=[str(name) for name in bunch.target_names],
        in_memory=True,
    )


# -- Fashion-MNIST ------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format), gzipped or not, as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DatasetLayoutError(f"'{path}': cannot read idx file ({exc})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DatasetLayoutError(f"'{path}': not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) != offset + int(np.prod(shape)):
        raise DatasetLayoutError(f"'{path}': idx file is truncated (header says shape {shape})")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_source(cfg: DataConfig) -> DatasetSource:
    """Zalando's Fashion-MNIST: 60,000 training and 10,000 test images, 28x28 grey, 10 classes. Read
    from <data_root>/fashion-mnist, else from the Debian package `dataset-fashion-mnist`."""
    stems = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "valid": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
    candidates = [Path(cfg.data_root) / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]
    for folder in candidates:
        files = {split: [_find_idx(folder, stem) for stem in pair] for split, pair in stems.items()}
        if all(path is not None for pair in files.values() for path in pair):
            break
    else:
        raise DatasetLayoutError(
            f"Fashion-MNIST not found in '{candidates[0]}' or '{candidates[1]}'; expected the idx files "
            "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
            "t10k-labels-idx1-ubyte[.gz] (or `apt-get install dataset-fashion-mnist`)"
        )
    splits = {}
    for split, (images_path, labels_path) in files.items():
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetLayoutError(f"'{images_path}' and '{labels_path}' do not hold matching images and labels")
        splits[split] = ArraySplit(images, labels.astype(np.int64), origin=[images_path, labels_path])
    return DatasetSource("fashion-mnist", splits["train"], splits["valid"], list(FASHION_MNIST_CLASSES))


# -- COCO ---------------------------------------------------------------------------------------------

COCO_LAYOUT = "<data_root>/coco/{train}/*.jpg, <data_root>/coco/{test}/*.jpg (optional), <data_root>/coco/{valid}/*.jpg"


def coco_source(cfg: DataConfig) -> DatasetSource:
    """MS COCO 2017 images without annotations: train2017 and test2017 train, val2017 evaluates."""
    base = Path(cfg.data_root) / "coco"
    layout = COCO_LAYOUT.format(train=cfg.coco_train_data, test=cfg.coco_test_data, valid=cfg.coco_valid_data)
    train_dir, test_dir, valid_dir = (base / cfg.coco_train_data, base / cfg.coco_test_data, base / cfg.coco_valid_data)
    _require_dir(train_dir, layout)
    _require_dir(valid_dir, layout)
    # Many people download only train2017 and val2017; test2017 adds unlabelled training images when present.
    train_paths = list_images(train_dir, recursive=False)
    if test_dir.is_dir():
        train_paths += list_images(test_dir, recursive=False)
    valid_paths = list_images(valid_dir, recursive=False)
    for folder, paths in ((train_dir, train_paths), (valid_dir, valid_paths)):
        if not paths:
            raise DatasetLayoutError(f"no images in '{folder}'; expected layout: {layout}")
    return DatasetSource(
        "coco",
        train=FileSplit(base, train_paths, np.full(len(train_paths), -1, dtype=np.int64)),
        valid=FileSplit(base, valid_paths, np.full(len(valid_paths), -1, dtype=np.int64)),
        class_names=[],
    )


# -- Food-101 -----------------------------------------------------------------------------------------

FOOD_LAYOUT = (
    "<data_root>/food-101/{images}/<class>/<id>.jpg with {meta}/train.txt and {meta}/test.txt "
    "(lines 'class/id', or train.json / test.json) and {meta}/classes.txt"
)


def _read_utf8(path: Path, expected: str) -> str:
    """A meta file's text; one line naming the file when it is not UTF-8 (Food-101's files are ASCII)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetLayoutError(
            f"'{path}': not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); expected {expected}"
        ) from None


def _read_food_split(meta: Path, split: str, layout: str) -> tuple[Path, list[str]]:
    """The file read and its entries 'class/id': meta/<split>.txt (CRLF tolerated) or meta/<split>.json."""
    text_file, json_file = meta / f"{split}.txt", meta / f"{split}.json"
    if text_file.is_file():
        lines = _read_utf8(text_file, "one 'class/id' per line").splitlines()
        return text_file, [line.strip() for line in lines if line.strip()]
    if json_file.is_file():
        shape = "{class: ['class/id', ...]}"
        try:
            by_class = json.loads(_read_utf8(json_file, f"JSON {shape}"))
        except json.JSONDecodeError as exc:
            raise DatasetLayoutError(f"'{json_file}': not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(by_class, dict):
            raise DatasetLayoutError(f"'{json_file}': expected {shape}, found {json.dumps(by_class)[:60]}")
        for name, entries in by_class.items():
            if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
                raise DatasetLayoutError(
                    f"'{json_file}': class {json.dumps(name)} maps to {json.dumps(entries)[:60]}; expected {shape}"
                )
        return json_file, [entry.strip() for entries in by_class.values() for entry in entries]
    raise DatasetLayoutError(f"split file '{text_file}' (or '{json_file.name}') not found; expected layout: {layout}")


def food101_source(cfg: DataConfig) -> DatasetSource:
    """Food-101: 101 classes, 750 training and 250 test images each. Labels are each class's index in
    sorted order, which is what the original got from scikit-learn's LabelEncoder."""
    base = Path(cfg.data_root) / "food-101"
    images, meta = base / cfg.images_data, base / cfg.meta_data
    layout = FOOD_LAYOUT.format(images=cfg.images_data, meta=cfg.meta_data)
    _require_dir(images, layout)
    _require_dir(meta, layout)
    split_files = {split: _read_food_split(meta, split, layout) for split in ("train", "test")}
    entries = {split: listed for split, (_, listed) in split_files.items()}
    classes_file = meta / "classes.txt"
    if classes_file.is_file():
        text = _read_utf8(classes_file, "one class name per line")
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        names = [entry.split("/")[0] for split in entries.values() for entry in split]
    class_names = sorted(set(names))
    index = {name: i for i, name in enumerate(class_names)}

    def split_of(name: str) -> FileSplit:
        paths, labels = [], []
        split_file = split_files[name][0]
        for entry in entries[name]:
            label, _, image_id = entry.partition("/")
            if not image_id or label not in index:
                raise DatasetLayoutError(
                    f"'{split_file}': entry '{entry}' is not 'class/id' with a class from classes.txt"
                )
            path = images / label / image_id
            paths.append(path if path.suffix.lower() in IMAGE_SUFFIXES else path.with_name(image_id + ".jpg"))
            labels.append(index[label])
        if not paths:
            raise DatasetLayoutError(f"'{split_file}' lists no images; expected layout: {layout}")
        return FileSplit(images, paths, np.asarray(labels, dtype=np.int64))

    return DatasetSource("food-101", split_of("train"), split_of("test"), class_names)


# -- any folder of images -----------------------------------------------------------------------------

FOLDER_LAYOUT = (
    "<data_root>/[<class>/]*.jpg (split by data.valid_fraction), or <data_root>/train/[<class>/]*.jpg "
    "with <data_root>/valid/[<class>/]*.jpg"
)


def _labelled(root: Path, paths: list[Path], class_index: dict[str, int]) -> np.ndarray:
    """The first-level sub-folder under `root` names the class; images directly in `root` get -1."""
    labels = []
    for path in paths:
        parts = path.relative_to(root).parts
        labels.append(class_index[parts[0]] if len(parts) > 1 else -1)
    return np.asarray(labels, dtype=np.int64)


def _class_names(root: Path, paths: list[Path]) -> list[str]:
    return sorted({path.relative_to(root).parts[0] for path in paths if len(path.relative_to(root).parts) > 1})


def folder_source(cfg: DataConfig) -> DatasetSource:
    """Any tree of images at data_root. Labels come from first-level sub-folders when there are any.
    A `train/` folder beside `valid/` (or `val/`, `validation/`, `test/`) gives the split; otherwise a
    seeded `valid_fraction` of the images is held out."""
    root = Path(cfg.data_root)
    _require_dir(root, FOLDER_LAYOUT)
    valid_dir = next((root / name for name in VALID_FOLDER_NAMES if (root / name).is_dir()), None)
    if (root / "train").is_dir() and valid_dir is not None:
        train_root = root / "train"
        train_paths, valid_paths = list_images(train_root, True), list_images(valid_dir, True)
        for folder, paths in ((train_root, train_paths), (valid_dir, valid_paths)):
            if not paths:
                raise DatasetLayoutError(f"no images in '{folder}'; expected layout: {FOLDER_LAYOUT}")
        class_names = sorted(set(_class_names(train_root, train_paths)) | set(_class_names(valid_dir, valid_paths)))
        index = {name: i for i, name in enumerate(class_names)}
        return DatasetSource(
            "folder",
            FileSplit(train_root, train_paths, _labelled(train_root, train_paths, index)),
            FileSplit(valid_dir, valid_paths, _labelled(valid_dir, valid_paths, index)),
            class_names,
        )
    paths = list_images(root, True)
    if len(paths) < 2:
        raise DatasetLayoutError(f"fewer than 2 images under '{root}'; expected layout: {FOLDER_LAYOUT}")
    class_names = _class_names(root, paths)
    labels = _labelled(root, paths, {name: i for i, name in enumerate(class_names)})
    train, valid = seeded_split(len(paths), cfg.valid_fraction, cfg.split_seed)
    return DatasetSource(
        "folder",
        FileSplit(root, [paths[i] for i in train], labels[train]),
        FileSplit(root, [paths[i] for i in valid], labels[valid]),
        class_names,
    )


SOURCES = {
    "digits": digits_source,
    "fashion-mnist": fashion_mnist_source,
    "coco": coco_source,
    "food-101": food101_source,
    "folder": folder_source,
}


def find_source(cfg: DataConfig) -> DatasetSource:
    return SOURCES[cfg.dataset](cfg)
