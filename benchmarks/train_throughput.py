"""Training throughput: the original recipe against our model step and our end-to-end epoch.

    python benchmarks/train_throughput.py [--images 2000] [--rounds 5] [--steps-per-round 6] [--json out.json]

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
image of both recipes and times a large matrix product: where the step is compute-bound, that rate
bounds how far the ratios can go.

Then, unless skipped: peak memory of training on a 100,000-image cache (a subprocess), and the
quality check: validation SSIM and the loss curve after the same number of images seen, fp32
against the default precision (or --quality-precision), in pairs of runs that share a seed
(--quality-seeds pairs): the mean paired SSIM difference and, from two pairs on, its 95% interval
against the issue's 0.005 bound. Skipped where the default precision is fp32 itself.
"""

from __future__ import annotations

import argparse
import json
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
BATCH_SIZE = 64
DEVICE = "auto"  # set from --device in main


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
                f"t.original_child({str(self.list_file)!r}, {self.workers}, {self.device!r}, {steps}, {round_index})")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        images, seconds = json.loads(out.strip().splitlines()[-1])
        return int(images), float(seconds)


def original_child(list_file: str, workers: int, device: str, steps: int, round_index: int) -> None:
    from image_autoencoding.runtime import resolve_device

    paths = [Path(p) for p in json.loads(Path(list_file).read_text())]
    print(json.dumps(OriginalRecipe(paths, workers, resolve_device(device)).run(steps, round_index)))


def _wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # at the ends of a timed stretch only, never per step


# -- 2. our model step alone --------------------------------------------------------------------------


class ModelStep:
    """`variant`: a precision, optionally with '+compile', '+nchw' (channels_last off) or '+autotune'
    (cuDNN benchmarks its convolution algorithms for these shapes first: torch.backends.cudnn.benchmark)."""

    def __init__(self, work: Path, data, variant: str):
        from image_autoencoding.data.batches import training_batches

        precision, *flags = variant.split("+")
        self.variant, self.autotune, self.skipped = variant, "autotune" in flags, 0
        config = build_config(work, f"train.precision={precision}", f"train.compile={'compile' in flags}",
                              f"train.channels_last={'nchw' not in flags}")
        self.trainer = make_trainer(config, data, work / "runs" / f"step-{variant}")
        # Full batches only: a training set under 16 batches ends in a partial one, which is faster.
        self.batches = [x for x in training_batches(data.train.images, BATCH_SIZE, 0, 1, self.trainer.device,
                                                    self.trainer.normalize, 16) if len(x) == BATCH_SIZE]
        self.next = 0
        self.run(3, -1)  # warm-up: allocator, oneDNN / cuDNN kernels, torch.compile when on

    def run(self, steps: int, round_index: int) -> tuple[int, float]:
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

    def __init__(self, work: Path, data):
        self.timer = StepTimer()  # this epoch's time in the step, its steps and images
        self.trainer = make_trainer(build_config(work), data, work / "runs" / "epoch", [self.timer])
        self.epoch = 0
        self.step_seconds, self.epoch_seconds, self.steps = 0.0, 0.0, 0  # over the timed rounds
        warm = time.perf_counter()
        self.run(3, -1)  # warm-up (and compile) outside the timed epochs
        self.warm_up_s = time.perf_counter() - warm

    def run(self, steps: int, round_index: int) -> tuple[int, float]:
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


def interleaved_rounds(pipelines: dict, rounds: int, steps: int) -> dict[str, dict]:
    """Every pipeline `steps` steps per round, the order rotated by one each round."""
    names = list(pipelines)
    totals = {name: {"images": 0, "seconds": 0.0, "per_round_img_s": []} for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            images, seconds = pipelines[name].run(steps, r)
            totals[name]["images"] += images
            totals[name]["seconds"] += seconds
            totals[name]["per_round_img_s"].append(images / seconds)
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {totals[name]['per_round_img_s'][-1]:.1f}" for name in names), flush=True)
    for total in totals.values():
        total["img_s"] = total["images"] / total["seconds"]
    return totals


def arithmetic(trainer, data, device: torch.device) -> dict:
    """What bounds the ratios where the step is compute-bound: FLOPs per image of each recipe (the
    convolutions and matrix products of one step, forward and backward, by torch.utils.flop_counter)
    and the best of 5 large matrix products on this device in `trainer`'s precision (the default)."""
    from model_cost import step_gflop_per_image
    from torch.utils.flop_counter import FlopCounterMode

    from image_autoencoding.data.batches import training_batches

    original = OriginalRecipe([], 0, device)
    with FlopCounterMode(display=False) as counter:
        original.step(torch.randn(BATCH_SIZE, 3, 64, 64))
    original_flops = counter.get_total_flops() / BATCH_SIZE
    x = next(training_batches(data.train.images, BATCH_SIZE, 0, 1, trainer.device, trainer.normalize))
    ours_flops = step_gflop_per_image(trainer, x) * 1e9
    n = 4096 if device.type == "cuda" else 2048
    precision = trainer.precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = []
    for _ in range(6):
        _wait_for(device)
        start = time.perf_counter()
        a @ b
        _wait_for(device)
        seconds.append(time.perf_counter() - start)
    return {"original_gflop_per_image": original_flops / 1e9, "ours_gflop_per_image": ours_flops / 1e9,
            "matmul_gflops": 2 * n**3 / min(seconds[1:]) / 1e9, "matmul_precision": precision}


def host_waits(work: Path, data, steps: int = 5) -> dict:
    """GPU only: how often, and where, `steps` end-to-end steps (batches included) made the host wait
    for the GPU, counted by CUDA's sync debug mode. One per step is the non-finite check; each wait
    stops the CPU from queueing the next step's kernels while the GPU works."""
    import warnings
    from collections import Counter

    from image_autoencoding.data.batches import training_batches

    trainer = make_trainer(build_config(work), data, work / "runs" / "host-waits")
    batches = training_batches(data.train.images, BATCH_SIZE, 0, 1, trainer.device, trainer.normalize, steps + 2)
    for _ in range(2):
        trainer.train_step(next(batches))  # lazily made optimizer state is not a per-step cost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for x in batches:
                trainer.train_step(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"steps": steps, "per_step": sum(where.values()) / steps, "where": dict(where)}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the training set")
    parser.add_argument("--valid-images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the original recipe")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps-per-round", type=int, default=6, help="timed steps of every pipeline per round")
    parser.add_argument("--compile", action="store_true", help="also time the model step under torch.compile")
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

    global DEVICE
    DEVICE = args.device
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
    if args.compile:
        variants.append(f"{default}+compile")
    pipelines: dict = {"original": OriginalInOwnProcess(paths, args.workers, args.device, work)}
    steps = {variant: ModelStep(work, data, variant) for variant in variants}
    if device.type == "cpu":
        # The Trainers above tuned this process's malloc (train.reuse_cpu_memory): the original recipe
        # again under the same settings, so the table shows how much of the ratio that tuning is.
        pipelines["original_reused_memory"] = OriginalRecipe(paths, args.workers, device)
    pipelines.update({f"step:{variant}": step for variant, step in steps.items()})
    pipelines["end_to_end"] = end_to_end = EndToEnd(work, data)
    timed = interleaved_rounds(pipelines, args.rounds, args.steps_per_round)
    for step in steps.values():
        if step.skipped:
            print(f"warning: {step.variant}: {step.skipped} timed steps skipped (loss or gradient not finite)")

    results: dict = {"machine": describe(), "device": str(device), "rounds": args.rounds,
                     "steps_per_round": args.steps_per_round}
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
    # The end-to-end Trainer, its timing done, is the default-settings step to count the FLOPs of.
    results["arithmetic"] = arithmetic(end_to_end.trainer, data, device)
    del pipelines, steps, end_to_end
    if device.type == "cuda":
        try:
            results["host_waits"] = host_waits(work, data)
        except Exception as error:  # noqa: BLE001 - a diagnostic: the figures above still count
            results["host_waits"] = {"error": repr(error)}
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
    if "host_waits" in results:
        print(f"host waits for the GPU per end-to-end step: {results['host_waits']}")
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
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
