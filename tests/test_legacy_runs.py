"""Run folders, checkpoints and an export written by an older commit (tests/fixtures_data/legacy_*,
made by tests/fixtures_data/make_legacy_runs.py) keep resuming, loading, evaluating and exporting:
a user's months-old runs must survive every change of the formats."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import image_autoencoding as ia
from image_autoencoding.cli import main
from image_autoencoding.runs.checkpoint import load_checkpoint

FIXTURE = Path(__file__).resolve().parent / "fixtures_data" / "legacy_59f65d2"


def _building_script():
    spec = importlib.util.spec_from_file_location("make_legacy_runs", FIXTURE.parent / "make_legacy_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# expected/<name>.npz -> the path ia.load was given at build time: the building script's own table.
LOADED = _building_script().DECODED
# The same weights on another CPU may round differently in the last bits; a weight loaded into the
# wrong place, or BatchNorm statistics lost, changes the decode by far more.
TOLERANCE = 1e-5


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    """A copy (resuming and evaluating write into the run folders), made the working folder: the
    runs' config.yaml name their images (digits/) and cache (cache/) by relative paths."""
    copy = Path(shutil.copytree(FIXTURE, tmp_path / "legacy"))
    monkeypatch.chdir(copy)
    return copy


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _epochs(run: Path) -> list[str]:
    return [row["epoch"] for row in _rows(run)]


def test_the_fixture_records_the_commit_it_was_built_at():
    built = json.loads((FIXTURE / "built_at.json").read_text())
    assert built["commit"].startswith(FIXTURE.name.removeprefix("legacy_"))


def test_a_finished_legacy_run_resumes_for_one_more_epoch(legacy):
    run = legacy / "seed_vae_finished"
    assert main(["train", "--quiet", "--resume", str(run), "train.epochs=3"]) == 0
    assert _epochs(run) == ["1", "2", "3"]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state.epoch, state.step) == (3, 9)
    # Checkpoint format 1 kept the best validation SSIM as best_ssim: it is train.monitor's mark now,
    # so epoch 3 became best.pt only if it beat the best of epochs 1 and 2.
    ssims = [float(row["valid_ssim"]) for row in _rows(run)]
    assert state.monitor["name"] == "valid_ssim" and state.monitor["best"] == pytest.approx(max(ssims), rel=1e-5)
    assert load_checkpoint(run / "checkpoints" / "best.pt").epoch == ssims.index(max(ssims)) + 1
    # metrics.csv's training columns are read under today's names; the copy of recon is gone.
    assert all(row["train_recon"] and "decoder_loss" not in row for row in _rows(run))


def test_a_legacy_run_stopped_inside_an_epoch_resumes_inside_it(legacy):
    run = legacy / "seed_vae_inside_epoch"
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state.epoch, state.step, state.epoch_progress["steps"]) == (1, 5, 2)
    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    assert _epochs(run) == ["1", "2"]  # epoch 2 finished with its last step, not trained again
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state.epoch, state.step) == (2, 6)


def test_a_legacy_vae_gan_run_resumes_with_its_discriminator(legacy):
    run = legacy / "resnet_vae_gan_spatial"
    before = load_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["train", "--quiet", "--resume", str(run), "train.epochs=2"]) == 0
    assert _epochs(run) == ["1", "2"]
    after = load_checkpoint(run / "checkpoints" / "last.pt")
    assert after.epoch == 2 and after.optimizers["discriminator"]["state"]
    # The discriminator went on training from its saved weights, not from new ones.
    saved, trained = before.networks["discriminator"], after.networks["discriminator"]
    assert saved.keys() == trained.keys() and any(not torch.equal(saved[key], trained[key]) for key in saved)


@pytest.mark.parametrize("name", sorted(LOADED))
def test_legacy_runs_checkpoints_and_exports_decode_and_encode_as_when_saved(name):
    expected = np.load(FIXTURE / "expected" / f"{name}.npz")
    vae = ia.load(FIXTURE / LOADED[name], device="cpu")
    decoded = vae.decode(torch.from_numpy(expected["z"]), as_tensor=True)
    np.testing.assert_allclose(decoded.numpy(), expected["decoded"], atol=TOLERANCE)
    posterior = vae.encode_pixels(expected["pixels"])
    np.testing.assert_allclose(posterior.mean.numpy(), expected["mean"], atol=TOLERANCE)
    np.testing.assert_allclose(posterior.logvar.numpy(), expected["logvar"], atol=TOLERANCE)


# The run stopped inside an epoch is left out: its best.pt is an epoch's end, as seed_vae_finished's.
@pytest.mark.parametrize("name", ["seed_vae_finished", "resnet_vae_gan_spatial"])
def test_legacy_runs_evaluate_and_export(legacy, name, capsys):
    run = legacy / name
    assert main(["evaluate", str(run)]) == 0
    assert "valid split, 4 images" in capsys.readouterr().out
    out = legacy / f"{name}_export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    expected = np.load(FIXTURE / "expected" / f"{name}.npz")  # the run folder's best.pt
    decoded = ia.load(out, device="cpu").decode(torch.from_numpy(expected["z"]), as_tensor=True)
    np.testing.assert_allclose(decoded.numpy(), expected["decoded"], atol=TOLERANCE)
