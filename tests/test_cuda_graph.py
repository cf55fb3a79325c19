"""train.cuda_graphs and train.tf32: the rules of the keys (on the CPU), and on a CUDA device a step
replayed from a CUDA graph against the eager step (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from image_autoencoding.cli import main
from image_autoencoding.config import ConfigError, load_config
from image_autoencoding.data.batches import training_batches
from image_autoencoding.data.image_data import load_image_data
from image_autoencoding.runtime import use_cuda_graphs, use_tf32
from image_autoencoding.training.cuda_graph import GraphedStep
from image_autoencoding.training.trainer import Trainer

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- the keys, on the CPU --------------------------------------------------------------------------


def test_cuda_graphs_true_on_a_cpu_is_refused_in_one_line_before_a_run_folder_is_made(tiny, tmp_path, capsys):
    assert main(["train", *tiny, "train.device=cpu", "train.cuda_graphs=true"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "train.cuda_graphs" in error and "CUDA device" in error
    assert not (tmp_path / "results").exists()


def test_cuda_graphs_auto_is_on_with_cuda_only_and_off_under_torchrun_or_fp16():
    cpu = torch.device("cpu")
    assert use_cuda_graphs("auto", cpu, "fp32", 1)[0] is False
    assert use_cuda_graphs(False, cpu, "fp32", 1)[0] is False
    assert use_cuda_graphs("auto", CUDA, "fp32", 1) == (True, "CUDA device")
    assert use_cuda_graphs("auto", CUDA, "bf16", 1)[0] is True
    assert use_cuda_graphs(False, CUDA, "fp32", 1)[0] is False
    assert use_cuda_graphs("auto", CUDA, "fp32", 2) == (False, "not supported under torchrun")
    assert use_cuda_graphs("auto", CUDA, "fp16", 1) == (False, "not supported with fp16 loss scaling")
    for precision, world_size in (("fp32", 2), ("fp16", 1)):
        with pytest.raises(ConfigError, match="train.cuda_graphs"):
            use_cuda_graphs(True, CUDA, precision, world_size)


def test_cuda_graphs_key_takes_auto_true_or_false_only():
    assert load_config(None, []).train.cuda_graphs == "auto"
    assert load_config(None, ["train.cuda_graphs=false"]).train.cuda_graphs is False
    with pytest.raises(ConfigError, match="train.cuda_graphs"):
        load_config(None, ["train.cuda_graphs=sometimes"])


def test_tf32_is_set_for_cuda_only_and_reads_the_same_through_both_pytorch_settings():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert use_tf32(True, torch.device("cpu")) is False
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
        assert use_tf32(True, CUDA) is True
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert use_tf32(False, CUDA) is False
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# -- on a CUDA device ------------------------------------------------------------------------------


def _trainer(tiny, graphs: bool, *overrides: str) -> Trainer:
    config = load_config(None, [*tiny, "train.device=cuda", "train.precision=fp32", "train.tf32=false",
                                f"train.cuda_graphs={str(graphs).lower()}", *overrides])
    return Trainer(config, load_image_data(config.data, progress=False))


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    step = trainer.training_step
    tensors = {f"{name}.{key}": value for name, network in step.networks.items()
               for key, value in network.state_dict().items()}
    for name, optimizer in step.optimizers.items():
        for index, state in optimizer.state_dict()["state"].items():
            tensors.update({f"{name}.{index}.{key}": value for key, value in state.items()})
    return tensors


def _run(tiny, graphs: bool, overrides: tuple[str, ...], poison: int) -> tuple[Trainer, list]:
    """Five steps: full batches, batch `poison` all NaN, then a partial batch (a graph of its own)."""
    torch.manual_seed(0)
    trainer = _trainer(tiny, graphs, *overrides)
    batches = list(training_batches(trainer.data.train.images, 32, 0, 1, trainer.device, trainer.normalize, 4))
    batches[poison] = batches[poison] * float("nan")
    batches.append(batches[0][:5])
    results = []
    for x in batches:
        trainer.set_learning_rate(1)
        result = trainer.train_step(x)
        results.append((result.sums.clone(), bool(result.skipped)))
    return trainer, results


@needs_cuda
@pytest.mark.parametrize("overrides", [
    (),  # the seed model, RMSprop
    ("train.optimizer=adam", "train.ema_decay=0.9"),
    ("model.mode=vae-gan", "model.discriminator_channels=[8,16,16,16,32]"),
    ("model.mode=ldm", "train.disc_start=2", "train.perceptual_weight=0"),  # two phases: two graphs
], ids=["vae", "adam-ema", "vae-gan", "ldm"])
def test_a_graphed_step_takes_the_steps_an_eager_one_takes(tiny, overrides):
    eager, eager_results = _run(tiny, False, overrides, poison=2)
    graphed, graphed_results = _run(tiny, True, overrides, poison=2)
    assert isinstance(graphed._run_step, GraphedStep)
    assert [skipped for _, skipped in graphed_results] == [False, False, True, False, False]
    for (eager_sums, eager_skipped), (graphed_sums, graphed_skipped) in zip(eager_results, graphed_results,
                                                                             strict=True):
        assert eager_skipped == graphed_skipped
        if not eager_skipped:
            torch.testing.assert_close(graphed_sums, eager_sums, rtol=1e-5, atol=1e-4)
    expected = _state(eager)
    for key, value in _state(graphed).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


@needs_cuda
def test_a_non_finite_step_is_skipped_without_the_host_waiting_for_the_gpu(tiny):
    trainer = _trainer(tiny, True)
    batches = list(training_batches(trainer.data.train.images, 32, 0, 1, trainer.device, trainer.normalize, 4))
    trainer.train_step(batches[0])  # captures the graph (warm-up steps read nothing either)
    before = _state(trainer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = trainer.train_step(batches[1] * float("nan"))
        trainer.progress.add(result.sums, result.skipped, 32)
        trainer.skipped_steps.count(result.skipped, trainer.step, trainer.progress.steps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(result.skipped) and int(trainer.progress.skipped) == 1
    after = _state(trainer)
    assert all(torch.equal(after[key], value) for key, value in before.items())
