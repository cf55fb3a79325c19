from __future__ import annotations

import pytest

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
    assert cfg.train.kl_weight == pytest.approx(1 / 16)
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
