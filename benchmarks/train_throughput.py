"""Training throughput: the original recipe against our model step and our end-to-end epoch.

    python benchmarks/train_throughput.py [--images 2000] [--steps 30] [--device auto] [--json out.json]

On one JPEG set shaped like Food-101 (cut from real photographs), in one run:

1. the original recipe, reimplemented here: every epoch PIL decode + torchvision transforms in a
   DataLoader, fp32, an extra decoder pass on random latents every step, and two backward passes
   per step (encoder objective with retain_graph, then decoder objective; both optimizers step after
   both backwards, since the original's step-between-backwards order fails on modern PyTorch);
   on the CPU timed once with the C library's default malloc and once more under our malloc settings;
2. our model step alone (batches already in memory), in each precision this device supports;
3. our end-to-end epoch: cache -> batches -> step, default settings, after a short warm-up;
   on a GPU also how often a step makes the host wait for the GPU, and at which source lines.

Everything runs on --device (auto: the GPU when there is one), the original recipe too, as the
original moved its model and batches to the GPU.

Then, unless skipped: peak memory of training on a 100,000-image cache (a subprocess), and the
quality check: validation SSIM and the loss curve after the same number of images seen, fp32
against the default precision (and the default precision under a second seed, for the noise).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe
from photo_sets import FOOD101_SHAPE, make_jpeg_set, original_loader

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


def make_trainer(config, data, run_dir: Path):
    from image_autoencoding.training.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(config, run_dir, data)


# -- 1. the original recipe ---------------------------------------------------------------------------


def original_recipe(paths: list[Path], workers: int, max_steps: int | None, device: torch.device) -> float:
    """images/s of the original's training epoch, reimplemented faithfully (see the module docstring)."""
    from image_autoencoding.config import load_config
    from image_autoencoding.models.vae import build_model, loss_terms

    cfg = load_config(None, []).model
    torch.manual_seed(0)
    model = build_model(cfg, 64).to(device)
    encoder_optimizer = torch.optim.RMSprop(model.encoder.parameters(), lr=1e-3, alpha=0.9, eps=1e-8)
    decoder_optimizer = torch.optim.RMSprop(model.decoder.parameters(), lr=1e-3, alpha=0.9, eps=1e-8)
    model.train()
    seen, start = 0, time.perf_counter()
    for step, x in enumerate(original_loader(paths, BATCH_SIZE, workers, drop_last=True)):
        if max_steps is not None and step >= max_steps:
            break
        x = x.to(device)
        posterior = model.encoder(x)
        x_hat = model.decoder(posterior.sample())
        x_p = model.decoder(torch.randn(len(x), cfg.latent_dim, device=device))  # the original's samples pass
        recon, kl = loss_terms(x, x_hat, posterior)
        loss_encoder = recon.sum() + kl.sum()
        loss_decoder = recon.sum()
        model.zero_grad()
        loss_encoder.backward(retain_graph=True)
        loss_decoder.backward()
        encoder_optimizer.step()
        decoder_optimizer.step()
        seen += len(x)
        del x_p
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


# -- 2. our model step alone --------------------------------------------------------------------------


def model_step_alone(work: Path, data, variant: str, steps: int) -> float:
    """`variant`: a precision, optionally with '+compile', '+nchw' (channels_last off) or '+autotune'
    (cuDNN benchmarks its convolution algorithms for these shapes first: torch.backends.cudnn.benchmark)."""
    precision, *flags = variant.split("+")
    torch.backends.cudnn.benchmark = "autotune" in flags
    config = build_config(work, f"train.precision={precision}", f"train.compile={'compile' in flags}",
                          f"train.channels_last={'nchw' not in flags}")
    trainer = make_trainer(config, data, work / "runs" / f"step-{variant}")
    from image_autoencoding.data.batches import training_batches

    batches = list(training_batches(data.train.images, BATCH_SIZE, 0, 1, trainer.device, trainer.normalize, 16))
    for x in batches[:3]:
        trainer.train_step(x)  # warm-up: allocator, oneDNN / cuDNN kernels, torch.compile when on
    skipped = 0
    start = time.perf_counter()
    for i in range(steps):
        skipped += trainer.train_step(batches[i % len(batches)]) is None
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()  # one wait for the device at the end, none per step
    rate = steps * BATCH_SIZE / (time.perf_counter() - start)
    if skipped:  # a skipped step does no optimizer work: the rate would flatter the variant
        print(f"warning: {variant}: {skipped} of {steps} steps skipped (loss or gradient not finite)")
    torch.backends.cudnn.benchmark = False
    return rate


# -- 3. our end-to-end epoch --------------------------------------------------------------------------


def end_to_end_epoch(work: Path, data, epochs: int) -> tuple[float, str, float]:
    """Mean images/s over `epochs` epochs after a 3-step warm-up (several epochs where one is short)."""
    from torch.utils.tensorboard import SummaryWriter

    config = build_config(work)
    trainer = make_trainer(config, data, work / "runs" / "epoch")
    writer = SummaryWriter(str(work / "runs" / "epoch" / "tensorboard"))
    warm = time.perf_counter()
    trainer.cfg.max_steps_per_epoch = 3
    trainer.train_epoch(0, writer)  # warm-up (and compile) outside the timed epoch
    warm = time.perf_counter() - warm
    trainer.cfg.max_steps_per_epoch = None
    rates = [trainer.train_epoch(epoch, writer)["images_per_s"] for epoch in range(1, epochs + 1)]
    writer.close()
    return float(np.mean(rates)), trainer.precision, warm


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
    trainer.cfg.max_steps_per_epoch = steps
    from torch.utils.tensorboard import SummaryWriter

    trainer.train_epoch(1, SummaryWriter(str(work_path / "runs" / "memory" / "tb")))
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    # RssFile is mostly the cache's pages mapped in; the kernel drops them under memory pressure.
    megabytes = {key: int(status[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile") if key in status}
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "cache_mb": cached.images.nbytes / 2**20,
                      **{f"end_{key.lower()}_mb": value for key, value in megabytes.items()}}))


def peak_memory(work: Path, images: int, steps: int) -> dict:
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import train_throughput as t; " \
           f"t.peak_memory_child({str(work)!r}, {images}, {steps})"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- quality: same images seen, fp32 against the default precision ------------------------------------


def quality(work: Path, data, steps: int) -> dict:
    from image_autoencoding.data.batches import evaluation_batches, training_batches
    from image_autoencoding.evaluation.metrics import ssim

    def run(precision: str, seed: int) -> tuple[list[float], float]:
        config = build_config(work, f"train.precision={precision}", f"train.seed={seed}")
        trainer = make_trainer(config, data, work / "runs" / f"quality-{precision}-{seed}")
        losses, epoch = [], 0
        while len(losses) < steps:
            epoch += 1
            for x in training_batches(data.train.images, BATCH_SIZE, seed, epoch, trainer.device, trainer.normalize):
                recon, kl = trainer.train_step(x).tolist()
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

    from image_autoencoding.training.device import resolve_device, resolve_precision

    default = resolve_precision(build_config(work).train.precision, resolve_device(DEVICE))
    fp32_losses, fp32_ssim = run("fp32", 1)
    default_losses, default_ssim = run(default, 1)
    other_losses, other_ssim = run(default, 2)

    def smoothed(values: list[float]) -> np.ndarray:
        return np.convolve(values, np.ones(20) / 20, mode="valid")

    def gap(a: list[float], b: list[float]) -> float:
        return float(np.mean(np.abs(smoothed(a) - smoothed(b)) / smoothed(b)))

    return {
        "steps": steps, "default_precision": default, "valid_ssim_fp32": fp32_ssim,
        "valid_ssim_default": default_ssim, "valid_ssim_default_seed2": other_ssim,
        "ssim_gap_default_vs_fp32": default_ssim - fp32_ssim,
        "loss_gap_default_vs_fp32": gap(default_losses, fp32_losses),
        "loss_gap_seed_noise": gap(other_losses, default_losses),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the training set")
    parser.add_argument("--valid-images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the original recipe")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--epochs", type=int, default=1, help="timed end-to-end epochs (mean images/s)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of the model step alone")
    parser.add_argument("--original-steps", type=int, help="stop the original recipe's epoch after this many steps")
    parser.add_argument("--compile", action="store_true", help="also time the model step under torch.compile")
    parser.add_argument("--quality-steps", type=int, default=200, help="steps per run of the quality check; 0 skips")
    parser.add_argument("--memory-images", type=int, default=100_000, help="cache size for the memory check; 0 skips")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "vae-train-throughput")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    from image_autoencoding.data.image_data import load_image_data
    from image_autoencoding.training.device import bf16_supported, resolve_device, resolve_precision

    global DEVICE
    DEVICE = args.device
    device = resolve_device(args.device)

    work = args.work_dir
    paths = make_jpeg_set(work / "photos" / "train", args.images, FOOD101_SHAPE, seed=1)
    make_jpeg_set(work / "photos" / "valid", args.valid_images, FOOD101_SHAPE, seed=2)
    data = load_image_data(build_config(work).data, progress=False)

    results: dict = {"machine": describe(), "device": str(device)}
    results["original_img_s"] = original_recipe(paths, args.workers, args.original_steps, device)
    variants = ["fp32+nchw", "fp32"]
    if bf16_supported(device):
        variants += ["bf16+nchw", "bf16"]
    default = resolve_precision("auto", device)
    if device.type == "cuda":
        variants += ["fp16", f"{default}+autotune"]  # fp16 with the gradient scaler, as train.precision=fp16 trains
    if args.compile:
        variants.append(f"{default}+compile")
    results["model_step_img_s"] = {v: model_step_alone(work, data, v, args.steps) for v in variants}
    if device.type == "cpu":
        # The Trainers above tuned this process's malloc (train.reuse_cpu_memory): the original recipe
        # again under the same settings, so the table shows how much of the ratio that tuning is.
        results["original_img_s_reused_memory"] = original_recipe(paths, args.workers, args.original_steps, device)
    results["end_to_end_img_s"], results["default_precision"], results["warm_up_s"] = end_to_end_epoch(
        work, data, args.epochs)
    best_step = max(results["model_step_img_s"].values())
    results["ratio_vs_original"] = results["end_to_end_img_s"] / results["original_img_s"]
    results["ratio_to_model_step"] = results["end_to_end_img_s"] / best_step
    if device.type == "cuda":
        try:
            results["host_waits"] = host_waits(work, data)
        except Exception as error:  # noqa: BLE001 - a diagnostic: the figures above still count
            results["host_waits"] = {"error": repr(error)}
    if args.memory_images:
        results["memory"] = {"images": args.memory_images, **peak_memory(work, args.memory_images, 20)}
    if args.quality_steps and results["default_precision"] != "fp32":  # else it compares fp32 with itself
        results["quality"] = quality(work, data, args.quality_steps)
    results["seconds"] = time.perf_counter() - started
    results["command"] = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    print(f"{results['machine']}; device {device}; {args.images} Food-101-shaped JPEGs at 64 px, batch {BATCH_SIZE}")
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
    print(f"end-to-end / best model step: {results['ratio_to_model_step']:.0%}; warm-up {results['warm_up_s']:.0f} s")
    if "host_waits" in results:
        print(f"host waits for the GPU per end-to-end step: {results['host_waits']}")
    if "memory" in results:
        m = results["memory"]
        print(f"peak memory training on a {m['images']:,}-image cache ({m['cache_mb']:.0f} MB): "
              f"{m['peak_rss_mb']:.0f} MB resident at peak (at the end {m.get('end_rssanon_mb', 0):.0f} MB "
              f"private + {m.get('end_rssfile_mb', 0):.0f} MB mapped files)")
    if "quality" in results:
        q = results["quality"]
        print(f"after {q['steps']} steps: valid SSIM fp32 {q['valid_ssim_fp32']:.4f}, {q['default_precision']} "
              f"{q['valid_ssim_default']:.4f} (gap {q['ssim_gap_default_vs_fp32']:+.4f}; other seed "
              f"{q['valid_ssim_default_seed2']:.4f}); loss curve gap {q['loss_gap_default_vs_fp32']:.2%} "
              f"vs seed noise {q['loss_gap_seed_noise']:.2%}")
    print(f"command: {results['command']} ({results['seconds'] / 60:.1f} min)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
