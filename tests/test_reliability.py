"""Reliability rules: exact resume, crash-safe checkpoints, safe loading, export, the
non-finite loss guard, signals, unwritable / full disks and concurrent run folders.

Runs that must die by a real signal train in a subprocess; everything else calls the CLI
in-process. All runs use the tiny network from conftest.py, single-threaded, so they are exact
and fast.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

import image_autoencoding as ia
from conftest import TINY
from helpers.faults import ENV as SIGNAL_AT_STEP
from helpers.faults import SCRIPT as VAE_WITH_FAULTS
from helpers.faults import NanBatches, SignalAtStep
from image_autoencoding.cli import main
from image_autoencoding.config import load_config
from image_autoencoding.data.image_data import load_image_data
from image_autoencoding.errors import UserError
from image_autoencoding.models.factory import build_model
from image_autoencoding.runs import epoch_pictures
from image_autoencoding.runs import report as run_report
from image_autoencoding.runs.checkpoint import (
    CheckpointError,
    first_non_finite,
    kept_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from image_autoencoding.runs.resume import load_newest_good
from image_autoencoding.runs.run_dir import create_run_dir
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.optimizers import make_optimizer
from image_autoencoding.training.rng import rng_state
from image_autoencoding.training.state import TrainingState
from image_autoencoding.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# 3 epochs of 4 steps, last.pt every 3 steps and epoch_N.pt every epoch: checkpoints land both
# inside epochs and on their ends. Bit-identical resume is promised on CPU (cuDNN has
# nondeterministic kernels), so the device is pinned.
EXACT = ["train.epochs=3", "train.max_steps_per_epoch=4", "train.checkpoint_every_steps=3", "train.checkpoint_every=1",
         "train.device=cpu"]


# In-process runs match the single-threaded subprocesses bit for bit.
pytestmark = pytest.mark.usefixtures("one_thread")


def _vae(args: list[str], signal_at: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, VAE_WITH_FAULTS, *args], env=_env(signal_at),
        capture_output=True, text=True, timeout=180,
    )


def _env(signal_at: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != SIGNAL_AT_STEP}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    if signal_at:
        env[SIGNAL_AT_STEP] = signal_at
    return env


def _run_dir(output: Path) -> Path:
    (run,) = (output / "results" / "vae").iterdir()
    return run


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_last_checkpoint_at(run: Path, step: int, step_in_epoch: int) -> None:
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state.step, state.epoch_progress["steps"]) == (step, step_in_epoch)


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def _fake_state(value: float = 1.0) -> dict:
    """The shape of a checkpoint (as its file holds it) without training a model."""
    optimizer = {"state": {}, "param_groups": []}
    return {"format_version": 2, "model": {"w": torch.full((4,), value)}, "encoder_optimizer": optimizer,
            "decoder_optimizer": optimizer, "epoch": 1, "step": 3, "rng": rng_state(), "config": {}}


def _save_fake(state: dict, path: Path) -> None:
    """A checkpoint as save_checkpoint writes it, from its raw contents (which may be wrong on purpose)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# -- resume -------------------------------------------------------------------------------------


def test_runs_killed_at_any_step_resume_bit_identical(tiny, tmp_path):
    killed_out, reference_out = tmp_path / "killed", tmp_path / "reference"
    first = _vae(["train", "--quiet", *tiny, *EXACT, f"train.output_dir={killed_out}"], "SIGKILL@8")
    assert first.returncode == -signal.SIGKILL, first.stderr
    run = _run_dir(killed_out)
    # Killed on the last batch of epoch 2, before its end: two steps after the last checkpoint.
    _assert_last_checkpoint_at(run, step=6, step_in_epoch=2)
    second = _vae(["train", "--quiet", "--resume", str(run)], "SIGKILL@9")
    assert second.returncode == -signal.SIGKILL, second.stderr
    # Killed right after the mid-epoch checkpoint of step 9, the first step of epoch 3.
    _assert_last_checkpoint_at(run, step=9, step_in_epoch=1)
    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    assert main(["train", "--quiet", *tiny, *EXACT, f"train.output_dir={reference_out}"]) == 0

    resumed = load_checkpoint(run / "checkpoints" / "last.pt")
    uninterrupted = load_checkpoint(_run_dir(reference_out) / "checkpoints" / "last.pt")
    for state in (resumed, uninterrupted):
        state.config["train"].pop("output_dir")
    assert resumed.step == 12
    _assert_identical(resumed.to_dict(), uninterrupted.to_dict())  # weights, both optimizers, RNG, progress

    rows, reference_rows = _metrics(run), _metrics(_run_dir(reference_out))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for row, reference in zip(rows, reference_rows, strict=True):
        for timing in ("images_per_s", "seconds"):
            row.pop(timing), reference.pop(timing)
        assert row == reference  # the loss sums carried across kills give the same epoch means


class _CrashAtStep(Callback):
    """A process dying at once after `step` (kill -9, the OOM killer): nothing more is written."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, batch, sums) -> None:
        if trainer.step == self.step:
            raise _Crashed


class _Crashed(Exception):
    pass


def test_a_run_killed_before_its_first_epoch_checkpoint_resumes_from_the_last_epoch_end(tiny, tmp_path):
    # train.checkpoint_every is 10: epoch_N.pt would first be written after epoch 10.
    args = [*tiny, "train.epochs=3", "train.max_steps_per_epoch=3", "train.checkpoint_every_minutes=null"]
    with pytest.raises(_Crashed):
        main(["train", "--quiet", *args], callbacks=[_CrashAtStep(5)])
    run = _run_dir(tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    _assert_last_checkpoint_at(run, step=3, step_in_epoch=0)  # the end of epoch 1
    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2", "3"]


def test_last_pt_is_written_inside_an_epoch_once_the_minutes_have_passed(tiny, tmp_path):
    # Every step is past a checkpoint interval this short.
    args = [*tiny, "train.epochs=2", "train.max_steps_per_epoch=3", "train.checkpoint_every_minutes=1e-9"]
    with pytest.raises(_Crashed):
        main(["train", "--quiet", *args], callbacks=[_CrashAtStep(5)])
    run = _run_dir(tmp_path)
    _assert_last_checkpoint_at(run, step=5, step_in_epoch=2)
    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt").step == 6


def test_nothing_to_resume_from_names_what_the_checkpoints_folder_holds(tiny, tmp_path, capsys, no_final_report):
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    run = _run_dir(tmp_path)
    for path in (run / "checkpoints").glob("*.pt"):
        if path.name != "best.pt":
            path.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    error = _one_line(capsys.readouterr().err)
    assert "it holds best.pt" in error and "--checkpoint best" in error
    assert main(["train", "--resume", str(run), "--checkpoint", "best", "train.epochs=2"]) == 0


class _CopyLastCheckpointAtStep(Callback):
    """Keeps a copy of the last.pt written at `step` (step-end callbacks run after its write)."""

    def __init__(self, step: int, copy: Path, output: Path):
        self.step, self.copy, self.output = step, copy, output

    def on_step_end(self, trainer, batch, sums) -> None:
        if trainer.step == self.step:
            shutil.copy(_run_dir(self.output) / "checkpoints" / "last.pt", self.copy)


def test_metrics_rows_after_the_checkpoint_are_replaced_not_duplicated(tiny, tmp_path):
    inside_epoch_2 = tmp_path / "inside_epoch_2.pt"
    args = [*tiny, "train.epochs=2", "train.max_steps_per_epoch=3", "train.checkpoint_every_steps=2"]
    assert main(["train", *args], callbacks=[_CopyLastCheckpointAtStep(4, inside_epoch_2, tmp_path)]) == 0
    run = _run_dir(tmp_path)
    before = _metrics(run)
    assert [r["epoch"] for r in before] == ["1", "2"]
    assert load_checkpoint(inside_epoch_2).epoch == 1  # one epoch done, epoch 2 under way

    assert main(["train", "--resume", str(run), "--checkpoint", str(inside_epoch_2)]) == 0
    after = _metrics(run)
    assert [r["epoch"] for r in after] == ["1", "2"]
    assert after[0] == before[0]
    assert {k: after[1][k] for k in ("train_recon", "train_kl", "valid_recon")} == {
        k: before[1][k] for k in ("train_recon", "train_kl", "valid_recon")
    }


def test_resume_from_an_older_checkpoint_sets_the_later_epochs_aside(tiny, tmp_path, no_final_report):
    assert main(["train", *tiny, "train.epochs=3", "train.checkpoint_every=1", "train.keep_checkpoints=0"]) == 0
    run = _run_dir(tmp_path)
    folder = run / "checkpoints"
    written = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert load_checkpoint(folder / "best.pt").epoch > 1  # else this test would prove nothing

    # A different branch from epoch 1: another learning rate.
    assert main(["train", "--resume", str(run), "--checkpoint", "epoch_1", "train.epochs=2", "train.lr=0.003"]) == 0
    (aside,) = folder.glob("abandoned_*")
    assert sorted(p.name for p in aside.iterdir()) == ["best.pt", "epoch_2.pt", "epoch_3.pt", "last.pt"]
    for path in aside.iterdir():
        assert path.read_bytes() == written[path.name]  # moved, not rewritten
    assert (folder / "epoch_1.pt").read_bytes() == written["epoch_1.pt"]
    assert not (folder / "epoch_3.pt").exists()
    best, newest = load_checkpoint(folder / "best.pt"), load_checkpoint(folder / "epoch_2.pt")
    assert best.epoch == 2 and best.config["train"]["lr"] == 0.003
    _assert_identical(best.model, newest.model)
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2"]
    assert f"to {aside}" in (run / "train.log").read_text()


def test_resume_refuses_changed_model_or_data_naming_every_key(tiny, tmp_path, capsys):
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    run = _run_dir(tmp_path)
    last = (run / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    changes = ["model.latent_dim=16", "data.valid_fraction=0.3", "model.encoder_channels=[8,8,16]", "train.epochs=2"]
    assert main(["train", "--resume", str(run), *changes]) == 2
    error = _one_line(capsys.readouterr().err)
    for key in ("model.latent_dim", "data.valid_fraction", "model.encoder_channels"):
        assert key in error
    assert "train.epochs" not in error
    assert (run / "checkpoints" / "last.pt").read_bytes() == last  # refused before training
    assert len(_metrics(run)) == 1


def test_resume_refuses_a_checkpoint_of_another_run_naming_every_key(tiny, tmp_path, capsys, no_final_report):
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    run = _run_dir(tmp_path)
    other = tmp_path / "other"
    assert main(["train", *tiny, "train.epochs=1", "model.latent_dim=4", "data.split_seed=1",
                 f"train.output_dir={other}"]) == 0
    foreign = _run_dir(other) / "checkpoints" / "last.pt"
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.csv")}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--checkpoint", str(foreign), "train.epochs=2"]) == 2
    error = _one_line(capsys.readouterr().err)
    assert str(foreign) in error and "model.latent_dim" in error and "data.split_seed" in error
    assert "train.epochs" not in error
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("where", ["config.yaml", "checkpoint"])
def test_a_run_saved_with_a_key_this_version_does_not_know_is_refused_naming_it(tiny, tmp_path, capsys, where,
                                                                               no_final_report):
    """A run's saved config is read as strictly as a config file: a key dropped silently might have
    changed what the weights mean."""
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    run = _run_dir(tmp_path)
    if where == "config.yaml":
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["model"]["attention"] = True
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        command = ["evaluate", str(run), "--limit", "8"]
    else:
        state = load_checkpoint(run / "checkpoints" / "last.pt")
        state.config["model"]["attention"] = True
        save_checkpoint(state, run / "checkpoints" / "last.pt")
        command = ["train", "--resume", str(run), "train.epochs=2"]
    capsys.readouterr()
    assert main(command) == 2
    error = _one_line(capsys.readouterr().err)
    assert "unknown config key 'model.attention'" in error and "another version of image-autoencoding" in error
    assert [r["epoch"] for r in _metrics(run)] == ["1"]


def test_resume_inside_an_epoch_refuses_a_changed_batch_size(tmp_path, capsys):
    path = tmp_path / "inside.pt"
    config = load_config(None, TINY)
    progress = {"steps": 2, "sums": torch.zeros(2), "images": 64, "skipped": 0, "seconds": 1.0}
    model = build_model(config.model, config.data.image_size)
    encoder_optimizer, decoder_optimizer = (make_optimizer(network.parameters(), config.train)
                                            for network in (model.encoder, model.decoder))
    _save_fake({**_fake_state(), "model": model.state_dict(), "encoder_optimizer": encoder_optimizer.state_dict(),
                "decoder_optimizer": decoder_optimizer.state_dict(), "epoch_progress": progress,
                "config": config.to_dict()}, path)
    assert main(["train", "--resume", str(tmp_path), "--checkpoint", str(path), "train.batch_size=16"]) == 2
    error = _one_line(capsys.readouterr().err)
    assert "train.batch_size" in error and "inside an epoch" in error


def test_resume_applies_and_logs_training_only_changes(tiny, tmp_path):
    assert main(["train", *tiny, "train.epochs=1", "train.lr_schedule=exponential", "train.warmup_steps=0",
                 "train.decay_lr=0.5"]) == 0
    run = _run_dir(tmp_path)
    assert main(["train", "--resume", str(run), "train.epochs=2", "train.lr=0.004", "train.weight_decay=0.01"]) == 0
    log = (run / "train.log").read_text()
    assert "resume changes train.lr: 0.001 -> 0.004" in log and "train.epochs: 1 -> 2" in log
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state.epoch == 2
    for name in ("encoder", "decoder"):
        group = state.optimizers[name]["param_groups"][0]
        # As if started with lr 0.004: epoch 2's steps ran at it halved once.
        assert group["lr"] == pytest.approx(0.004 * 0.5) and group["weight_decay"] == 0.01


# -- checkpoints --------------------------------------------------------------------------------


def test_a_crash_inside_the_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    _save_fake(_fake_state(1.0), path)

    def crash_halfway(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("simulated crash inside torch.save")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(TrainingState.from_dict(_fake_state(2.0)), path)
    assert torch.equal(load_checkpoint(path).model["w"], torch.full((4,), 1.0))
    assert list(tmp_path.iterdir()) == [path]


def test_temporary_files_are_never_taken_for_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    _save_fake(_fake_state(2.0), folder / "epoch_2.pt")
    _save_fake(_fake_state(3.0), folder / "last.pt")
    # What a crash mid-save could leave behind.
    for stale in (".last.pt.k2j4h1.tmp", ".epoch_9.pt.x8z.tmp", ".last.pt.link.tmp"):
        (folder / stale).write_bytes(b"PK\x03\x04 half a zip")
    assert kept_checkpoints(folder) == [folder / "last.pt", folder / "epoch_2.pt"]
    path, state, failures = load_newest_good(tmp_path)
    assert path == folder / "last.pt" and not failures
    assert torch.equal(state.model["w"], torch.full((4,), 3.0))


def test_a_resume_removes_checkpoint_temporaries_left_by_a_killed_write(tiny, tmp_path, no_final_report):
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    run = _run_dir(tmp_path)
    folder = run / "checkpoints"
    stale = [folder / ".last.pt.k2j4h1x9.tmp", folder / ".epoch_1.pt.q0w9e8r7.tmp"]
    users = [folder / "notes.tmp", folder / ".my_backup.pt", folder / "last.pt.tmp"]
    for path in [*stale, *users]:
        path.write_bytes(b"PK\x03\x04 half a zip")
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 0
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in users)
    log = (run / "train.log").read_text()
    assert all(path.name in log for path in stale)


@pytest.mark.parametrize("kind", ["truncated", "foreign tensor", "foreign dict", "not a zip"])
def test_a_bad_checkpoint_is_one_line_naming_the_file_exit_2(tmp_path, capsys, kind):
    path = tmp_path / "bad.pt"
    if kind == "truncated":
        _save_fake(_fake_state(), tmp_path / "good.pt")
        whole = (tmp_path / "good.pt").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "foreign tensor":
        torch.save(torch.ones(3), path)
    elif kind == "foreign dict":
        torch.save({"model": {"w": torch.ones(3)}, "format_version": 1}, path)
    else:
        path.write_text("hello")
    assert main(["train", "--resume", str(tmp_path), "--checkpoint", str(path)]) == 2
    error = _one_line(capsys.readouterr().err)
    assert str(path) in error and "weights_only" not in error
    assert main(["export", str(tmp_path), "--checkpoint", str(path)]) == 2
    assert str(path) in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("key, value, expected", [
    ("model", 5, "model is 5, expected a state dict"),
    ("model", {"w": 1.5}, "model['w'] is 1.5, expected a tensor"),
    ("epoch", "three", "epoch is 'three', expected a whole number >= 0"),
    ("step", -1, "step is -1, expected a whole number >= 0"),
    ("encoder_optimizer", [], "encoder_optimizer is a list, expected an optimizer state dict"),
    ("config", "tiny", "config is 'tiny', expected a dict"),
    ("rng", {**rng_state(), "python": {"version": 3, "internal": [0] * 3, "gauss": None}}, "rng.python.internal"),
])
def test_a_checkpoint_value_of_the_wrong_type_is_one_line_naming_file_and_key(tmp_path, capsys, key, value, expected):
    """Every key present, one of the wrong type: refused where checkpoints are read, by every command."""
    path = tmp_path / "bad.pt"
    _save_fake({**_fake_state(), key: value}, path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(load_config().to_dict()))  # a run folder for reconstruct
    for command in (["train", "--resume", str(tmp_path), "--checkpoint", str(path)],
                    ["reconstruct", str(tmp_path), "--checkpoint", str(path), str(tmp_path / "image.png")],
                    ["export", str(tmp_path), "--checkpoint", str(path)]):
        assert main(command) == 2, command
        error = _one_line(capsys.readouterr().err)
        assert f"checkpoint '{path}'" in error and expected in error, command
    with pytest.raises(UserError, match=re.escape(expected)):
        ia.load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "config.yaml"]  # nothing written or moved


@pytest.mark.parametrize("case", ["config latent_dim 1e9", "a tensor of another shape"])
def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused_before_building_the_model(tmp_path, capsys,
                                                                                               case):
    """model.latent_dim 1e9 in the checkpoint's config would allocate 1 TB when the model is built; a
    tensor of another shape failed inside torch's load_state_dict."""
    config = load_config(None, TINY)
    weights = build_model(config.model, config.data.image_size).state_dict()
    if case == "config latent_dim 1e9":
        config = load_config(None, [*TINY, "model.latent_dim=1000000000"])
    else:
        weights["encoder.to_mean.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    _save_fake({**_fake_state(), "model": weights, "config": config.to_dict()}, path)
    assert main(["train", "--resume", str(tmp_path), "--checkpoint", str(path)]) == 2
    error = _one_line(capsys.readouterr().err)
    assert f"checkpoint '{path}' does not fit" in error and "encoder.to_mean.weight is [" in error
    with pytest.raises(CheckpointError, match="encoder.to_mean.weight is"):
        ia.load(path)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pt"]


@pytest.mark.parametrize("case", ["a parameter too few", "a moment of another shape"])
def test_an_optimizer_state_that_does_not_fit_the_model_is_refused_before_resuming(tiny, tmp_path, capsys, case,
                                                                                  no_final_report):
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    run = _run_dir(tmp_path)
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    optimizer = state.optimizers["encoder"]
    if case == "a parameter too few":
        dropped = optimizer["param_groups"][0]["params"].pop()
        optimizer["state"].pop(dropped, None)
    else:
        entry = optimizer["state"][0]
        entry["square_avg"] = torch.zeros(2, 2)
    save_checkpoint(state, last)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
    error = _one_line(capsys.readouterr().err)
    assert f"checkpoint '{last}': encoder_optimizer does not fit the encoder" in error
    assert [r["epoch"] for r in _metrics(run)] == ["1"]


def test_last_best_and_epoch_checkpoints_are_separate_files_so_resume_can_fall_back(tiny, tmp_path,
                                                                                   no_final_report):
    assert main(["train", *tiny, "train.epochs=2", "train.checkpoint_every=1"]) == 0
    run = _run_dir(tmp_path)
    folder = run / "checkpoints"
    last, newest = folder / "last.pt", folder / "epoch_2.pt"
    stats = [(folder / name).stat() for name in ("last.pt", "best.pt", "epoch_2.pt")]
    assert [s.st_nlink for s in stats] == [1, 1, 1] and len({s.st_ino for s in stats}) == 3
    # Damage written through last.pt itself (a bad sector, a tool writing in place) stays in last.pt.
    size = last.stat().st_size
    with last.open("r+b") as handle:
        handle.seek(size - 1000)
        handle.write(b"\0" * 1000)
    assert load_checkpoint(newest).epoch == 2
    assert main(["train", "--resume", str(run), "train.epochs=3"]) == 0
    log = (run / "train.log").read_text()
    assert f"checkpoint '{last}' cannot be read safely" in log and "falling back" in log
    assert f"from {newest} at epoch 2" in log
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2", "3"]
    assert load_checkpoint(last).epoch == 3


class _CreatesMarkerWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("container", ["torch zip", "plain pickle"])
def test_a_checkpoint_crafted_to_run_code_is_refused_and_runs_nothing(tmp_path, capsys, container):
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    payload = {**_fake_state(), "model": _CreatesMarkerWhenUnpickled(marker)}
    if container == "torch zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert main(["train", "--resume", str(tmp_path), "--checkpoint", str(path)]) == 2
    error = _one_line(capsys.readouterr().err)
    assert str(path) in error and "not a plain-tensor checkpoint" in error
    assert re.search(r"\b(io|builtins)\.open\b", error)  # the refused global, by name
    assert "weights_only" not in error and "False" not in error  # no advice to load it unsafely
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    if container == "torch zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_export_is_loadable_with_safetensors_and_json_alone(tiny, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    run, out = _run_dir(tmp_path), tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    # and the run's latent sampler (sampling/latent_mixture.py), plain arrays too
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "decoder.safetensors", "encoder.safetensors",
                                                     "latent_gmm.safetensors"]

    description = json.loads((out / "config.json").read_text())
    encoder = safetensors_torch.load_file(out / "encoder.safetensors")
    decoder = safetensors_torch.load_file(out / "decoder.safetensors")
    assert description["image_size"] == 16 and description["model"]["latent_dim"] == 8
    assert description["mean"] == [0.5, 0.5, 0.5] and description["std"] == [0.5, 0.5, 0.5]

    config = load_config(None, ["data.image_size=16", *(f"model.{k}={json.dumps(v)}" for k, v in
                                                      description["model"].items())])
    exported = build_model(config.model, description["image_size"])
    for network, tensors in (("encoder", encoder), ("decoder", decoder)):
        expected = getattr(exported, network).state_dict()
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in expected.items()}
        getattr(exported, network).load_state_dict(tensors)

    trained = build_model(config.model, 16)
    trained.load_state_dict(load_checkpoint(run / "checkpoints" / "last.pt").model)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(exported.eval().reconstruct(x), trained.eval().reconstruct(x))


# -- during training ----------------------------------------------------------------------------


def _trainer(tiny, tmp_path, *overrides: str) -> Trainer:
    config = load_config(None, [*tiny, "train.max_steps_per_epoch=2", *overrides])
    return Trainer(config, load_image_data(config.data))


def _snapshot(trainer: Trainer) -> dict:
    return {name: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in part.items()}
            if name == "model" else torch.load(_roundtrip(part), weights_only=True)
            for name, part in (("model", trainer.model.state_dict()),
                               ("encoder", trainer.training_step.optimizers["encoder"].state_dict()),
                               ("decoder", trainer.training_step.optimizers["decoder"].state_dict()))}


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_a_non_finite_loss_or_gradient_skips_the_step_leaving_everything_unchanged(tiny, tmp_path, optimizer):
    trainer = _trainer(tiny, tmp_path, f"train.optimizer={optimizer}")
    x = trainer.normalize(torch.from_numpy(trainer.data.train.images[:16]))
    assert not trainer.train_step(x).skipped  # optimizer state exists from here on
    before = _snapshot(trainer)

    nan_batch = x.clone()
    nan_batch[0, 0, 0, 0] = float("nan")
    assert trainer.train_step(nan_batch).skipped
    _assert_identical(_snapshot(trainer), before)  # BatchNorm running statistics included

    # A finite loss whose gradient is NaN: d sqrt(|u|) / du at u = 0, added to the step module's loss.
    def nan_gradient(module, args, output):
        loss, recon, kl = output
        return loss + (recon - recon.detach()).abs().sqrt(), recon, kl

    hook = trainer.training_step.objective.register_forward_hook(nan_gradient)
    assert trainer.train_step(x).skipped
    hook.remove()
    _assert_identical(_snapshot(trainer), before)


def test_skipped_steps_are_counted_in_metrics_and_logged(tiny, tmp_path):
    poison = NanBatches(lambda epoch, batch: (epoch, batch) == (1, 2))
    assert main(["train", *tiny, "train.epochs=2"], callbacks=[poison]) == 0
    run = _run_dir(tmp_path)
    assert [r["skipped_steps"] for r in _metrics(run)] == ["1", "0"]
    assert "non-finite loss or gradient at step 2 (epoch 1, batch 2): step skipped" in (run / "train.log").read_text()
    assert first_non_finite(load_checkpoint(run / "checkpoints" / "last.pt")) is None


def test_repeated_non_finite_losses_stop_the_run_naming_step_and_batch(tiny, tmp_path, capsys):
    poison = NanBatches(lambda epoch, batch: epoch == 2)
    assert main(["train", *tiny, "train.epochs=3", "train.checkpoint_every=1"], callbacks=[poison]) == 2
    error = _one_line(capsys.readouterr().err)
    assert "3 non-finite losses in a row, the last at step 6 (epoch 2, batch 3)" in error
    run = _run_dir(tmp_path)
    assert [r["epoch"] for r in _metrics(run)] == ["1"]
    assert load_checkpoint(run / "checkpoints" / "last.pt").epoch == 1


def test_no_checkpoint_is_ever_written_holding_nan_or_inf(tmp_path):
    for value in (float("nan"), float("inf")):
        with pytest.raises(CheckpointError, match="model.w holds NaN or Inf"):
            save_checkpoint(TrainingState.from_dict(_fake_state(value)), tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tiny, tmp_path):
    args = ["train", "--quiet", *tiny, *EXACT, "train.checkpoint_every_steps=null"]
    done = _vae(args, "SIGTERM@5")
    assert done.returncode == 143, done.stderr
    run = _run_dir(tmp_path)
    assert f"continue with: vae train --resume {run}" in _one_line(done.stderr)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state.epoch, state.step, state.epoch_progress["steps"]) == (1, 5, 1)
    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2", "3"]


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tiny, tmp_path, monkeypatch, capsys):
    # A real SIGINT to this process, handled by the trainer (the CLI would also turn a bare
    # KeyboardInterrupt into 130, but then no checkpoint of step 5 would exist).
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    args = ["train", "--quiet", *tiny, *EXACT, "train.checkpoint_every_steps=null"]
    assert main(args, callbacks=[SignalAtStep("SIGINT@5")]) == 130
    run = _run_dir(tmp_path)
    assert f"continue with: vae train --resume {run}" in _one_line(capsys.readouterr().err)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state.epoch, state.step, state.epoch_progress["steps"]) == (1, 5, 1)
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back


class _SignalAtEpochEnd(Callback):
    """The signal arrives after the last step's checkpoints, while the trainer validates or ends."""

    def __init__(self, signum: int, epoch: int):
        self.signum, self.epoch = signum, epoch

    def on_epoch_end(self, trainer, epoch, values) -> None:
        if epoch == self.epoch:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("when", ["after the last step", "during the final report"])
def test_a_signal_after_the_last_step_stops_before_the_report_and_resume_writes_it(tiny, tmp_path, monkeypatch,
                                                                                   capsys, when):
    # SIGINT: before handlers cover the report, it would be ignored (a background test run) or end
    # in a bare KeyboardInterrupt, never kill the test process.
    args = ["train", "--quiet", *tiny, "train.epochs=2", "train.max_steps_per_epoch=2"]
    callbacks = []
    if when == "after the last step":
        callbacks.append(_SignalAtEpochEnd(signal.SIGINT, 2))
    else:
        write_pictures = run_report.write_pictures

        def interrupted_pictures(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            return write_pictures(*args, **kwargs)

        monkeypatch.setattr(run_report, "write_pictures", interrupted_pictures)
    assert main(args, callbacks=callbacks) == 130
    run = _run_dir(tmp_path)
    assert f"continue with: vae train --resume {run}" in _one_line(capsys.readouterr().err)
    assert not (run / "report.md").exists()
    monkeypatch.undo()
    assert main(["train", "--quiet", "--resume", str(run)]) == 0  # trains nothing, writes the report
    assert (run / "report.md").is_file() and [r["epoch"] for r in _metrics(run)] == ["1", "2"]


def test_an_unwritable_output_folder_is_one_line_before_training(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["train", *tiny, f"train.output_dir={blocker}"]) == 2
    assert "is not writable" in _one_line(capsys.readouterr().err)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_metrics_keeps_csv_and_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    writerows = csv.DictWriter.writerows
    calls = []

    def full_on_second_epoch(self, rows):
        calls.append(1)
        if len(calls) == 2:
            self.writer.writerow(["1,half a row"])  # bytes reach the temporary file, then the disk is full
            _disk_full()
        return writerows(self, rows)

    monkeypatch.setattr(csv.DictWriter, "writerows", full_on_second_epoch)
    assert main(["train", *tiny, "train.epochs=3", "train.checkpoint_every=1"]) == 2
    error = _one_line(capsys.readouterr().err)
    run = _run_dir(tmp_path)
    assert "metrics.csv" in error and "No space left on device" in error and f"--resume {run}" in error
    assert [r["epoch"] for r in _metrics(run)] == ["1"]
    assert load_checkpoint(run / "checkpoints" / "last.pt").epoch == 1
    assert _temp_files(run) == []


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tiny, tmp_path, monkeypatch, capsys):
    save = torch.save
    calls = []

    def full_on_second_save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            handle.write(b"PK\x03\x04 half a zip")
            _disk_full()
        return save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_second_save)
    assert main(["train", *tiny, "train.epochs=3", "train.checkpoint_every=1"]) == 2
    error = _one_line(capsys.readouterr().err)
    run = _run_dir(tmp_path)
    assert "epoch_2.pt" in error and "No space left on device" in error and "previous checkpoint is kept" in error
    assert load_checkpoint(run / "checkpoints" / "last.pt").epoch == 1
    assert _temp_files(run) == []


class _DiskFullAfter:
    """A file handle on a disk that fills up after `room` bytes."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            _disk_full()
        self.room -= len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def test_a_full_disk_inside_torch_zip_writer_is_one_line_saying_how_much_space(tiny, tmp_path, monkeypatch, capsys):
    save = torch.save
    calls = []

    def full_on_second_save(obj, handle, *args, **kwargs):
        calls.append(1)
        # torch's zip writer turns the failed write into its own RuntimeError.
        return save(obj, _DiskFullAfter(handle, 4096) if len(calls) == 2 else handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_second_save)
    assert main(["train", *tiny, "train.epochs=3", "train.checkpoint_every=1"]) == 2
    error = _one_line(capsys.readouterr().err)
    run = _run_dir(tmp_path)
    assert "epoch_2.pt" in error and "No space left on device" in error and "previous checkpoint is kept" in error
    assert re.search(r"needs about [\d.]+ [KMG]?B\b.*\b[\d.]+ [KMG]?B free", error)
    assert load_checkpoint(run / "checkpoints" / "last.pt").epoch == 1
    assert _temp_files(run) == []


def test_a_full_disk_while_writing_pictures_is_reported_and_training_goes_on(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(epoch_pictures, "save_sample_grid", _disk_full)
    assert main(["train", *tiny, "train.epochs=2"]) == 0
    run = _run_dir(tmp_path)
    log = (run / "train.log").read_text()
    assert "could not write the pictures of epoch 1: [Errno 28] No space left on device" in log
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2"]
    assert load_checkpoint(run / "checkpoints" / "last.pt").epoch == 2


class _ResumeTheSameRunAtStep(Callback):
    """A second `vae train --resume` of the run while this one trains (as if from another shell)."""

    def __init__(self, step: int, output: Path):
        self.step, self.output, self.status = step, output, None

    def on_step_end(self, trainer, batch, sums) -> None:
        if trainer.step == self.step:
            self.status = main(["train", "--quiet", "--resume", str(_run_dir(self.output))])


def test_a_second_vae_train_of_a_run_folder_in_use_is_refused_in_one_line(tiny, tmp_path, capsys, no_final_report):
    second = _ResumeTheSameRunAtStep(4, tmp_path)
    args = ["train", "--quiet", *tiny, "train.epochs=2", "train.max_steps_per_epoch=3"]
    assert main(args, callbacks=[second]) == 0
    assert second.status == 2
    error = _one_line(capsys.readouterr().err)
    assert "is in use by vae train (pid" in error and str(os.getpid()) in error
    assert [r["epoch"] for r in _metrics(_run_dir(tmp_path))] == ["1", "2"]  # no row written twice


def test_the_run_folder_lock_of_a_killed_process_is_free(tiny, tmp_path, capsys, no_final_report):
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    run = _run_dir(tmp_path)
    hold = ("import sys, time; from pathlib import Path; from image_autoencoding.runs.run_lock import run_folder_lock\n"
            "with run_folder_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], env=_env(None), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(["train", "--quiet", "--resume", str(run), "train.epochs=2"]) == 2
        assert f"pid {holder.pid}" in _one_line(capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--quiet", "--resume", str(run), "train.epochs=2"]) == 0
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2"]


def test_runs_started_at_once_get_different_folders(tmp_path):
    starting_line = threading.Barrier(8)

    def start(_):
        starting_line.wait()
        return create_run_dir(tmp_path, now=1_800_000_000.0)  # the same second for all

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(start, range(8)))
    assert len(set(folders)) == 8 and all(folder.is_dir() for folder in folders)


def test_a_bad_resume_override_is_blamed_by_name(tiny, tmp_path, capsys, no_final_report):
    assert main(["train", *tiny, "train.epochs=1", "train.max_steps_per_epoch=1"]) == 0
    run = _run_dir(tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.epochs=2", "train.lr=-1"]) == 2
    error = _one_line(capsys.readouterr().err)
    assert "override 'train.lr=-1'" in error and "train.lr" in error
    assert [r["epoch"] for r in _metrics(run)] == ["1"]
