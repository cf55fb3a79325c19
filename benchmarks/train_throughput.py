"""Training throughput: the original recipe against our model step and our end-to-end epoch.

    python benchmarks/train_throughput.py [--images 2000] [--rounds 5] [--steps-per-round 6] [--settings]
                                          [--batch-size 64] [--json out.json]

On one JPEG set shaped like Food-101 (cut from real photographs), in one run:

1. the original recipe, reimplemented here: every epoch PIL decode + torchvision transforms in a
   DataLoader, fp32, an extra decoder pass on random latents every step, and two backward passes
   per step (encoder objective with retain_graph, then decoder objective; both optimizers step after
   both backwards, since the original's step-between-backwards order fails on modern PyTorch);
   in a process of its own (the C library's default malloc), and on the CPU once more inside this
   process, under the malloc settings our Trainer sets;
2. our model step alone (batches already in memory), in each precision this device supports;
3. our end-to-end epoch: cache -> batches -> step, default settings (Trainer.train_epoch, the
   product's loop, on epochs cut to --steps-per-round steps).

The pipelines are timed in interleaved rounds: each round times --steps-per-round steps of every
pipeline, in an order rotated from round to round, so a shared machine whose speed drifts by tens of
per cent within minutes (measured on this project's VMs) slows every pipeline alike instead of the
one that happened to run then. A pipeline's rate is its images over its seconds summed over the
rounds; the per-round rates are kept for the spread. Every pipeline warms up (allocator, oneDNN /
cuDNN kernels, torch.compile, the DataLoader's first batch) before its timed steps.

Everything runs on --device (auto: the GPU when there is one), the original recipe too, as the
original moved its model and batches to the GPU. On a GPU the script also counts how often a step
makes the host wait for the GPU, and at which source lines. On any device it counts the FLOPs per
image of both recipes and times large matrix products in each precision the device has (bf16, fp16
and TF32 on a GPU, fp32): where the step is compute-bound, that rate bounds how far the ratios can
go, and each model step's achieved FLOP rate is printed as a share of it.

--settings times a row per GPU setting instead of the precision variants, each one Trainer with
its config overrides (the model step at the default settings stays, as the reference): the model
step with train.cuda_graphs false and true, each in fp32 with train.tf32 false and true and in bf16
channels_last; the end-to-end epoch with data.on_device false and true, each with
train.cuda_graphs false and true, and at the default settings with 4 and 16 times --batch-size.
Each row gets its host waits per step (on a GPU) and each end-to-end row its rate as a share of
the model step of the same settings. A row whose settings this config or device refuses (a key it
does not know yet; train.cuda_graphs=true on a CPU) is skipped, its reason kept in the JSON, and a
row that fails while timed is dropped with its error: one GPU session measures every other row
all the same.

Then, unless skipped: peak memory of training on a 100,000-image cache (a subprocess), and the
quality check: validation SSIM and the loss curve after the same number of images seen, fp32
against the default precision (or --quality-precision), in pairs of runs that share a seed
(--quality-seeds pairs): the mean paired SSIM difference and, from two pairs on, its 95% interval
against the issue's 0.005 bound. Skipped where the default precision is fp32 itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe
from photo_sets import FOOD101_SHAPE, make_jpeg_set, original_loader

from image_autoencoding.training.callbacks import Callback

HERE = Path(__file__).resolve().parent
BATCH_SIZE = 64  # set from --batch-size in main (tries on a CPU take a few images)
DEVICE = "auto"  # set from --device in main


def warm_up_steps(device: torch.device) -> int:
    """Untimed steps before a pipeline's timed ones: the allocator, oneDNN / cuDNN kernels and
    torch.compile; on a GPU also a CUDA graph's capture, which follows a few eager steps."""
    return 5 if device.type == "cuda" else 3


def build_config(work: Path, *overrides: str):
    from image_autoencoding.config import load_config

    return load_config(None, [
        f"train.device={DEVICE}", "data.dataset=folder", f"data.data_root={work / 'photos'}",
        f"data.cache_dir={work / 'cache'}",
        f"train.output_dir={work / 'runs'}", "train.progress=false", f"train.batch_size={BATCH_SIZE}", *overrides,
    ])


def make_trainer(config, data, run_dir: Path, callbacks=()):
    """A trainer with a run folder's callbacks (metrics.csv, TensorBoard, pictures, checkpoints) at
    `run_dir`, as `vae train` makes it, then `callbacks`."""
    from image_autoencoding.runs.run_callbacks import run_folder_callbacks
    from image_autoencoding.training.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(config, data, callbacks=[*run_folder_callbacks(run_dir, config, data), *callbacks])


class StepTimer(Callback):
    """Through the trainer's step callbacks: the seconds an epoch spends from the start of each
    training step to its end (the step with its non-finite check's wait for the device, then the
    loop's bookkeeping of it: loss sums, progress bar, TensorBoard every 10 steps), the steps, and
    the images of the steps taken (not skipped: a partial last batch counts its own images)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.in_step, self.calls, self.images, self._start = 0.0, 0, 0, 0.0

    def on_step_start(self, trainer) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, trainer, batch, sums) -> None:
        self.in_step += time.perf_counter() - self._start
        self.calls += 1
        self.images += 0 if sums is None else len(batch)


# -- 1. the original recipe ---------------------------------------------------------------------------

ORIGINAL_WARM_UP = 2  # untimed steps per round: the DataLoader's first batches, kernel set-up


class OriginalRecipe:
    """The original's training epoch, reimplemented faithfully (see the module docstring): one model
    and its two optimizers for the whole benchmark, and each round a new DataLoader (a new epoch)
    over the next images of the set."""

    def __init__(self, paths: list[Path], workers: int, device: torch.device):
        from image_autoencoding.config import load_config
        from image_autoencoding.models.factory import build_model

        self.paths, self.workers, self.device = paths, workers, device
        self.cfg = load_config(None, []).model
        torch.manual_seed(0)
        self.model = build_model(self.cfg, 64).to(device)
        self.encoder_optimizer = torch.optim.RMSprop(self.model.encoder.parameters(), lr=1e-3, alpha=0.9, eps=1e-8)
        self.decoder_optimizer = torch.optim.RMSprop(self.model.decoder.parameters(), lr=1e-3, alpha=0.9, eps=1e-8)
        self.model.train()

    def step(self, x: torch.Tensor) -> None:
        from image_autoencoding.models.vae import loss_terms

        model = self.model
        x = x.to(self.device)
        posterior = model.encoder(x)
        x_hat = model.decoder(posterior.sample())
        x_p = model.decoder(torch.randn(len(x), model.latent_size, device=self.device))  # the samples pass
        recon, kl = loss_terms(x, x_hat, posterior)
        loss_encoder = recon.sum() + kl.sum()
        loss_decoder = recon.sum()
        model.zero_grad()
        loss_encoder.backward(retain_graph=True)
        loss_decoder.backward()
        self.encoder_optimizer.step()
        self.decoder_optimizer.step()
        del x_p

    def run(self, steps: int, round_index: int) -> tuple[int, float]:
        """(images, seconds) of `steps` timed steps, after ORIGINAL_WARM_UP untimed ones."""
        per_round = (ORIGINAL_WARM_UP + steps) * BATCH_SIZE
        first = round_index * per_round
        paths = [self.paths[(first + i) % len(self.paths)] for i in range(per_round)]
        seen, start = 0, 0.0
        for i, x in enumerate(original_loader(paths, BATCH_SIZE, self.workers, drop_last=True)):
            if i == ORIGINAL_WARM_UP:
                _wait_for(self.device)
                start = time.perf_counter()
            self.step(x)
            seen += len(x) if i >= ORIGINAL_WARM_UP else 0
        _wait_for(self.device)
        return seen, time.perf_counter() - start


class OriginalInOwnProcess:
    """The original recipe in a process of its own, one per round: the C library's default malloc,
    untouched by the settings (train.reuse_cpu_memory) that this process's Trainers make."""

    def __init__(self, paths: list[Path], workers: int, device: str, work: Path):
        self.list_file = work / "original-paths.json"
        self.list_file.write_text(json.dumps([str(path) for path in paths]))
        self.workers, self.device = workers, device

    def run(self, steps: int, round_index: int) -> tuple[int, float]:
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import train_throughput as t; "
                f"t.original_child({str(self.list_file)!r}, {self.workers}, {self.device!r}, {steps}, {round_index}, "
                f"{BATCH_SIZE})")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        images, seconds = json.loads(out.strip().splitlines()[-1])
        return int(images), float(seconds)


def original_child(list_file: str, workers: int, device: str, steps: int, round_index: int, batch_size: int) -> None:
    from image_autoencoding.runtime import resolve_device

    global BATCH_SIZE
    BATCH_SIZE = batch_size
    paths = [Path(p) for p in json.loads(Path(list_file).read_text())]
    print(json.dumps(OriginalRecipe(paths, workers, resolve_device(device)).run(steps, round_index)))


def _wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # at the ends of a timed stretch only, never per step


# -- 2. our model step alone --------------------------------------------------------------------------


class ModelStep:
    """One Trainer's step alone, on batches already on the device. `overrides`: its config settings;
    `autotune`: cuDNN benchmarks its convolution algorithms for these shapes first
    (torch.backends.cudnn.benchmark, a process-wide switch, set around each of its runs)."""

    def __init__(self, work: Path, data, name: str, overrides: list[str], autotune: bool = False):
        from image_autoencoding.data.batches import training_batches

        self.variant, self.autotune, self.skipped = name, autotune, 0
        self.trainer = make_trainer(build_config(work, *overrides), data, work / "runs" / f"step-{folder_name(name)}")
        self.switches: Tf32Switches | None = None
        # Full batches only: a training set under 16 batches ends in a partial one, which is faster.
        self.batches = [x for x in training_batches(data.train.images, BATCH_SIZE, 0, 1, self.trainer.device,
                                                    self.trainer.normalize, 16) if len(x) == BATCH_SIZE]
        self.next = 0
        self.run(warm_up_steps(self.trainer.device), -1)
        self.switches = Tf32Switches()  # as this row's Trainer set them, when made or in its first steps

    def host_waits(self, steps: int) -> dict:
        def take_steps() -> int:
            for _ in range(steps):
                self.trainer.train_step(self.batches[self.next % len(self.batches)])
                self.next += 1
            return steps

        self.switches.restore()
        waits = count_host_waits(take_steps)
        _wait_for(self.trainer.device)
        return waits

    def run(self, steps: int, round_index: int) -> tuple[int, float]:
        if self.switches is not None:
            self.switches.restore()
        torch.backends.cudnn.benchmark = self.autotune
        skipped = 0
        start = time.perf_counter()
        for _ in range(steps):
            # Summed on the device: reading each step's flag would be a host wait per step.
            skipped += self.trainer.train_step(self.batches[self.next % len(self.batches)]).skipped.long()
            self.next += 1
        _wait_for(self.trainer.device)  # one wait for the device at the end, none per step
        seconds = time.perf_counter() - start
        skipped = int(skipped)
        torch.backends.cudnn.benchmark = False
        if round_index >= 0:
            self.skipped += skipped
        # A skipped step does no optimizer work: counting it would flatter the variant.
        return (steps - skipped) * BATCH_SIZE, seconds


# -- 3. our end-to-end epoch --------------------------------------------------------------------------


class EndToEnd:
    """Trainer.train_epoch with default settings, each round one epoch cut to the round's steps
    (train.max_steps_per_epoch): cache -> shuffled batches -> flip and normalise -> step, with the
    loop's progress bookkeeping and TensorBoard logging.

    It also times each step inside its epochs (StepTimer): the rest of an epoch's time is what the
    data path (cache read, shuffle, flip and normalise, the copy to the device) and the epoch's end
    add to the steps, measured in the same seconds as the steps themselves, so the machine's drift
    between rounds cannot move that share. Figures measured before the timer was a callback
    counted the loop's per-step bookkeeping outside the step."""

    def __init__(self, work: Path, data, name: str = "epoch", overrides: tuple[str, ...] = ()):
        self.timer = StepTimer()  # this epoch's time in the step, its steps and images
        self.trainer = make_trainer(build_config(work, *overrides), data, work / "runs" / folder_name(name),
                                    [self.timer])
        self.switches: Tf32Switches | None = None
        self.epoch = 0
        self.step_seconds, self.epoch_seconds, self.steps = 0.0, 0.0, 0  # over the timed rounds
        warm = time.perf_counter()
        self.run(warm_up_steps(self.trainer.device), -1)  # outside the timed epochs
        self.warm_up_s = time.perf_counter() - warm
        self.switches = Tf32Switches()  # as this row's Trainer set them, when made or in its first steps

    def host_waits(self, steps: int) -> dict:
        """Over one epoch of `steps` steps (fewer where the set ends sooner): batches, steps, logging
        and the epoch's end."""
        def epoch() -> int:
            before = self.trainer.step
            self.trainer.train_epoch(self.epoch, max_steps=steps)
            return self.trainer.step - before

        self.switches.restore()
        self.epoch += 1
        return count_host_waits(epoch)

    def run(self, steps: int, round_index: int) -> tuple[int, float]:
        if self.switches is not None:
            self.switches.restore()
        self.epoch += 1
        self.timer.reset()
        start = time.perf_counter()
        self.trainer.train_epoch(self.epoch, max_steps=steps)  # ends reading the loss sums: synced
        seconds = time.perf_counter() - start
        if round_index >= 0:
            self.step_seconds += self.timer.in_step
            self.epoch_seconds += seconds
            self.steps += self.timer.calls
        return self.timer.images, seconds  # fewer than steps * BATCH_SIZE where the set ends sooner

    def outside_the_step(self) -> dict:
        """Over the timed rounds: the share of the epochs' time spent in the steps, and the
        milliseconds per step spent outside them (batches, the epoch's end)."""
        return {"share_in_step": self.step_seconds / self.epoch_seconds,
                "outside_ms_per_step": (self.epoch_seconds - self.step_seconds) / self.steps * 1e3}


def interleaved_rounds(pipelines: dict, rounds: int, steps: int, may_fail: frozenset[str] = frozenset()
                       ) -> tuple[dict[str, dict], dict[str, str]]:
    """Every pipeline `steps` steps per round, the order rotated by one each round. A pipeline named
    in `may_fail` that raises is dropped from the rounds with its error (the second dict): in a GPU
    session's one try, a setting that breaks must not cost the other rows' figures."""
    names = list(pipelines)
    totals = {name: {"images": 0, "seconds": 0.0, "per_round_img_s": []} for name in names}
    failed: dict[str, str] = {}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            try:
                images, seconds = pipelines[name].run(steps, r)
            except Exception as error:  # noqa: BLE001 - kept in the JSON; the other rows go on
                if name not in may_fail:
                    raise
                failed[name] = repr(error)
                print(f"failed {name}: {error!r}", flush=True)
                continue
            totals[name]["images"] += images
            totals[name]["seconds"] += seconds
            totals[name]["per_round_img_s"].append(images / seconds)
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {totals[name]['per_round_img_s'][-1]:.1f}" for name in names if name not in failed), flush=True)
    for name in failed:
        del totals[name]
    for total in totals.values():
        total["img_s"] = total["images"] / total["seconds"]
    return totals, failed


# -- the settings rows (--settings) -------------------------------------------------------------------

# Each row's config overrides, under the names config.py gives the keys.
SETTING_PRECISIONS = {
    "fp32, tf32=false": ["train.precision=fp32", "train.tf32=false"],
    "fp32, tf32=true": ["train.precision=fp32", "train.tf32=true"],
    "bf16, channels_last": ["train.precision=bf16", "train.channels_last=true"],
}
STEP_SETTINGS = {f"{name}, cuda_graphs={graphs}": [*overrides, f"train.cuda_graphs={graphs}"]
                 for graphs in ("false", "true") for name, overrides in SETTING_PRECISIONS.items()}


def epoch_settings(batch_size: int) -> dict[str, list[str]]:
    """The end-to-end rows: data.on_device x train.cuda_graphs, and the default settings at the
    larger batch sizes benchmarks/batch_size.py compares with `batch_size` (x4 and x16: 256 and 1024
    from 64), so that the run measures the epoch's rate against the original recipe's at whichever
    batch keeps the quality."""
    from batch_size import BATCH_SIZES

    rows = {f"on_device={resident}, cuda_graphs={graphs}": [f"data.on_device={resident}", f"train.cuda_graphs={graphs}"]
            for resident in ("false", "true") for graphs in ("false", "true")}
    for larger in BATCH_SIZES[1:]:
        rows[f"batch_size={batch_size * larger // BATCH_SIZES[0]}"] = [
            f"train.batch_size={batch_size * larger // BATCH_SIZES[0]}"]
    return rows
HOST_WAIT_STEPS = 20  # steps whose host waits are counted per row: a wait every 10 steps shows as 0.1


def folder_name(name: str) -> str:
    """A row's name as a run folder's name."""
    return re.sub(r"[^\w.=-]+", "-", name).strip("-")


def build_rows(factories: dict) -> tuple[dict, dict[str, str], dict[str, str]]:
    """(rows, skipped, failed): each factory's pipeline; or, where the config or the device refuses
    its settings (a key this config does not know yet, train.cuda_graphs=true on a CPU: a
    UserError), the one-line reason it was skipped; or the error it failed with."""
    from image_autoencoding.errors import UserError

    rows, skipped, failed = {}, {}, {}
    for name, make in factories.items():
        try:
            rows[name] = make()
        except UserError as error:
            skipped[name] = str(error)
            print(f"skipped {name}: {error}", flush=True)
        except Exception as error:  # noqa: BLE001 - kept in the JSON; the other rows go on
            failed[name] = repr(error)
            print(f"failed {name}: {error!r}", flush=True)
    return rows, skipped, failed


class Tf32Switches:
    """torch's process-wide TF32 switches as they are when made. All rows' Trainers share this
    process: a row made after another could change the switches the other runs under (the
    train.tf32 true and false rows), so each row puts its own back before it runs. Read and written
    through the fp32_precision API of torch >= 2.9, which refuses legacy allow_tf32 reads once
    the two disagree; allow_tf32 before it."""

    def __init__(self):
        self.values = [getattr(owner, name) for owner, name in self._switches()]

    @staticmethod
    def _switches() -> list[tuple[object, str]]:
        b = torch.backends
        if hasattr(b.cuda.matmul, "fp32_precision"):
            return [(b, "fp32_precision"), (b.cuda.matmul, "fp32_precision"), (b.cudnn, "fp32_precision"),
                    (b.cudnn.conv, "fp32_precision"), (b.cudnn.rnn, "fp32_precision")]
        return [(b.cuda.matmul, "allow_tf32"), (b.cudnn, "allow_tf32")]

    def restore(self) -> None:
        """Only where a switch differs: where no row changes them, torch's state is never touched."""
        switches = self._switches()
        if [getattr(owner, name) for owner, name in switches] != self.values:
            for (owner, name), value in zip(switches, self.values, strict=True):
                setattr(owner, name, value)

    def convolutions_in_tf32(self) -> bool:
        """Whether fp32 convolutions (most of this model's FLOPs) use TF32 under these switches:
        the most specific level not 'none' decides (conv, then cuDNN, then all)."""
        if len(self.values) == 2:
            return bool(self.values[1])
        everything, _, cudnn, conv, _ = self.values
        return next((v for v in (conv, cudnn, everything) if v != "none"), "ieee") == "tf32"


def count_host_waits(run) -> dict:
    """GPU only: how often, and where, `run()` (which returns the training steps it took) made the
    host wait for the GPU, counted by CUDA's sync debug mode. Each wait stops the CPU from queueing
    the next step's kernels while the GPU works. `every_step`: the places that waited at least once
    per step."""
    import warnings
    from collections import Counter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            steps = run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"steps": steps, "per_step": sum(where.values()) / steps, "where": dict(where),
            "every_step": sorted(place for place, count in where.items() if count >= steps)}


# -- what bounds the ratios ---------------------------------------------------------------------------


@contextlib.contextmanager
def fp32_matmul_precision(tf32: bool):
    """fp32 matrix products on CUDA in TF32 or in full fp32, for the duration; then as before."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    setattr(matmul, name, ("tf32" if tf32 else "ieee") if name == "fp32_precision" else tf32)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def matmul_rates(device: torch.device, n: int, repeats: int = 10) -> dict[str, float]:
    """TFLOP/s of n x n matrix products in each precision this device has (on a GPU bf16, fp16,
    TF32 and fp32; on a CPU fp32, and bf16 where it is native): `repeats` back-to-back products
    after 3 untimed ones, one wait for the device at each end."""
    from image_autoencoding.runtime import bf16_supported

    kinds = {"fp32": torch.float32}
    if device.type == "cuda":
        kinds.update(tf32=torch.float32, fp16=torch.float16)
    if bf16_supported(device):
        kinds["bf16"] = torch.bfloat16
    rates = {}
    for kind, dtype in kinds.items():
        switch = fp32_matmul_precision(kind == "tf32") if device.type == "cuda" else contextlib.nullcontext()
        with switch:
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            for _ in range(3):
                a @ b
            _wait_for(device)
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            _wait_for(device)
            rates[kind] = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12
        del a, b
    return rates


def eager_overrides() -> list[str]:
    """Overrides for a Trainer whose steps run op by op (no CUDA graph), which torch's flop counter
    sees; none where the config has no train.cuda_graphs (every step is eager then)."""
    from image_autoencoding.config import TrainConfig

    return ["train.cuda_graphs=false"] if "cuda_graphs" in TrainConfig.model_fields else []


def arithmetic(work: Path, data, device: torch.device, matmul_size: int) -> dict:
    """What bounds the ratios where the step is compute-bound: FLOPs per image of each recipe (the
    convolutions and matrix products of one step, forward and backward, by torch.utils.flop_counter,
    of the default settings' step taken op by op) and the matrix-product rate of each precision
    (matmul_rates); `matmul_gflops` is that of the default precision, as before."""
    from model_cost import step_gflop_per_image
    from torch.utils.flop_counter import FlopCounterMode

    from image_autoencoding.data.batches import training_batches

    original = OriginalRecipe([], 0, device)
    with FlopCounterMode(display=False) as counter:
        original.step(torch.randn(BATCH_SIZE, 3, 64, 64))
    original_flops = counter.get_total_flops() / BATCH_SIZE
    trainer = make_trainer(build_config(work, *eager_overrides()), data, work / "runs" / "flop-count")
    x = next(training_batches(data.train.images, BATCH_SIZE, 0, 1, trainer.device, trainer.normalize))
    ours_flops = step_gflop_per_image(trainer, x) * 1e9
    n = matmul_size or (8192 if device.type == "cuda" else 2048)  # 8192: near the H200's peak (KINDS.md)
    rates = matmul_rates(device, n)
    default = trainer.precision
    if default == "fp32" and device.type == "cuda" and Tf32Switches().convolutions_in_tf32():
        default = "tf32"
    return {"original_gflop_per_image": original_flops / 1e9, "ours_gflop_per_image": ours_flops / 1e9,
            "matmul_size": n, "matmul_tflops": rates,
            "matmul_gflops": rates[default] * 1e3, "matmul_precision": default}


def step_arithmetic(step: ModelStep, img_s: float, gflop_per_image: float, rates: dict[str, float]) -> dict:
    """A model-step row's achieved FLOP rate, and its share of the matrix-product rate of the
    precision its convolutions run in (TF32 for fp32 ones where the switches say so)."""
    precision = step.trainer.precision
    if precision == "fp32" and step.trainer.device.type == "cuda" and step.switches.convolutions_in_tf32():
        precision = "tf32"
    tflops = img_s * gflop_per_image / 1e3
    share = tflops / rates[precision] if precision in rates else None
    return {"tflops": tflops, "matmul_precision": precision, "share_of_matmul": share}


def variant_overrides(variant: str) -> tuple[list[str], bool]:
    """A precision variant's config overrides and cuDNN autotuning: a precision, optionally with
    '+compile', '+nchw' (channels_last off) or '+autotune' (torch.backends.cudnn.benchmark)."""
    precision, *flags = variant.split("+")
    return [f"train.precision={precision}", f"train.compile={'compile' in flags}",
            f"train.channels_last={'nchw' not in flags}"], "autotune" in flags


def step_settings(trainer) -> tuple:
    """What makes two Trainers' steps the same: an end-to-end row's rate is a share of the model
    step row with these equal (keys a config does not have yet count as equal)."""
    cfg = trainer.cfg
    return (trainer.precision, cfg.channels_last, cfg.batch_size, getattr(cfg, "tf32", None),
            getattr(cfg, "cuda_graphs", None))


def settings_results(step_rows: dict, epoch_rows: dict, overrides: dict[str, list[str]], timed: dict, waits: dict,
                     arithmetic: dict, original_img_s: float) -> dict:
    """--settings: each timed row's rate, arithmetic (model steps) or share of its model step
    (end-to-end), and host waits; and the fastest model step's share of the bf16 and TF32 rates.
    `overrides`: each row's config overrides, by name."""
    rates, gflop = arithmetic["matmul_tflops"], arithmetic["ours_gflop_per_image"]
    steps = {}
    for name, row in step_rows.items():
        if f"step:{name}" in timed:
            img_s = timed[f"step:{name}"]["img_s"]
            steps[name] = {"overrides": overrides[name], "img_s": img_s, "vs_original": img_s / original_img_s,
                           **step_arithmetic(row, img_s, gflop, rates), "host_waits": waits.get(f"step:{name}")}
    epochs = {}
    for name, row in epoch_rows.items():
        if f"end_to_end:{name}" in timed:
            img_s = timed[f"end_to_end:{name}"]["img_s"]
            same = next((n for n in steps if step_settings(step_rows[n].trainer) == step_settings(row.trainer)), None)
            epochs[name] = {"overrides": overrides[name], "img_s": img_s, "vs_original": img_s / original_img_s,
                            "step_row": same, "share_of_step": img_s / steps[same]["img_s"] if same else None,
                            "host_waits": waits.get(f"end_to_end:{name}")}
    result = {"model_step": steps, "end_to_end": epochs}
    if steps:
        best = max(steps, key=lambda n: steps[n]["img_s"])
        result["best_step"] = {"row": best, "tflops": steps[best]["tflops"],
                               **{f"share_of_{kind}": steps[best]["tflops"] / rates[kind]
                                  for kind in ("bf16", "tf32") if kind in rates}}
    return result


# -- memory on a 100,000-image cache ------------------------------------------------------------------


def peak_memory_child(work: str, images: int, steps: int) -> None:
    """Runs in a subprocess: a cache of `images` images, one full data epoch and `steps` training steps."""
    from image_autoencoding.data.batches import training_batches
    from image_autoencoding.data.cache import open_or_build
    from image_autoencoding.data.image_data import ImageData, Split
    from image_autoencoding.data.sources import ArraySplit

    work_path = Path(work)
    config = build_config(work_path, f"data.cache_dir={work_path / 'big-cache'}")
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(images, 16, 16, 3), dtype=np.uint8)  # upscaled to 64 px by the cache
    cached = open_or_build(ArraySplit(tiles, np.zeros(images, dtype=np.int64)), config.data, "train", progress=False)
    del tiles
    data = ImageData(Split(cached.images, cached.labels), Split(cached.images[:256], cached.labels[:256]), [])
    trainer = make_trainer(config, data, work_path / "runs" / "memory")
    for _ in training_batches(data.train.images, BATCH_SIZE, 0, 1, trainer.device, trainer.normalize):
        pass  # every page of the cache read once, as in an epoch
    trainer.train_epoch(1, max_steps=steps)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    # RssFile is mostly the cache's pages mapped in; the kernel drops them under memory pressure.
    megabytes = {key: int(status[key].split()[0]) / 1024 for key in ("VmHWM", "RssAnon", "RssFile")}
    # VmHWM is this process's own high-water mark. getrusage's ru_maxrss is not: Linux carries the
    # maximum across fork and exec, so it reported the benchmark process's resident size (several
    # models, allocator caches) whenever that was larger: 2,952-3,315 MB where VmHWM says ~2,660.
    print(json.dumps({"peak_rss_mb": megabytes["VmHWM"],
                      "cache_mb": cached.images.nbytes / 2**20,
                      **{f"end_{key.lower()}_mb": megabytes[key] for key in ("RssAnon", "RssFile")}}))


def peak_memory(work: Path, images: int, steps: int) -> dict:
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import train_throughput as t; " \
           f"t.peak_memory_child({str(work)!r}, {images}, {steps})"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- quality: same images seen, fp32 against the default precision ------------------------------------

QUALITY_BOUND = 0.005  # the issue's: validation SSIM of the default precision within 0.005 of fp32


def quality(work: Path, data, steps: int, precision: str, seeds: int) -> dict:
    """Paired runs: for each seed, fp32 and `precision` from the same initial weights, batches and
    noise, then validation SSIM on the same held-out images. Between seeds SSIM moves by ~0.02 after
    200 steps (measured), far more than the 0.005 to resolve; pairing cancels the seed's share, and
    the spread of the paired differences over the seeds says how well their mean is known."""
    from image_autoencoding.data.batches import evaluation_batches, training_batches
    from image_autoencoding.evaluation.metrics import ssim

    def run(precision: str, seed: int) -> tuple[list[float], float]:
        config = build_config(work, f"train.precision={precision}", f"train.seed={seed}")
        trainer = make_trainer(config, data, work / "runs" / f"quality-{precision}-{seed}")
        losses, epoch = [], 0
        while len(losses) < steps:
            epoch += 1
            for x in training_batches(data.train.images, BATCH_SIZE, seed, epoch, trainer.device, trainer.normalize):
                result = trainer.train_step(x)
                if not bool(result.skipped):  # a skipped step (not finite) saw no images
                    recon, kl = result.sums.tolist()
                    losses.append((recon + kl) / len(x))
                if len(losses) == steps:
                    break
        trainer.model.eval()
        scores = []
        with torch.no_grad():
            for x in evaluation_batches(data.valid.images, BATCH_SIZE, trainer.device, trainer.normalize):
                with trainer.autocast():
                    x_hat = trainer.model.reconstruct(x)
                scores.append(ssim(trainer.normalize.to_unit(x), trainer.normalize.to_unit(x_hat)))
        return losses, float(torch.cat(scores).mean())

    def smoothed(values: list[float]) -> np.ndarray:
        window = min(20, len(values))  # a 20-step moving average; shorter runs (smoke tests) in one
        return np.convolve(values, np.ones(window) / window, mode="valid")

    def gap(a: list[float], b: list[float]) -> float:
        return float(np.mean(np.abs(smoothed(a) - smoothed(b)) / smoothed(b)))

    fp32_losses, fp32_ssim = zip(*(run("fp32", seed) for seed in range(1, seeds + 1)), strict=True)
    other_losses, other_ssim = zip(*(run(precision, seed) for seed in range(1, seeds + 1)), strict=True)
    differences = np.array(other_ssim) - np.array(fp32_ssim)
    result = {
        "steps": steps, "precision": precision, "seeds": seeds, "valid_images": len(data.valid.images),
        "valid_ssim_fp32": list(fp32_ssim), f"valid_ssim_{precision}": list(other_ssim),
        "ssim_difference_mean": float(differences.mean()),
        "loss_gap_vs_fp32": [gap(other, fp32) for fp32, other in zip(fp32_losses, other_losses, strict=True)],
    }
    if seeds >= 2:
        from scipy import stats

        # Student's t interval of the mean paired difference, 95%: the bound is met when the whole
        # interval lies inside +-QUALITY_BOUND, missed when it lies wholly outside.
        half = float(stats.t.ppf(0.975, seeds - 1) * differences.std(ddof=1) / np.sqrt(seeds))
        low, high = result["ssim_difference_mean"] - half, result["ssim_difference_mean"] + half
        result.update({
            "ssim_difference_95ci": [low, high],
            "ssim_seed_spread_fp32": float(np.std(fp32_ssim, ddof=1)),
            "loss_gap_seed_noise": gap(fp32_losses[1], fp32_losses[0]),
            "verdict": ("within" if -QUALITY_BOUND < low and high < QUALITY_BOUND else
                        "outside" if high < -QUALITY_BOUND or low > QUALITY_BOUND else "unresolved"),
        })
    return result


def _waits(row: dict) -> str:
    waits = row.get("host_waits")
    if not waits:
        return "-"
    if "error" in waits:
        return waits["error"]
    every = f" (every step: {', '.join(waits['every_step'])})" if waits["every_step"] else ""
    return f"{waits['per_step']:.2f}{every}"


def settings_table(settings: dict) -> str:
    """The --settings rows as a markdown table, then the fastest step's arithmetic, the skipped rows
    with their reasons and the failed ones with their errors."""
    lines = ["| row | images/s | vs original | TFLOP/s | share of the matrix-product rate / of the step | "
             "host waits per step |", "|---|---|---|---|---|---|"]
    for name, row in settings.get("model_step", {}).items():
        share = "-" if row["share_of_matmul"] is None else f"{row['share_of_matmul']:.0%} of {row['matmul_precision']}"
        lines.append(f"| model step, {name} | {row['img_s']:.1f} | {row['vs_original']:.1f}x | {row['tflops']:.3g} | "
                     f"{share} | {_waits(row)} |")
    for name, row in settings.get("end_to_end", {}).items():
        share = "-" if row["step_row"] is None else f"{row['share_of_step']:.0%} of step {row['step_row']}"
        lines.append(f"| end-to-end, {name} | {row['img_s']:.1f} | {row['vs_original']:.1f}x | - | {share} | "
                     f"{_waits(row)} |")
    if "best_step" in settings:
        best = settings["best_step"]
        shares = ", ".join(f"{best[key]:.1%} of {key.removeprefix('share_of_')}" for key in best
                           if key.startswith("share_of_"))
        lines.append(f"fastest model step: {best['row']}, {best['tflops']:.3g} TFLOP/s: {shares} "
                     "(target: at least 25% of bf16 or TF32)")
    lines += [f"skipped: {name}: {reason}" for name, reason in settings.get("skipped", {}).items()]
    lines += [f"failed: {name}: {error}" for name, error in settings.get("failed", {}).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global DEVICE, BATCH_SIZE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the training set")
    parser.add_argument("--valid-images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the original recipe")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps-per-round", type=int, default=6, help="timed steps of every pipeline per round")
    parser.add_argument("--compile", action="store_true", help="also time the model step under torch.compile")
    parser.add_argument("--settings", action="store_true",
                        help="time a row per GPU setting (train.cuda_graphs, train.tf32, bf16, data.on_device), each "
                        "with its host waits per step, instead of the precision variants")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per step of every pipeline")
    parser.add_argument("--matmul-size", type=int, default=0,
                        help="side of the timed matrix products; 0: 8192 on a GPU, 2048 on a CPU")
    parser.add_argument("--quality-steps", type=int, default=200, help="steps per run of the quality check; 0 skips")
    parser.add_argument("--quality-seeds", type=int, default=2,
                        help="paired fp32 / default-precision runs of the quality check, one per seed")
    parser.add_argument("--quality-precision", help="compare this precision with fp32 instead of the default one")
    parser.add_argument("--memory-images", type=int, default=100_000, help="cache size for the memory check; 0 skips")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "vae-train-throughput")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    from image_autoencoding.data.image_data import load_image_data
    from image_autoencoding.runtime import bf16_supported, resolve_device, resolve_precision

    DEVICE, BATCH_SIZE = args.device, args.batch_size
    device = resolve_device(args.device)

    work = args.work_dir
    paths = make_jpeg_set(work / "photos" / "train", args.images, FOOD101_SHAPE, seed=1)
    make_jpeg_set(work / "photos" / "valid", args.valid_images, FOOD101_SHAPE, seed=2)
    data = load_image_data(build_config(work).data, progress=False)

    variants = ["fp32+nchw", "fp32"]
    if bf16_supported(device):
        variants += ["bf16+nchw", "bf16"]
    default = resolve_precision("auto", device)
    if device.type == "cuda":
        variants += ["fp16", f"{default}+autotune"]  # fp16 with the gradient scaler, as train.precision=fp16 trains
    if args.settings:
        # The settings rows time the precisions; of these, only the default settings' step (the
        # end-to-end epoch's reference) stays: a GPU session's minutes are few.
        variants = [default]
    if args.compile:
        variants.append(f"{default}+compile")
    pipelines: dict = {"original": OriginalInOwnProcess(paths, args.workers, args.device, work)}
    steps = {variant: ModelStep(work, data, variant, *variant_overrides(variant)) for variant in variants}
    if device.type == "cpu":
        # The Trainers above tuned this process's malloc (train.reuse_cpu_memory): the original recipe
        # again under the same settings, so the table shows how much of the ratio that tuning is.
        pipelines["original_reused_memory"] = OriginalRecipe(paths, args.workers, device)
    pipelines.update({f"step:{variant}": step for variant, step in steps.items()})
    pipelines["end_to_end"] = end_to_end = EndToEnd(work, data)
    step_rows, epoch_rows, skipped, failed = {}, {}, {}, {}
    if args.settings:
        step_rows, skipped, failed = build_rows({
            name: lambda name=name, overrides=overrides: ModelStep(work, data, name, overrides)
            for name, overrides in STEP_SETTINGS.items()})
        epoch_rows, *refused = build_rows({
            name: lambda name=name, overrides=overrides: EndToEnd(work, data, name, tuple(overrides))
            for name, overrides in epoch_settings(BATCH_SIZE).items()})
        skipped.update(refused[0])
        failed.update(refused[1])
    rows = {**{f"step:{name}": row for name, row in step_rows.items()},
            **{f"end_to_end:{name}": row for name, row in epoch_rows.items()}}
    pipelines.update(rows)
    timed, failed_timed = interleaved_rounds(pipelines, args.rounds, args.steps_per_round, frozenset(rows))
    failed.update({name.split(":", 1)[1]: error for name, error in failed_timed.items()})
    for step in [*steps.values(), *step_rows.values()]:
        if step.skipped:
            print(f"warning: {step.variant}: {step.skipped} timed steps skipped (loss or gradient not finite)")

    results: dict = {"machine": describe(), "device": str(device), "batch_size": BATCH_SIZE, "rounds": args.rounds,
                     "steps_per_round": args.steps_per_round, "complete": False}

    def save() -> None:  # after the timed rounds, and again at the end: a run stopped between keeps its rates
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))

    results["original_img_s"] = timed["original"]["img_s"]
    if "original_reused_memory" in timed:
        results["original_img_s_reused_memory"] = timed["original_reused_memory"]["img_s"]
    results["model_step_img_s"] = {variant: timed[f"step:{variant}"]["img_s"] for variant in variants}
    results["end_to_end_img_s"] = timed["end_to_end"]["img_s"]
    results["default_precision"], results["warm_up_s"] = end_to_end.trainer.precision, end_to_end.warm_up_s
    best = max(variants, key=lambda variant: results["model_step_img_s"][variant])
    results["ratio_vs_original"] = results["end_to_end_img_s"] / results["original_img_s"]
    results["ratio_to_model_step"] = results["end_to_end_img_s"] / results["model_step_img_s"][best]
    results["per_round_img_s"] = {name: total["per_round_img_s"] for name, total in timed.items()}
    # The same ratio within each round: how much the machine's drift moves it.
    results["ratio_to_model_step_per_round"] = [
        e2e / step for e2e, step in zip(timed["end_to_end"]["per_round_img_s"],
                                        timed[f"step:{best}"]["per_round_img_s"], strict=True)]
    results["end_to_end_outside_step"] = end_to_end.outside_the_step()
    if args.settings:
        results["settings"] = {"img_s": {name: timed[name]["img_s"] for name in rows if name in timed},
                               "skipped": skipped, "failed": failed}
    save()
    waits = {}
    if device.type == "cuda":
        for name, row in {"end_to_end": end_to_end, **rows}.items():
            if name in timed:
                try:
                    waits[name] = row.host_waits(HOST_WAIT_STEPS)
                except Exception as error:  # noqa: BLE001 - a diagnostic: the figures above still count
                    waits[name] = {"error": repr(error)}
        results["host_waits"] = waits["end_to_end"]
    results["arithmetic"] = arithmetic(work, data, device, args.matmul_size)
    if args.settings:
        overrides = {**STEP_SETTINGS, **epoch_settings(BATCH_SIZE)}
        results["settings"] = {**settings_results(step_rows, epoch_rows, overrides, timed, waits,
                                                  results["arithmetic"], results["original_img_s"]),
                               "skipped": skipped, "failed": failed}
    del pipelines, steps, end_to_end, rows, step_rows, epoch_rows
    if args.memory_images and not Path("/proc/self/status").exists():
        print("memory check skipped: it reads the process's high-water mark from Linux's /proc")
    elif args.memory_images:
        results["memory"] = {"images": args.memory_images, **peak_memory(work, args.memory_images, 20)}
    compared = args.quality_precision or results["default_precision"]
    if args.quality_steps and compared != "fp32":  # else it compares fp32 with itself
        results["quality"] = quality(work, data, args.quality_steps, compared, args.quality_seeds)
    results["seconds"] = time.perf_counter() - started
    results["command"] = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    print(f"{results['machine']}; device {device}; {args.images} Food-101-shaped JPEGs at 64 px, batch {BATCH_SIZE}; "
          f"{args.rounds} interleaved rounds of {args.steps_per_round} steps per pipeline")
    print("| pipeline | images/s | vs original |")
    print("|---|---|---|")
    original = results["original_img_s"]
    print(f"| original recipe (JPEG DataLoader, fp32, 2 backward passes) | {original:.1f} | 1.0x |")
    if "original_img_s_reused_memory" in results:
        reused = results["original_img_s_reused_memory"]
        print(f"| original recipe, with our malloc settings (train.reuse_cpu_memory) | {reused:.1f} | "
              f"{reused / original:.1f}x |")
    for variant, rate in results["model_step_img_s"].items():
        name = variant.replace("+nchw", ", NCHW").replace("+compile", ", torch.compile")
        name = name.replace("+autotune", ", cudnn.benchmark")
        name += "" if "nchw" in variant else ", channels_last"
        print(f"| our model step alone, {name} | {rate:.1f} | {rate / original:.1f}x |")
    e2e = results["end_to_end_img_s"]
    print(f"| our end-to-end epoch (cache, {results['default_precision']}) | {e2e:.1f} | {e2e / original:.1f}x |")
    per_round = results["ratio_to_model_step_per_round"]
    print(f"end-to-end / best model step ({best}): {results['ratio_to_model_step']:.0%} (per round: median "
          f"{np.median(per_round):.0%}, {min(per_round):.0%} to {max(per_round):.0%}); "
          f"warm-up {results['warm_up_s']:.0f} s")
    outside = results["end_to_end_outside_step"]
    print(f"within the end-to-end epochs: {outside['share_in_step']:.1%} of the time in the model step, "
          f"{outside['outside_ms_per_step']:.1f} ms per step outside it (batches, each epoch's end)")
    a = results["arithmetic"]
    achieved = results["model_step_img_s"][best] * a["ours_gflop_per_image"]
    at_peak = a["matmul_gflops"] / a["ours_gflop_per_image"]
    print(f"arithmetic per image: original {a['original_gflop_per_image']:.2f} GFLOP, ours "
          f"{a['ours_gflop_per_image']:.2f} GFLOP; {a['matmul_precision']} matrix product on this device "
          f"{a['matmul_gflops']:.0f} GFLOPS, the best step {achieved:.0f} GFLOPS "
          f"({achieved / a['matmul_gflops']:.0%}); "
          f"at the matrix-product rate our step would run {at_peak:.0f} img/s, {at_peak / original:.1f}x the original")
    rates = ", ".join(f"{kind} {rate:.3g}" for kind, rate in a["matmul_tflops"].items())
    print(f"{a['matmul_size']}x{a['matmul_size']} matrix products on this device, TFLOP/s: {rates}")
    if "host_waits" in results:
        print(f"host waits for the GPU per end-to-end step: {results['host_waits']}")
    if "settings" in results:
        print(settings_table(results["settings"]))
    if "memory" in results:
        m = results["memory"]
        print(f"peak memory training on a {m['images']:,}-image cache ({m['cache_mb']:.0f} MB): "
              f"{m['peak_rss_mb']:.0f} MB resident at peak (at the end {m.get('end_rssanon_mb', 0):.0f} MB "
              f"private + {m.get('end_rssfile_mb', 0):.0f} MB mapped files)")
    if "quality" in results:
        q = results["quality"]
        precision = q["precision"]
        pairs = ", ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(q["valid_ssim_fp32"], q[f"valid_ssim_{precision}"],
                                                               strict=True))
        line = (f"quality after {q['steps']} steps, {q['seeds']} seeds, {q['valid_images']} held-out images: "
                f"valid SSIM fp32 / {precision} {pairs}; {precision} - fp32 {q['ssim_difference_mean']:+.4f}")
        if "verdict" in q:
            low, high = q["ssim_difference_95ci"]
            line += (f" (95% interval {low:+.4f} to {high:+.4f}: {q['verdict']} the +-{QUALITY_BOUND} bound; "
                     f"fp32 between seeds {q['ssim_seed_spread_fp32']:.4f})")
        gaps = ", ".join(f"{gap:.1%}" for gap in q["loss_gap_vs_fp32"])
        line += f"; smoothed loss curves differ from fp32's by {gaps}"
        if "loss_gap_seed_noise" in q:
            line += f", fp32's between seeds by {q['loss_gap_seed_noise']:.1%}"
        print(line)
    print(f"command: {results['command']} ({results['seconds'] / 60:.1f} min)")
    results["complete"] = True
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
