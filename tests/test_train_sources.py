"""One training epoch from each dataset source, through the cache, with a tiny network."""

from __future__ import annotations

import csv

import pytest

from fixtures import make_coco, make_fashion_mnist, make_food101, photo, save_jpeg
from image_autoencoding.cli import main


def _folder(root):
    for index, name in enumerate(["cats", "dogs", "owls"] * 4):
        save_jpeg(photo(index, 200, 150), root / "pets" / name / f"{index}.jpg")


SOURCES = {
    "coco": ("coco", lambda root: make_coco(root, n_train=10, n_test=2, n_valid=3, broken=False), ""),
    "food-101": ("food-101", lambda root: make_food101(root, per_class=(4, 1)), ""),
    "folder": ("folder", _folder, "pets"),
    "fashion-mnist": ("fashion-mnist", make_fashion_mnist, ""),
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_one_epoch_from_each_source(tiny, tmp_path, name):
    dataset, make, sub = SOURCES[name]
    make(tmp_path / "data")
    assert main(["train", *tiny, f"data.dataset={dataset}", f"data.data_root={tmp_path / 'data' / sub}",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.batch_size=4"]) == 0
    (run,) = (tmp_path / "results/vae").iterdir()
    with (run / "metrics.csv").open() as handle:
        (row,) = csv.DictReader(handle)
    assert float(row["train_recon"]) > 0 and float(row["valid_recon"]) > 0
    assert (run / "images/valid/reconstruction_epoch_001.png").is_file()
    assert not (run / "bad_files.csv").exists()
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and valid caches
