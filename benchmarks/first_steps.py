"""The first steps of training: KL, reconstruction and the encoder's log-variance step by step, with
and without a learning-rate warm-up, in each precision.

    python benchmarks/first_steps.py [--steps 10] [--runs fp32:0 fp32:100 bf16:0] [--json out.json]

Each run is PRECISION:WARMUP_STEPS on Fashion-MNIST at 32 px with configs/fashion_mnist.yaml (the
default recipe) and the same seed. After each step it records the batch's mean KL and
reconstruction loss per image (from that step's forward) and the largest |mu| and log-variance the
encoder then gives the batch (after the step's update). A log-variance at the clamp (model.logvar_max,
20) is an exp(20) ~ 5e8 variance: one such unit dominates an epoch's mean KL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from machine import describe

from image_autoencoding.config import load_config
from image_autoencoding.data.image_data import load_image_data
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.trainer import Trainer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class StepProbe(Callback):
    def __init__(self):
        self.rows = []

    @torch.no_grad()
    def on_step_end(self, trainer, batch, result) -> None:
        posterior = trainer.model.encoder(batch)
        skipped = bool(result.skipped)
        recon, kl = (float(v) / len(batch) for v in result.sums) if not skipped else (float("nan"),) * 2
        self.rows.append({"step": trainer.step, "lr": trainer.training_step.learning_rate,
                          "kl": kl, "recon": recon, "mu_abs_max": float(posterior.mean.abs().max()),
                          "logvar_max": float(posterior.logvar.max())})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", nargs="+", default=["fp32:0", "fp32:100", "bf16:0"], metavar="PRECISION:WARMUP")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            precision, _, warmup = run.partition(":")
            config = load_config(str(REPO / "configs/fashion_mnist.yaml"), [
                f"data.cache_dir={tmp}", f"train.precision={precision}", f"train.warmup_steps={warmup or 0}",
                "train.progress=false", f"train.output_dir={tmp}"])
            probe = StepProbe()
            Trainer(config, load_image_data(config.data, progress=False), callbacks=[probe]).train_epoch(
                1, max_steps=args.steps)
            results[run] = probe.rows
    print(f"{describe()}\n")
    print("| run (precision:warm-up) | step | lr | KL / image | recon / image | max abs mu | max logvar |")
    print("|---|---|---|---|---|---|---|")
    for run, rows in results.items():
        for r in rows:
            print(f"| {run} | {r['step']} | {r['lr']:.2e} | {r['kl']:.1f} | {r['recon']:.1f} | {r['mu_abs_max']:.2f} | "
                  f"{r['logvar_max']:.2f} |")
    if args.json is not None:
        command = "python benchmarks/first_steps.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.json.write_text(json.dumps({"command": command, "machine": describe(), "torch": torch.__version__,
                                         "runs": results}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
