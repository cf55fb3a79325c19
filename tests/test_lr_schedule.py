"""Learning-rate schedules (exponential, cosine, constant, with warm-up): the rate of each step, and
a run stopped and resumed mid-epoch ends with exactly the weights of one that was not."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers.faults import SignalAtStep
from image_autoencoding.config import load_config
from image_autoencoding.data.image_data import load_image_data
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.interrupts import TrainingInterrupted
from image_autoencoding.training.lr_schedule import learning_rate
from image_autoencoding.training.trainer import Trainer

RUN = ["train.epochs=3", "train.max_steps_per_epoch=4", "train.device=cpu"]


def _cfg(*overrides: str):
    return load_config(None, ["train.lr=0.01", "train.warmup_steps=0", *overrides]).train


def test_the_rate_of_each_schedule():
    exponential = _cfg("train.lr_schedule=exponential", "train.decay_lr=0.5")
    # The original's ExponentialLR: lr in epoch 1, halved for each epoch after, whatever the step.
    assert [learning_rate(exponential, 7, epoch, 100) for epoch in (1, 2, 3)] == pytest.approx([0.01, 0.005, 0.0025])
    cosine = _cfg("train.lr_schedule=cosine")
    assert learning_rate(cosine, 0, 1, 100) == pytest.approx(0.01)
    assert learning_rate(cosine, 50, 5, 100) == pytest.approx(0.005)  # half way, whatever the epoch
    assert learning_rate(cosine, 99, 9, 100) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert learning_rate(cosine, 150, 9, 100) == 0.0  # past the plan (a resume with fewer epochs)
    constant = _cfg("train.lr_schedule=constant")
    assert {learning_rate(constant, step, 1 + step // 10, 100) for step in range(100)} == {0.01}


@pytest.mark.parametrize("schedule", ["exponential", "cosine", "constant"])
def test_warm_up_rises_linearly_then_hands_over_to_the_schedule(schedule):
    cfg = _cfg(f"train.lr_schedule={schedule}", "train.warmup_steps=4", "train.decay_lr=0.5")
    rates = [learning_rate(cfg, step, 1, 100) for step in range(4)]
    assert rates == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    # Cosine's decay starts after the warm-up: the first step after it has the full rate.
    assert learning_rate(cfg, 4, 1, 100) == pytest.approx(0.01)


class RecordRates(Callback):
    def __init__(self):
        self.rates = []

    def on_step_end(self, trainer, batch, sums) -> None:
        self.rates.append([float(group["lr"]) for name in ("encoder", "decoder")
                           for group in trainer.training_step.optimizers[name].param_groups])


class KeepStateOnInterrupt(Callback):
    """What Checkpointing writes to last.pt on a stop signal, kept in memory."""

    def on_interrupt(self, trainer, signum: int) -> None:
        self.state = copy.deepcopy(trainer.state())


@pytest.mark.parametrize("schedule", ["exponential", "cosine", "constant"])
def test_a_run_stopped_mid_epoch_and_resumed_ends_with_the_same_weights(schedule, tiny):
    config = load_config(None, [*tiny, *RUN, f"train.lr_schedule={schedule}", "train.warmup_steps=3",
                                "train.decay_lr=0.5"])
    data = load_image_data(config.data)
    rates = RecordRates()
    reference = Trainer(config, data, callbacks=[rates])
    reference.fit()
    # Ctrl-C after step 6 (inside epoch 2), then a new trainer resumes from the state saved then.
    keep = KeepStateOnInterrupt()
    with pytest.raises(TrainingInterrupted):
        Trainer(config, data, callbacks=[keep, SignalAtStep("SIGINT@6")]).fit()
    assert keep.state.step == 6
    resumed = Trainer(config, data, resume=keep.state)
    resumed.fit()
    assert resumed.step == reference.step == 12
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    for name in ("encoder", "decoder"):
        a, b = resumed.training_step.optimizers[name], reference.training_step.optimizers[name]
        assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]
        for key, value in b.state_dict()["state"].items():
            assert all(torch.equal(a.state_dict()["state"][key][k], v) for k, v in value.items())

    # Every step had its schedule's rate, on both networks.
    expected = [learning_rate(config.train, step, 1 + step // 4, 12) for step in range(12)]
    assert [r[0] for r in rates.rates] == pytest.approx(expected) and all(len(set(r)) == 1 for r in rates.rates)


def test_a_run_saved_before_the_schedule_keys_keeps_its_exponential_schedule(tmp_path):
    """The defaults are now cosine with a 100-step warm-up; a run folder (or checkpoint) written
    before train.lr_schedule existed lacks the key and must go on as it trained: x decay_lr per
    epoch, no warm-up. A saved config that names its schedule keeps it."""
    import yaml

    from image_autoencoding.runs.run_dir import load_run_config, saved_config

    assert (load_config(None).train.lr_schedule, load_config(None).train.warmup_steps) == ("cosine", 100)
    saved = load_config(None, ["train.decay_lr=0.5"]).to_dict()
    for key in ("lr_schedule", "warmup_steps"):
        del saved["train"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    for config in (load_run_config(tmp_path), saved_config(saved, "a checkpoint")):
        assert (config.train.lr_schedule, config.train.warmup_steps, config.train.decay_lr) == ("exponential", 0, 0.5)
    named = load_config(None, ["train.lr_schedule=constant", "train.warmup_steps=7"]).to_dict()
    assert saved_config(named, "a checkpoint").train.lr_schedule == "constant"
    assert saved_config(named, "a checkpoint").train.warmup_steps == 7
