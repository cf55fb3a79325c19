"""Dataset layouts and labels: COCO, Food-101, any folder, Fashion-MNIST; layout errors exit 2."""

from __future__ import annotations

import shutil

import pytest

from fixtures import make_coco, make_fashion_mnist, make_food101, photo, save_jpeg
from image_autoencoding.cli import main
from image_autoencoding.config import load_config
from image_autoencoding.data.sources import find_source, read_idx


def _source(dataset: str, root, *overrides):
    return find_source(load_config(None, [f"data.dataset={dataset}", f"data.data_root={root}", *overrides]).data)


def test_coco_trains_on_train_and_test_and_evaluates_on_val(tmp_path):
    make_coco(tmp_path, n_train=3, n_test=2, n_valid=2, broken=False)
    source = _source("coco", tmp_path)
    train_names = [p.parent.name for p in source.train.paths]
    assert train_names.count("train2017") == 3 and train_names.count("test2017") == 2
    assert [p.parent.name for p in source.valid.paths] == ["val2017"] * 2
    assert (source.train.labels == -1).all() and source.class_names == []


def test_coco_without_test2017_still_trains(tmp_path):
    make_coco(tmp_path, n_train=3, n_test=0, n_valid=2, broken=False)
    assert not (tmp_path / "coco/coco_test2017").exists()
    assert len(_source("coco", tmp_path).train.paths) == 3


def test_food101_labels_are_sorted_class_indices(tmp_path):
    make_food101(tmp_path, classes=("waffles", "apple_pie", "ramen"), per_class=(2, 1))
    source = _source("food-101", tmp_path)
    assert source.class_names == ["apple_pie", "ramen", "waffles"]
    for split in (source.train, source.valid):
        for path, label in zip(split.paths, split.labels, strict=True):
            assert path.is_file() and source.class_names[label] == path.parent.name
    assert len(source.train.paths) == 6 and len(source.valid.paths) == 3


@pytest.mark.parametrize("form", ["crlf", "json"])
def test_food101_split_file_forms(tmp_path, form):
    make_food101(tmp_path, per_class=(2, 1), crlf=form == "crlf", json_meta=form == "json")
    source = _source("food-101", tmp_path)
    assert all(path.is_file() for path in source.train.paths)
    assert sorted(set(source.valid.labels.tolist())) == [0, 1, 2]


def test_folder_labels_from_sub_folders_and_seeded_split(tmp_path):
    for index, name in enumerate(["cats", "dogs"] * 5):
        save_jpeg(photo(index), tmp_path / "pets" / name / f"{index}.jpg")
    (tmp_path / "pets" / "notes.txt").write_text("not an image")
    first = _source("folder", tmp_path / "pets", "data.valid_fraction=0.3")
    again = _source("folder", tmp_path / "pets", "data.valid_fraction=0.3")
    assert first.class_names == ["cats", "dogs"]
    assert len(first.train.paths) == 7 and len(first.valid.paths) == 3
    assert first.valid.paths == again.valid.paths  # seeded
    for split in (first.train, first.valid):
        for path, label in zip(split.paths, split.labels, strict=True):
            assert first.class_names[label] == path.parent.name


def test_folder_with_train_and_valid_folders(tmp_path):
    for split, count in (("train", 4), ("valid", 2)):
        for index in range(count):
            save_jpeg(photo(index), tmp_path / split / f"{index}.jpg")
    source = _source("folder", tmp_path)
    assert len(source.train.paths) == 4 and len(source.valid.paths) == 2
    assert (source.train.labels == -1).all() and source.class_names == []


def test_fashion_mnist_idx_files_gzipped_or_not(tmp_path):
    make_fashion_mnist(tmp_path, n_train=20, n_test=10)
    source = _source("fashion-mnist", tmp_path)
    assert source.train.images.shape == (20, 28, 28) and source.valid.images.shape == (10, 28, 28)
    assert source.train.labels.tolist() == [i % 10 for i in range(20)]
    assert source.class_names[9] == "Ankle boot"


def test_truncated_idx_file_is_named(tmp_path):
    make_fashion_mnist(tmp_path)
    path = tmp_path / "fashion-mnist/t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(Exception, match="t10k-images-idx3-ubyte.*truncated"):
        read_idx(path)


@pytest.mark.parametrize(
    ("dataset", "make", "remove", "named"),
    [
        ("coco", lambda root: make_coco(root, 2, 1, 1, broken=False), "coco/coco_valid2017/val2017", "val2017"),
        ("food-101", make_food101, "food-101/meta/test.txt", "meta/test.txt"),
        ("food-101", make_food101, "food-101/images", "food-101/images"),
        ("folder", lambda root: root, "missing", "missing"),
    ],
)
def test_layout_errors_are_one_line_naming_the_path_exit_2(tmp_path, capsys, dataset, make, remove, named):
    make(tmp_path)
    target = tmp_path / remove
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    root = tmp_path / "missing" if dataset == "folder" else tmp_path
    cache = tmp_path / "cache"
    code = main(["prepare", "-q", f"data.dataset={dataset}", f"data.data_root={root}", f"data.cache_dir={cache}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and named in err and "expected layout" in err and "Traceback" not in err
    assert not cache.exists()  # nothing built


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("image_autoencoding.data.sources.FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    assert main(["prepare", "-q", "data.dataset=fashion-mnist", f"data.data_root={tmp_path}"]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_junk_files_are_ignored(tmp_path):
    make_coco(tmp_path, n_train=2, n_test=0, n_valid=1, broken=False)
    train = tmp_path / "coco/coco_train2017/train2017"
    for name in (".DS_Store", "._000000000001.jpg", "Thumbs.db"):
        (train / name).write_bytes(b"junk")
    names = {p.name for p in _source("coco", tmp_path).train.paths}
    assert names == {"000000000001.jpg", "000000000002.jpg"}


@pytest.mark.parametrize(
    ("meta_file", "content", "expected"),
    [
        ("train.txt", b"apple_pie/100\ncr\xe8me_br\xfbl\xe9e/1\n", "not UTF-8"),
        ("classes.txt", b"apple_pie\ncr\xe8me_br\xfbl\xe9e\n", "not UTF-8"),
        ("train.json", b'{"apple_pie": 5}', "class \"apple_pie\" maps to 5; expected {class: ['class/id', ...]}"),
        ("train.json", b'{"apple_pie": "apple_pie/100"}', "class \"apple_pie\" maps to \"apple_pie/100\""),
        ("train.json", b'{"apple_pie": [100]}', "class \"apple_pie\" maps to [100]"),
        ("train.json", b'{"pizza": ["pizza/100"]}', "entry 'pizza/100' is not 'class/id' with a class from"),
        ("train.json", b'{}', "lists no images"),
    ],
)
def test_food101_meta_of_the_wrong_encoding_or_shape_is_one_line_naming_the_file(
        tmp_path, capsys, meta_file, content, expected):
    make_food101(tmp_path, per_class=(1, 1), json_meta=meta_file.endswith(".json"))
    (tmp_path / "food-101/meta" / meta_file).write_bytes(content)
    code = main(["prepare", "-q", "data.dataset=food-101", f"data.data_root={tmp_path}",
                 f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"meta/{meta_file}" in err and expected in err
