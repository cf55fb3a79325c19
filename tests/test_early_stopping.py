"""train.early_stopping_patience: a run that stops improving ends early as a finished run does,
says why, and goes on when resumed with more patience."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from image_autoencoding.cli import main
from image_autoencoding.runs.checkpoint import load_checkpoint
from image_autoencoding.training.monitor import Monitor

# No epoch after the first can gain 0.5 in SSIM: epochs 2, 3, ... never count as improving.
NEVER_ENOUGH = ["train.epochs=6", "train.early_stopping_min_delta=0.5", "train.max_steps_per_epoch=2"]


def _epochs(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_patience_spent_ends_the_run_like_a_finished_one_and_more_patience_goes_on(tiny, tmp_path):
    assert main(["train", "--quiet", *tiny, *NEVER_ENOUGH, "train.early_stopping_patience=2"]) == 0
    (run,) = (tmp_path / "results" / "vae").iterdir()
    assert _epochs(run) == [1, 2, 3]  # epoch 1 set the mark; 2 and 3 did not beat it by 0.5
    log = (run / "train.log").read_text()
    assert "early stopping after epoch 3 of 6: 2 epochs without a gain of at least 0.5 in valid_ssim" in log
    # As at the end of a full run: the last epoch's checkpoint, best.pt, the report and its metrics.
    assert load_checkpoint(run / "checkpoints" / "last.pt").epoch == 3
    assert (run / "checkpoints" / "epoch_3.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert (run / "report.md").is_file() and (run / "metrics.json").is_file()

    # The same patience again: nothing more to train, said again.
    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    assert _epochs(run) == [1, 2, 3]
    # More patience: it goes on from epoch 4 until that is spent too (epoch 1 is still the mark).
    assert main(["train", "--quiet", "--resume", str(run), "train.early_stopping_patience=4"]) == 0
    assert _epochs(run) == [1, 2, 3, 4, 5]
    assert "early stopping after epoch 5 of 6: 4 epochs" in (run / "train.log").read_text()



def _column(run: Path, key: str) -> list[float]:
    with open(run / "metrics.csv", newline="") as handle:
        return [float(row[key]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("monitor, pick", [("valid_psnr", max), ("valid_recon", min)])
def test_train_monitor_picks_best_pt_by_its_metric_and_direction(tiny, tmp_path, monitor, pick):
    assert main(["train", "--quiet", *tiny, "train.epochs=4", "train.max_steps_per_epoch=2",
                 "train.checkpoint_every=1", "train.keep_checkpoints=0", f"train.monitor={monitor}"]) == 0
    (run,) = (tmp_path / "results" / "vae").iterdir()
    values = _column(run, monitor)
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best.epoch == values.index(pick(values)) + 1
    assert best.monitor["name"] == monitor and best.monitor["best"] == pytest.approx(pick(values), rel=1e-5)
    # best.pt is a copy of the epoch checkpoint it names.
    folder = run / "checkpoints"
    assert (folder / "best.pt").read_bytes() == (folder / f"epoch_{best.epoch}.pt").read_bytes()


def test_early_stopping_counts_the_monitored_metric(tiny, tmp_path):
    # No epoch gains 100 dB of PSNR: patience 1 ends the run after epoch 2, naming the metric.
    assert main(["train", "--quiet", *tiny, "train.epochs=5", "train.max_steps_per_epoch=2",
                 "train.monitor=valid_psnr", "train.early_stopping_patience=1",
                 "train.early_stopping_min_delta=100"]) == 0
    (run,) = (tmp_path / "results" / "vae").iterdir()
    assert _epochs(run) == [1, 2]
    assert "1 epochs without a gain of at least 100 in valid_psnr" in (run / "train.log").read_text()


def test_a_resume_with_another_monitor_starts_its_marks_afresh(tiny, tmp_path):
    assert main(["train", "--quiet", *tiny, "train.epochs=1", "train.max_steps_per_epoch=2"]) == 0
    (run,) = (tmp_path / "results" / "vae").iterdir()
    assert main(["train", "--quiet", "--resume", str(run), "train.epochs=2", "train.monitor=valid_mse"]) == 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state.monitor["name"] == "valid_mse" and state.monitor["best_epoch"] == 2  # epoch 2 is its first
    assert "train.monitor is valid_mse, the checkpoint's marks are of valid_ssim" in (run / "train.log").read_text()


def test_a_value_that_is_not_a_number_is_never_the_best():
    monitor = Monitor("valid_ssim")
    assert not monitor.update(1, {"valid_ssim": float("nan")}) and monitor.best is None
    assert monitor.update(2, {"valid_ssim": 0.3}) and monitor.best_epoch == 2
    assert not monitor.update(3, {"valid_ssim": float("nan")}) and monitor.epochs_without_gain(3) == 1
    lower = Monitor("valid_mse", min_delta=0.1)
    lower.update(1, {"valid_mse": 1.0})
    assert lower.update(2, {"valid_mse": 0.95}) and lower.gain_epoch == 1  # better, but by less than 0.1
