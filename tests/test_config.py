from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from image_autoencoding.cli import main
from image_autoencoding.config import ConfigError, load_config


def test_defaults_are_the_original_recipe():
    cfg = load_config()
    assert (cfg.model.kernel_size, cfg.model.stride, cfg.model.padding) == (5, 2, 2)
    assert cfg.model.encoder_channels == [64, 128, 256]
    assert cfg.model.decoder_channels == [256, 128, 32, 3]
    assert (cfg.model.fc_dim, cfg.model.latent_dim, cfg.data.image_size) == (1024, 128, 64)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay, cfg.train.epochs) == (64, 0.001, 1e-7, 100)
    assert cfg.data.image_crop == 375 and cfg.data.mean == (0.5,) * 3 and cfg.data.std == (0.5,) * 3
    assert cfg.data.data_root == "datasets"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 16\nmodel:\n  latent_dim: 32\n")
    cfg = load_config(path, ["train.epochs=3", "train.alpha=1/batch_size", "model.encoder_channels=[8,16,32]"])
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 16 and cfg.model.latent_dim == 32
    assert cfg.train.kl_weight() == pytest.approx(1 / 16)
    assert cfg.model.encoder_channels == [8, 16, 32]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.bach_size=3"], "train.bach_size"),
        (["train.batch_size=abc"], "train.batch_size"),
        (["train.batch_size=0"], "train.batch_size"),
        (["data.image_size=60"], "data.image_size"),
        (["train.alpha=-1"], "train.alpha"),
        (["train.alpha=1/bs"], "train.alpha"),
        (["optimizer.lr=1"], "optimizer"),
        (["train.epochs"], "train.epochs"),
        # Keys whose names begin like pydantic's type tags ('str...', 'int...') keep their name.
        (["model.stride=0"], "'model.stride'"),
        (["model.encoder_channels=[8,0,16]"], "'model.encoder_channels'"),
        (["train.lr=inf"], "'train.lr'"),
        (["train.lr=.nan"], "'train.lr'"),
        (["train.max_steps_per_epoch=0"], "'train.max_steps_per_epoch'"),
        # A device this machine does not have: refused before a run folder exists.
        (["train.device=tpu"], "train.device"),
        (["train.device=cuda:7"] if not torch.cuda.is_available() else ["train.device=tpu"], "train.device"),
    ],
)
def test_bad_values_exit_2_naming_the_key(overrides, named, capsys, tmp_path):
    assert main(["train", *overrides, f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()  # nothing was started


def test_missing_config_file_exits_2(capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "not found" in err


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  latent: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*model\.latent"):
        load_config(path)


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  epochs: 2  # caf\xe9\n".encode("latin-1"))
    assert main(["train", "--config", str(path), f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "latin1.yaml" in err and "UTF-8" in err, err


def test_a_section_the_file_makes_a_number_is_blamed_on_the_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: 5\n")
    assert main(["train", "--config", str(path), "data.image_size=32", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "c.yaml" in err and "'data'" in err and "override" not in err, err


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"^.*c\.yaml: config key 'train\.epochs'"):
        load_config(path, ["train.lr=0.01"])
    with pytest.raises(ConfigError, match=r"^override 'train\.batch_size=0': config key 'train\.batch_size'"):
        load_config(None, ["train.batch_size=0"])


@pytest.mark.parametrize("key", ["train.log_dir", "data.cache_dir"])
def test_a_folder_key_pointing_at_a_file_is_one_line(key, tmp_path, capsys):
    """The cache is built for file datasets only (the bundled digits live in memory)."""
    folder = tmp_path / "photos" / "folder"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"{i}.png")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    args = ["data.dataset=folder", f"data.data_root={tmp_path / 'photos'}", "data.image_size=16",
            f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'out'}", f"{key}={a_file}"]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and key in err and "a_file" in err, err
    assert not list((tmp_path / "out").rglob("vae_*"))  # no run folder was left behind
    assert a_file.read_text() == "not a folder"


def test_importing_the_main_module_runs_nothing():
    done = subprocess.run([sys.executable, "-c", "import image_autoencoding.__main__"], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
