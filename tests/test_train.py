"""End to end: `vae train` and `vae_train.py` on the bundled digits with a tiny network."""

from __future__ import annotations

import csv
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from image_autoencoding.cli import main
from image_autoencoding.config import load_config
from image_autoencoding.data.batches import training_batches
from image_autoencoding.data.image_data import load_image_data
from image_autoencoding.runs.checkpoint import load_checkpoint
from image_autoencoding.training.lr_schedule import learning_rate
from image_autoencoding.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _run_dir(output: Path) -> Path:
    (run,) = (output / "results" / "vae").iterdir()
    return run


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_vae_train_writes_every_file(tiny, tmp_path, capsys):
    assert main(["train", "--config", str(REPO / "configs/demo.yaml"), *tiny, "train.epochs=2",
                 "train.checkpoint_every=1"]) == 0
    run = _run_dir(tmp_path)
    assert capsys.readouterr().out.strip().endswith(str(run))
    assert run.name.startswith("vae_") and len(run.name) == len("vae_20261124-101500")

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["epochs"] == 2 and config["model"]["latent_dim"] == 8  # fully resolved
    log = (run / "train.log").read_text()
    # Each epoch's line has the validation SSIM, the epoch's time, and says when train.monitor (the
    # metric that picks best.pt) set a new best.
    assert re.search(r"epoch 1/2  loss .* valid SSIM 0\.\d{4} .* \d+ s  \d+ img/s  \(best valid_ssim so far\)", log)
    assert "epoch 2/2" in log

    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0])[:9] == ["epoch", "step", "train_loss", "train_recon", "train_kl", "images_per_s", "seconds",
                                 "lr", "skipped_steps"]
    for column in ("train_loss", "train_recon", "train_kl", "images_per_s"):
        assert float(rows[-1][column]) >= 0
    alpha = config["train"]["alpha"]  # the demo's KL weight
    assert float(rows[0]["train_loss"]) == pytest.approx(
        float(rows[0]["train_recon"]) + alpha * float(rows[0]["train_kl"]), rel=1e-4)

    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    # The pictures of each epoch, as in images/: reconstructions of both splits and the samples.
    assert set(events.Tags()["images"]) == {"reconstructions/train", "reconstructions/valid", "samples"}
    assert [event.step for event in events.Images("samples")] == [1, 2]
    # config.yaml keeps what was asked (auto) and records what it resolved to on this machine.
    head = (run / "config.yaml").read_text().splitlines()[0]
    assert head.startswith("# train.device: auto resolved to cpu")
    assert "ia.load(" in log and f"vae evaluate {run}" in log  # what to do next
    for name in ("last.pt", "epoch_1.pt", "epoch_2.pt"):
        state = load_checkpoint(run / "checkpoints" / name)
        assert set(state.optimizers) == {"encoder", "decoder"} and state.model and state.rng
        assert state.config["train"]["epochs"] == 2
    assert load_checkpoint(run / "checkpoints" / "last.pt").epoch == 2

    grid = Image.open(run / "images/train/reconstruction_epoch_002.png")
    assert grid.format == "PNG" and grid.height > 0
    for folder, name in (("valid", "reconstruction_epoch_001.png"), ("samples", "samples_epoch_002.png")):
        assert (run / "images" / folder / name).is_file()


def test_no_progress_bar_when_the_console_is_not_a_terminal(tiny, tmp_path, capsys):
    """tqdm's carriage returns would flood a redirected log; the epoch lines say the same."""
    assert main(["train", *tiny, "train.epochs=1", "train.progress=true", "train.eval_images=32"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "epoch 1/1" in captured.out


def test_the_trainer_alone_writes_no_files(tiny, tmp_path, monkeypatch):
    """The run folder is made by callbacks (runs/run_callbacks.py); a Trainer given none, as in a
    notebook or a benchmark, trains and validates and leaves the disk alone."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    config = load_config(None, [*tiny, "train.epochs=2", "train.eval_images=32"])
    trainer = Trainer(config, load_image_data(config.data))
    trainer.fit()
    assert trainer.epoch == 2 and trainer.monitor.best > 0
    assert list(work.iterdir()) == [] and list(tmp_path.iterdir()) == [work]


def test_a_warm_up_as_long_as_the_run_is_a_logged_warning(tiny):
    """train.warmup_steps >= the planned steps: the rate would rise over the whole run, never at train.lr."""
    config = load_config(None, [*tiny, "train.epochs=1", "train.warmup_steps=3", "train.eval_images=32"])
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("image_autoencoding")
    logger.addHandler(handler)
    try:
        Trainer(config, load_image_data(config.data)).fit()  # 3 steps planned: train.max_steps_per_epoch=3
    finally:
        logger.removeHandler(handler)
    assert any("train.warmup_steps (3) is not shorter than the 3 steps this run plans" in record.getMessage()
               for record in records), [record.getMessage() for record in records]


def test_reconstruction_grid_has_inputs_above_outputs(tiny, tmp_path):
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    grid = Image.open(_run_dir(tmp_path) / "images/valid/reconstruction_epoch_001.png")
    # 4 images of 16 px, enlarged to 64 px: one row of inputs, one of outputs, 2 px padding.
    assert grid.size == (4 * 66 + 2, 2 * 66 + 2)


def test_same_seed_same_run(tiny, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["train", *tiny, "train.epochs=1", f"train.output_dir={out}"]) == 0
        runs.append(load_checkpoint(_run_dir(out) / "checkpoints/last.pt").model)
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_resume_continues_without_duplicate_epochs(tiny, tmp_path):
    assert main(["train", *tiny, "train.epochs=2", "train.checkpoint_every=1"]) == 0
    run = _run_dir(tmp_path)
    assert main(["train", "--resume", str(run), "--checkpoint", "epoch_1", "train.epochs=3"]) == 0
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2", "3"]
    assert load_checkpoint(run / "checkpoints/last.pt").epoch == 3


def test_resume_refuses_a_changed_model(tiny, tmp_path, capsys):
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    assert main(["train", "--resume", str(_run_dir(tmp_path)), "model.latent_dim=16"]) == 2
    assert "model.latent_dim" in capsys.readouterr().err


@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="vae_train.py re-runs under the checkout's .venv; these tests run elsewhere")
def test_original_vae_train_py_interface(tmp_path):
    """`python3 vae_train.py ...` as the README writes it: python3 is an interpreter without torch
    (here the venv's base interpreter with its site-packages off, -S), which re-runs the script
    under the checkout's .venv. The -pretrain run below starts under the venv's python itself."""
    user, logs = tmp_path / "user", tmp_path / "logs"
    args = ["-o", str(user), "-l", str(logs), "-b", "32", "-lr", "0.002", "-e", "1", "-im_size", "16",
            "-im_crop", "300", "-d", "cpu", "-nw", "0", "--dataset", "digits", "-lat_dim", "8", "--wd", "0",
            "--decay_lr", "0.9", "--mode", "beta-vae", "--beta", "1/batch_size",
            "model.encoder_channels=[8,16,16]", "model.decoder_channels=[16,16,8,3]", "model.fc_dim=32",
            "train.max_steps_per_epoch=2", "train.progress=false", "train.tsne_points=0"]
    bare_python = [sys._base_executable, "-S"]
    assert subprocess.run([*bare_python, "-c", "import torch"], capture_output=True).returncode != 0
    done = subprocess.run([*bare_python, str(REPO / "vae_train.py"), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run = _run_dir(user)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["batch_size"] == 32 and config["train"]["lr"] == 0.002
    assert config["train"]["alpha"] == "1/batch_size" and config["train"]["weight_decay"] == 0
    assert config["data"]["image_crop"] == 300 and config["data"]["data_root"] == str(user / "datasets")
    assert config["model"]["latent_dim"] == 8 and config["train"]["decay_lr"] == 0.9
    # The original's schedule, as its flags mean it (the defaults are cosine with a warm-up).
    assert config["train"]["lr_schedule"] == "exponential" and config["train"]["warmup_steps"] == 0
    assert (logs / f"{run.name}.log").read_text().count("epoch 1/1") == 1

    # -pretrain NAME -load_epoch N continues that run in place.
    again = subprocess.run(
        [sys.executable, str(REPO / "vae_train.py"), "-o", str(user), "-l", str(logs), "-pretrain", run.name,
         "-load_epoch", "1", "-e", "2"],
        capture_output=True, text=True,
    )
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2"]


def test_vae_train_py_keeps_the_original_schedule_unless_a_config_file_sets_one():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vae_train", REPO / "vae_train.py")
    vae_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vae_train)
    parse = lambda *flags: vae_train.to_vae_argv(vae_train.build_parser().parse_args(["-o", "u", "-l", "l", *flags]))  # noqa: E731
    assert {"train.lr_schedule=exponential", "train.warmup_steps=0"} <= set(parse("-e", "3"))
    with_config = parse("-c", "configs/coco.yaml")
    assert not any(a.startswith(("train.lr_schedule", "train.warmup_steps")) for a in with_config)
    assert "train.lr_schedule=exponential" in parse("-c", "configs/coco.yaml", "--decay_lr", "0.9")


def test_vae_train_py_pretrain_refuses_changed_data_or_model_flags_and_keeps_equal_ones(tiny, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vae_train", REPO / "vae_train.py")
    vae_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vae_train)
    assert main(["train", *tiny, "train.epochs=1"]) == 0
    run = _run_dir(tmp_path)
    pretrain = ["-o", str(tmp_path), "-l", str(tmp_path / "logs"), "-pretrain", run.name]
    capsys.readouterr()
    assert vae_train.main([*pretrain, "-im_size", "32", "-lat_dim", "8"]) == 2
    error = capsys.readouterr().err
    assert "data.image_size 16 -> 32" in error and "model.latent_dim" not in error  # 8 is the run's own
    assert [r["epoch"] for r in _metrics(run)] == ["1"]
    # The run's own values, and how many processes decode images, continue it.
    assert vae_train.main([*pretrain, "-im_size", "16", "-lat_dim", "8", "-nw", "1", "-e", "2"]) == 0
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2"]


def test_help_works(capsys):
    for argv in (["--help"], ["train", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert "section.key=value" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["vae", "vae-gan"])
def test_compiled_training_steps_match_eager_ones_through_a_partial_batch(tiny, tmp_path, mode):
    """train.compile=true computes the losses and gradients eager does, for full batches and for
    the last partial batch of an epoch (a static graph of its own), for the VAE and the VAE-GAN
    (whose three gradients come from one compiled graph). The learning rate is 0, so both runs stay
    at the same weights: RMSprop's first steps turn rounding-level gradient differences (e.g. the
    exactly-zero gradient of a bias before BatchNorm) into full-size steps. Inductor draws the
    reparametrisation noise its own way unless told to fall back to eager's random ops."""
    import torch._inductor.config

    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        runs = [_three_steps(tiny, tmp_path, mode, compiled) for compiled in (False, True)]
    for (eager_sums, eager_grads), (compiled_sums, compiled_grads) in zip(*runs, strict=True):
        torch.testing.assert_close(compiled_sums, eager_sums, rtol=1e-5, atol=1e-4)
        for key, eager_grad in eager_grads.items():
            # Within 1% of the gradient's largest element: BatchNorm's backward subtracts nearly
            # equal sums, so summation order alone moves the encoder's first gradients by ~0.4%.
            # The VAE-GAN's encoder convolutions are worse conditioned still: eager runs with 1 and
            # with 2 threads put their gradients up to 3.5% of the largest element apart, and
            # compiled ones up to 14% from eager (the layers after them agree to 1e-5): 20% there.
            share = 0.2 if mode == "vae-gan" and key.startswith("model.encoder.features") else 1e-2
            scale = eager_grad.abs().max()
            torch.testing.assert_close(compiled_grads[key], eager_grad, rtol=0, atol=share * float(scale), msg=key)


def _three_steps(tiny, tmp_path, mode: str, compiled: bool) -> list[tuple[torch.Tensor, dict]]:
    """A full, a partial and a full batch at learning rate 0: each step's sums and gradients."""
    config = load_config(None, [*tiny, "train.precision=fp32", f"train.compile={str(compiled).lower()}",
                                f"model.mode={mode}", "model.discriminator_channels=[8,16,16,16,32]"])
    trainer = Trainer(config, load_image_data(config.data))
    for optimizer in trainer.training_step.optimizers.values():
        optimizer.param_groups[0]["lr"] = 0.0
    networks = trainer.training_step.networks
    full = list(training_batches(trainer.data.train.images, 32, 0, 1, trainer.device, trainer.normalize, 3))
    steps = []
    for x in (full[0], full[1][:5], full[2]):
        sums = trainer.train_step(x).sums
        steps.append((sums, {f"{name}.{key}": p.grad.clone() for name, net in networks.items()
                             for key, p in net.named_parameters()}))
    return steps


def test_fp16_with_loss_scaling_runs_the_shared_gpu_code_path(tiny, tmp_path):
    """fp16 autocast + GradScaler is the path for GPUs without bf16; on CPU it runs the same code."""
    assert main(["train", *tiny, "train.epochs=2", "train.precision=fp16"]) == 0
    run = _run_dir(tmp_path)
    state = load_checkpoint(run / "checkpoints/last.pt")
    assert state.scaler["scale"] > 0  # the loss scale is checkpointed for exact resume
    assert state.optimizers["encoder"]["state"]  # steps were taken once the loss scale settled
    assert all(torch.isfinite(t).all() for t in state.model.values() if t.is_floating_point())
    assert main(["train", "--resume", str(run), "train.epochs=3"]) == 0


def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16():
    from image_autoencoding.runtime import bf16_supported, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_supported(cpu) else "fp32")
    # GPUs train this model in fp32 by default: faster and better than bf16 where it was measured (H200).
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"


class _HostSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for a GPU: reading a tensor's value on the
    host (`.item()`, `bool()`, `float()`) and making a tensor from host data (`torch.tensor(...,
    device=...)`, a copy from pageable memory that waits for every queued kernel)."""

    def __init__(self):
        super().__init__()
        self.reads = self.host_tensors = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        self.host_tensors += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_never_waits_for_the_device(tiny, tmp_path, precision, optimizer):
    """No host synchronisation in a step: the non-finite guard masks the updates on the device, the
    learning rate (changed every step by the warm-up) and the KL weight are filled into device
    tensors, the epoch's sums and skip counts stay there. Counted on the CPU, where the same code
    runs as on a GPU: the step and the trainer's bookkeeping between steps, a skipped step
    included. (fp16 adds GradScaler's own check, as PyTorch does for optimizers without a fused
    kernel.)"""
    config = load_config(None, [*tiny, f"train.precision={precision}", "train.kl_warmup_steps=10",
                                f"train.optimizer={optimizer}", "train.warmup_steps=10"])
    trainer = Trainer(config, load_image_data(config.data))
    batches = list(training_batches(trainer.data.train.images, 32, 0, 1, trainer.device, trainer.normalize, 4))
    batches[2] = batches[2] * float("nan")
    trainer.train_step(batches[0])  # the first step may set up lazily (optimizer state)
    progress = trainer.progress
    with _HostSyncs() as syncs:
        for x in batches[1:]:
            trainer.set_learning_rate(1)
            result = trainer.train_step(x)
            progress.add(result.sums, result.skipped, len(x))
            trainer.skipped_steps.count(result.skipped, trainer.step, progress.steps)
    assert syncs.reads == 0
    assert syncs.host_tensors == 0
    assert int(progress.skipped) == 1 and trainer.skipped_steps.read().last == (3, 2)


def test_fit_with_max_steps_ends_the_run_there_and_plans_the_schedule_for_it(tiny):
    """Benchmarks train a fixed number of images through the public fit: the epoch under way is cut
    short at the last step, validated and ended as the run's last."""
    config = load_config(None, [*tiny, "train.epochs=4", "train.max_steps_per_epoch=3", "train.eval_images=32",
                                "train.lr_schedule=cosine", "train.warmup_steps=0"])
    trainer = Trainer(config, load_image_data(config.data))
    trainer.fit(max_steps=5)
    assert (trainer.step, trainer.epoch, trainer.planned_steps) == (5, 2, 5)
    assert trainer.finished and "valid_ssim" in trainer.metrics
    # The cosine schedule ran out exactly at step 5, not at train.epochs' 12 steps.
    assert trainer.training_step.learning_rate == pytest.approx(learning_rate(config.train, 4, 2, 5))


def test_the_optimizers_take_pytorchs_steps_and_skip_on_a_device_flag():
    """RMSprop masked on the device takes torch.optim.RMSprop's steps bit for bit; fused Adam, the
    for-loop Adam's to rounding. A step with found_inf set changes nothing, step counts included."""
    from image_autoencoding.training.optimizers import make_optimizer

    torch.manual_seed(0)
    shapes = [(40, 30), (7,), (8, 3, 4, 4)]
    start = [torch.randn(shape) for shape in shapes]
    for kind, reference_kind, exact in (("rmsprop", torch.optim.RMSprop, True), ("adam", torch.optim.Adam, False)):
        cfg = load_config(None, [f"train.optimizer={kind}", "train.lr=0.01"]).train
        ours = [torch.nn.Parameter(t.clone()) for t in start]
        theirs = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = make_optimizer(ours, cfg)
        extra = {"alpha": 0.9, "eps": 1e-8} if kind == "rmsprop" else {}
        reference = reference_kind(theirs, lr=0.01, weight_decay=cfg.weight_decay, **extra)
        for _ in range(3):
            for a, b in zip(ours, theirs, strict=True):
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
            optimizer.found_inf = torch.zeros(())
            optimizer.step()
            reference.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-6, atol=1e-7), kind
        before = ([p.detach().clone() for p in ours], torch.load(_saved(optimizer.state_dict()), weights_only=True))
        for p in ours:
            p.grad = torch.full_like(p, float("nan"))
        optimizer.found_inf = torch.ones(())
        optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(before[0], ours, strict=True)), kind
        after = optimizer.state_dict()["state"]
        assert all(torch.equal(after[i][key], value) for i, state in before[1]["state"].items()
                   for key, value in state.items()), kind


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
