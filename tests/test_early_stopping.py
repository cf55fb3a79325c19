"""train.early_stopping_patience: a run that stops improving ends early as a finished run does,
says why, and goes on when resumed with more patience."""

from __future__ import annotations

import csv
from pathlib import Path

from image_autoencoding.cli import main
from image_autoencoding.runs.checkpoint import load_checkpoint

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
    assert "early stopping after epoch 3 of 6: 2 epochs without a gain of at least 0.5 in validation SSIM" in log
    # As at the end of a full run: the last epoch's checkpoint, best.pt, the report and its metrics.
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 3
    assert (run / "checkpoints" / "epoch_3.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert (run / "report.md").is_file() and (run / "metrics.json").is_file()

    # The same patience again: nothing more to train, said again.
    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    assert _epochs(run) == [1, 2, 3]
    # More patience: it goes on from epoch 4 until that is spent too (epoch 1 is still the mark).
    assert main(["train", "--quiet", "--resume", str(run), "train.early_stopping_patience=4"]) == 0
    assert _epochs(run) == [1, 2, 3, 4, 5]
    assert "early stopping after epoch 5 of 6: 4 epochs" in (run / "train.log").read_text()

