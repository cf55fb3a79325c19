"""train.ema_decay: the average of the VAE's weights, its warm-up, what validation and every reader
of a checkpoint use, exact resume, skipped steps, and runs without it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import image_autoencoding as ia
from helpers.faults import NanBatches
from image_autoencoding.cli import main
from image_autoencoding.config import load_config
from image_autoencoding.data.batches import training_batches
from image_autoencoding.data.image_data import load_image_data
from image_autoencoding.evaluation.evaluate import evaluate_split
from image_autoencoding.runs.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.trainer import Trainer

EMA = "train.ema_decay=0.9"


# Runs compared bit for bit use the same single thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tiny, *overrides: str, callbacks=()) -> Trainer:
    config = load_config(None, [*tiny, "train.device=cpu", *overrides])
    return Trainer(config, load_image_data(config.data), callbacks=callbacks)


def _batches(trainer: Trainer, steps: int) -> list[torch.Tensor]:
    return list(training_batches(trainer.data.train.images, 32, 0, 1, trainer.device, trainer.normalize, steps))


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_dir(output: Path) -> Path:
    (run,) = (output / "results" / "vae").iterdir()
    return run


def test_the_average_of_two_steps_is_the_warmed_up_ema_of_the_weights(tiny):
    trainer = _trainer(tiny, EMA)
    model = trainer.model
    seen = [_weights(model)]  # the weights before any step, then after each
    for x in _batches(trainer, 2):
        assert not trainer.train_step(x).skipped
        seen.append(_weights(model))
    w0, w1, w2 = seen
    # min(0.9, (1 + n) / (10 + n)) for the updates n = 0, 1 done before each step's.
    d1, d2 = 1 / 10, 2 / 11
    average = trainer.training_step.inference_model.state_dict()
    for name, _ in model.named_parameters():
        expected = d2 * (d1 * w0[name] + (1 - d1) * w1[name]) + (1 - d2) * w2[name]
        torch.testing.assert_close(average[name], expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(average[name], w2[name])
    buffers = dict(model.named_buffers())
    assert buffers and all(torch.equal(average[name], w2[name]) for name in buffers)  # copied, not averaged
    assert trainer.state().ema_updates == 2


def test_validation_scores_the_average_not_the_trained_weights(tiny):
    trainer = _trainer(tiny, EMA, "train.eval_images=32")
    for x in _batches(trainer, 2):
        trainer.train_step(x)

    def scored(model) -> dict[str, float]:
        return evaluate_split(model, trainer.data.valid.images, trainer.normalize, trainer.device, 32,
                              trainer.autocast, 32).means(prefix="valid_")

    validated = trainer.validate()
    assert validated == scored(trainer.training_step.inference_model)
    assert validated["valid_mse"] != scored(trainer.model)["valid_mse"]


def test_a_run_with_an_average_is_loaded_with_it(tiny, tmp_path, no_final_report):
    assert main(["train", "--quiet", *tiny, EMA, "train.epochs=1", "train.max_steps_per_epoch=2"]) == 0
    run = _run_dir(tmp_path)
    for name in ("best", "last"):
        state = load_checkpoint(run / "checkpoints" / f"{name}.pt")
        assert state.ema_updates == 2 and not _equal(state.networks["ema"], state.model)
        loaded = ia.load(run, checkpoint=name, device="cpu")
        assert _equal(loaded.model.state_dict(), state.networks["ema"])


class _CopyLastCheckpoint(Callback):
    """Keeps a copy of last.pt as written at each of `steps` (step-end callbacks run after its write)."""

    def __init__(self, output: Path, steps: dict[int, Path]):
        self.output, self.steps = output, steps

    def on_step_end(self, trainer, batch, sums) -> None:
        if trainer.step in self.steps:
            shutil.copy(_run_dir(self.output) / "checkpoints" / "last.pt", self.steps[trainer.step])


def test_the_average_resumes_bit_identically_at_an_epoch_end_and_inside_an_epoch(tiny, tmp_path, no_final_report):
    # 2 epochs of 3 steps, last.pt every 2 steps and at epoch ends: step 3 ends epoch 1, step 4 is inside epoch 2.
    args = [*tiny, EMA, "train.device=cpu", "train.epochs=2", "train.max_steps_per_epoch=3",
            "train.checkpoint_every_steps=2"]
    copies = {3: tmp_path / "epoch_end.pt", 4: tmp_path / "inside_epoch.pt"}
    assert main(["train", "--quiet", *args], callbacks=[_CopyLastCheckpoint(tmp_path, copies)]) == 0
    run = _run_dir(tmp_path)
    uninterrupted = load_checkpoint(run / "checkpoints" / "last.pt").to_dict()
    assert load_checkpoint(copies[4]).inside_epoch
    for copy in copies.values():
        assert main(["train", "--quiet", "--resume", str(run), "--checkpoint", str(copy)]) == 0
        resumed = load_checkpoint(run / "checkpoints" / "last.pt").to_dict()
        assert resumed["ema_updates"] == uninterrupted["ema_updates"] == 6
        assert _equal(resumed["ema"], uninterrupted["ema"]) and _equal(resumed["model"], uninterrupted["model"])


def test_without_an_average_checkpoints_hold_none_and_validation_scores_the_trained_weights(tiny):
    trainer = _trainer(tiny)
    trainer.train_step(_batches(trainer, 1)[0])
    assert trainer.training_step.inference_model is trainer.model
    saved = trainer.state().to_dict()
    assert "ema" not in saved and "ema_updates" not in saved


def test_a_skipped_step_leaves_the_average_unchanged(tiny):
    averages = []

    class Record(Callback):
        def on_step_end(self, trainer, batch, result) -> None:
            averages.append((bool(result.skipped), _weights(trainer.training_step.inference_model)))

    trainer = _trainer(tiny, EMA, callbacks=[NanBatches(lambda epoch, batch: batch == 2), Record()])
    trainer.fit(max_steps=2)
    (first_skipped, first), (second_skipped, second) = averages
    assert (first_skipped, second_skipped) == (False, True)
    assert _equal(first, second) and trainer.state().ema_updates == 1


def test_turning_the_average_on_at_a_resume_starts_it_from_the_checkpoints_weights(tiny, tmp_path, caplog):
    trainer = _trainer(tiny)
    trainer.train_step(_batches(trainer, 1)[0])
    save_checkpoint(trainer.state(), tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt")
    config = load_config(None, [*tiny, "train.device=cpu", EMA])
    with caplog.at_level(logging.INFO, logger="image_autoencoding"):
        resumed = Trainer(config, trainer.data, resume=state)
    assert "starts from the checkpoint's weights" in caplog.text
    assert _equal(_weights(resumed.training_step.inference_model), state.model)
    assert resumed.state().ema_updates == 0


def test_a_checkpoint_whose_average_does_not_fit_the_model_is_refused_in_one_line(tiny, tmp_path, capsys,
                                                                                 no_final_report):
    assert main(["train", "--quiet", *tiny, EMA, "train.epochs=1", "train.max_steps_per_epoch=1"]) == 0
    run = _run_dir(tmp_path)
    raw = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    name = next(iter(raw["ema"]))
    raw["ema"][name] = torch.zeros(3)
    torch.save(raw, run / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "weight average" in error and name in error
    with pytest.raises(CheckpointError, match=name):
        ia.load(run, checkpoint="last")

    raw["ema"][name] = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["ema"][name]
    for count in (-1, None):
        raw.pop("ema_updates") if count is None else raw.update(ema_updates=count)
        torch.save(raw, run / "checkpoints" / "last.pt")
        assert main(["train", "--resume", str(run), "--checkpoint", "last", "train.epochs=2"]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "ema_updates" in error and "last.pt" in error
