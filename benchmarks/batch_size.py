"""Batch size for GPUs: validation SSIM and images/s after the same images seen at each batch size,
the learning rate scaled with the batch, and the largest batch whose SSIM stays within the seed
noise of the smallest one's (the reference, batch 64 by default).

    python benchmarks/batch_size.py [--batch-sizes 64 256 1024] [--images-seen 120000] [--seeds 1 2 3]
                                    [--dataset fashion-mnist] [--image-size 32] [--rule sqrt] [--json out.json]

Each batch size B is a --variant row of quality.py: the default recipe (configs/coco.yaml's train
section) with
- the learning rate lr x sqrt(B / B0) (--rule sqrt, the default): the square-root rule Malladi et
  al. 2022 ("On the SDEs and Scaling Rules for Adaptive Gradient Algorithms") derive for RMSprop
  and Adam; this architecture's default optimizer is RMSprop. The linear rule (--rule linear,
  Goyal et al. 2017, "Accurate, Large Minibatch SGD") is SGD's: an adaptive method divides each
  update by the gradient's running magnitude, so a batch B / B0 times larger makes its steps less
  noisy, not larger, and the linear rule overshoots. The other half of Malladi et al.'s rule, 1 -
  alpha scaled with B, is not applied: RMSprop's alpha is the original's 0.9 (no config key);
- the warm-up over the same images as B0's (train.warmup_steps x B0 / B steps, at least 1): Goyal
  et al.'s gradual warm-up counts epochs (images), not steps;
- the cosine schedule over the row's own steps (quality.py plans them).

Every row sees the same images (--images-seen, rounded up to whole batches of its own size); each
seed trains every batch size (seeds outermost, so a run stopped early keeps whole seeds). Scored on
the whole validation split (or --valid-images). The seed noise is the half-width of B0's 95%
interval over seeds (Student's t); a batch size is within it when its mean SSIM is at least B0's
mean minus that half-width (higher is within too). The difference from B0 paired by seed is printed
beside it. With one seed there is no interval, and no batch size is chosen.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RULES = ("sqrt", "linear")
BATCH_SIZES = (64, 256, 1024)  # the reference first; train_throughput.py times the epoch at the same ratios


def scaled(lr: float, warmup_steps: int, batch: int, reference: int, rule: str) -> tuple[float, int]:
    """(learning rate, warm-up steps) at `batch` from those at `reference` (module docstring)."""
    ratio = batch / reference
    factor = math.sqrt(ratio) if rule == "sqrt" else ratio
    return lr * factor, max(1, round(warmup_steps / ratio)) if warmup_steps else 0


def row_name(batch: int) -> str:
    return f"batch{batch}"


def batch_variants(batch_sizes: list[int], rule: str) -> dict[str, list[str]]:
    """Each batch size's quality.py --variant overrides, the first batch size the reference."""
    from image_autoencoding.config import load_config

    train = load_config(REPO / "configs/coco.yaml").train
    variants = {}
    for batch in batch_sizes:
        lr, warmup = scaled(train.lr, train.warmup_steps, batch, batch_sizes[0], rule)
        variants[row_name(batch)] = [f"train.batch_size={batch}", f"train.lr={lr:.6g}", f"train.warmup_steps={warmup}"]
    return variants


def batch_choice(document: dict) -> dict:
    """From quality.py's JSON of the batch rows (complete or cut short): per batch size its seeds,
    images/s and SSIM (mean, 95% interval), its SSIM difference from the reference (the smallest
    batch) paired by seed, and whether it is within the reference's seed noise; and the largest
    batch size that is."""
    from seed_statistics import mean_interval

    rows = defaultdict(dict)
    for row in document.get("results", []):
        rows[row["batch_size"]][row["seed"]] = row
    if not rows:
        return {"reference": None, "seed_noise": None, "rows": {}, "largest_within_noise": None,
                "why_none": "no row finished"}
    reference = min(rows)
    base = mean_interval([row["ssim"] for row in rows[reference].values()])
    noise = None if base["low"] is None else base["high"] - base["mean"]
    table = {}
    for batch, by_seed in sorted(rows.items()):
        ssim = mean_interval([row["ssim"] for row in by_seed.values()])
        shared = sorted(set(by_seed) & set(rows[reference]))
        differences = [by_seed[s]["ssim"] - rows[reference][s]["ssim"] for s in shared]
        first = next(iter(by_seed.values()))
        given = dict(o.partition("=")[::2] for o in first.get("overrides", []))  # the last of each key
        table[batch] = {
            "seeds": sorted(by_seed), "lr": given.get("train.lr"), "warmup_steps": given.get("train.warmup_steps"),
            "steps": first.get("steps"),
            "images_seen": first.get("images_seen"),
            "img_s": sum(row["train_img_s"] for row in by_seed.values()) / len(by_seed), "ssim": ssim,
            "paired_difference": mean_interval(differences) if differences else None,
            "within_seed_noise": None if noise is None else ssim["mean"] >= base["mean"] - noise,
        }
    within = [batch for batch, row in table.items() if row["within_seed_noise"]]
    result = {"reference": reference, "seed_noise": noise, "rows": table,
              "largest_within_noise": max(within) if within else None}
    if noise is None:
        result["why_none"] = f"batch {reference} has one seed: no interval to be within"
    return result


def _interval(interval: dict | None, signed: bool = False) -> str:
    if interval is None:
        return "-"
    fmt = "+.4f" if signed else ".4f"
    text = format(interval["mean"], fmt)
    if interval["low"] is not None:
        text += f" [{format(interval['low'], fmt)}, {format(interval['high'], fmt)}]"
    return text


def choice_table(choice: dict) -> str:
    reference = choice["reference"]
    lines = [f"| batch | lr | warm-up steps | steps | images/s | validation SSIM (95% interval) | minus batch "
             f"{reference}, paired by seed | within the seed noise |", "|---|---|---|---|---|---|---|---|"]
    for batch, row in choice["rows"].items():
        within = {None: "-", True: "yes", False: "no"}[row["within_seed_noise"]]
        lines.append(f"| {batch} | {row['lr']} | {row['warmup_steps']} | {row['steps']} | {row['img_s']:.0f} | "
                     f"{_interval(row['ssim'])} | {_interval(row['paired_difference'], signed=True)} | {within} |")
    if choice["seed_noise"] is not None:
        lines.append(f"seed noise (half-width of batch {reference}'s 95% interval): {choice['seed_noise']:.4f}; "
                     f"largest batch within it: {choice['largest_within_noise']}")
    else:
        lines.append(f"no batch size chosen: {choice['why_none']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES),
                        help="the first is the reference the learning rate and warm-up are scaled from")
    parser.add_argument("--images-seen", type=int, default=120_000, help="training images per row")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--rule", choices=RULES, default="sqrt", help="learning rate x (B / B0) ** 0.5 or x B / B0")
    parser.add_argument("--dataset", choices=["fashion-mnist", "photos"], default="fashion-mnist")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--photo-crops", type=int, default=8000, help="--dataset photos: training crops")
    parser.add_argument("--valid-images", type=int, help="score on the first N validation images (default: all)")
    parser.add_argument("--json", type=Path, help="default: a temporary file")
    args = parser.parse_args(argv)
    if sorted(args.batch_sizes) != args.batch_sizes or len(set(args.batch_sizes)) != len(args.batch_sizes):
        parser.error(f"--batch-sizes {' '.join(map(str, args.batch_sizes))}: expected increasing sizes, the "
                     "reference first")
    import quality

    json_path = args.json or Path(tempfile.mkdtemp()) / "batch_size.json"
    command = ["--datasets", args.dataset, "--image-size", str(args.image_size), "--images-seen",
               str(args.images_seen), "--photo-crops", str(args.photo_crops), "--recipes", "--reconstruction-only",
               "--seeds", *map(str, args.seeds), "--baseline", row_name(args.batch_sizes[0]), "--json", str(json_path)]
    if args.valid_images is not None:
        command += ["--valid-images", str(args.valid_images)]
    for name, overrides in batch_variants(args.batch_sizes, args.rule).items():
        command += ["--variant", name, "default", *overrides]
    quality.main(command)
    document = json.loads(json_path.read_text(encoding="utf-8"))
    document["batch_size"] = {"rule": args.rule, **batch_choice(document)}
    print()
    print(choice_table(document["batch_size"]))
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
