"""Model quality: the original recipe against the default recipe and VAE-GAN, same images seen.

    python benchmarks/quality.py [--images-seen 20000 | --train-seconds S] [--image-size 64]
                                 [--photo-crops 8000] [--datasets fashion-mnist photos] [--seeds 1 2 3]
                                 [--reconstruction-only] [--valid-images N] [--json out.json] [--pictures DIR]

Recipes (each trains the same architecture from the same seed, at the default precision):
  seed     configs/seed.yaml: the original (RMSprop lr 1e-3, x0.75 per epoch, alpha 1)
  default  the train section of configs/coco.yaml (the shipped default), or the candidate recipe
           given with --default-overrides (e.g. train.optimizer=adam train.decay_lr=0.97)
  vae-gan  the default recipe with model.mode=vae-gan (Larsen et al. 2016)
  --variant NAME RECIPE KEY=VALUE...  one more row: RECIPE with these config overrides (screening)

Datasets:
  fashion-mnist  60,000 train / 10,000 test (Debian dataset-fashion-mnist), resized to --image-size
  photos         COCO-like square crops of natural photographs (/usr/share/backgrounds and
                 scikit-image's photos), resized to --image-size; whole photographs are held out for
                 validation (every fourth one), so no validation crop overlaps a training crop

Each trained model is scored on the whole validation split with evaluate_split (per-image SSIM,
PCC, MSE, PSNR; means), plus sharpness: the mean Laplacian variance of reconstructions and of
samples from the prior, relative to the real validation images (1.0 = as sharp as the data), and the
diversity of the prior samples: their mean pairwise distance relative to the real images' (near 0
when a generator has collapsed to one picture).

--seeds trains every row from each seed and adds each row's mean with a 95% interval and its
difference from --baseline paired by seed (seed_statistics.py); --train-seconds compares rows at the
same training wall time instead of the same images seen. A row trains at its own train.batch_size
(a --variant may set it): --images-seen is rounded up to whole batches of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from machine import describe
from model_cost import parameter_count, step_gflop_per_image
from seed_statistics import SEED_COLUMNS, paired, paired_table, summarize, summary_table

from image_autoencoding.atomic_files import atomic_write
from image_autoencoding.config import Config, load_config, read_yaml
from image_autoencoding.data.batches import evaluation_batches, training_batches
from image_autoencoding.data.image_data import ImageData, Split, load_image_data
from image_autoencoding.evaluation.diversity import relative_diversity
from image_autoencoding.evaluation.evaluate import evaluate_split
from image_autoencoding.evaluation.feature_networks import (
    FeatureNetwork,
    MissingWeights,
    inception_network,
    inception_weights,
)
from image_autoencoding.evaluation.sample_metrics import sample_quality
from image_autoencoding.evaluation.sharpness import relative_sharpness
from image_autoencoding.runs.evaluation_pictures import decoded_images, sample_latents
from image_autoencoding.runs.latent_sampler import fit_model_mixture
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.trainer import Trainer
from image_autoencoding.visualization.grids import save_reconstruction_grid, save_sample_grid

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPES = ("seed", "default", "vae-gan")
SAMPLES = 1000  # images of a set whose mean pairwise distance is its diversity
SAMPLE_SET = 10_000  # images per set (at most the validation split's) for sharpness, FID, KID, precision, recall


def recipe_overrides(
    recipe: str, warmup_fraction: float, steps: int, default_overrides: list[str] | None = None
) -> tuple[str | None, list[str]]:
    """(config file, overrides) of a recipe, before the dataset's overrides."""
    if recipe == "seed":
        return str(REPO / "configs/seed.yaml"), []
    train = read_yaml(REPO / "configs/coco.yaml").get("train", {})
    if default_overrides is not None:
        train = {key.removeprefix("train."): value for key, _, value in (o.partition("=") for o in default_overrides)}
    keep = ("optimizer", "lr", "lr_schedule", "decay_lr", "warmup_steps", "weight_decay", "alpha", "kl_warmup_steps",
            "free_bits", "batch_size")
    overrides = [f"train.{key}={train[key]}" for key in keep if key in train]
    if warmup_fraction >= 0 and train.get("kl_warmup_steps"):
        # The shipped warm-up is sized for full runs; a reduced run ramps over the same share of it.
        overrides.append(f"train.kl_warmup_steps={max(1, round(warmup_fraction * steps))}")
    if recipe == "vae-gan":
        overrides.append("model.mode=vae-gan")
    return None, overrides


# -- data ---------------------------------------------------------------------------------------------


def photo_crops(count: int, image_size: int, seed: int, valid: bool) -> np.ndarray:
    """Square crops (side between a quarter and all of the photo's short side, like a COCO image
    centre-cropped and shrunk to 64 px), resized to image_size; every fourth photograph is held out."""
    from photo_sets import source_photographs
    from PIL import Image

    photos = [p for i, p in enumerate(source_photographs()) if (i % 4 == 3) == valid]
    rng = np.random.default_rng(seed)
    crops = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    for k in range(count):
        photo = photos[rng.integers(len(photos))]
        short = min(photo.width, photo.height)
        side = int(rng.integers(short // 4, short + 1))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        box = (left, top, left + side, top + side)
        crop = photo.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
        crops[k] = np.asarray(crop)
    return crops


def dataset(name: str, args, work: Path) -> tuple[ImageData, list[str]]:
    common = [f"data.image_size={args.image_size}", f"data.cache_dir={work / 'cache'}"]
    if name == "fashion-mnist":
        config = load_config(None, ["data.dataset=fashion-mnist", *common])
        data, overrides = load_image_data(config.data, progress=False), ["data.dataset=fashion-mnist", *common]
    else:
        train = photo_crops(args.photo_crops, args.image_size, 1, valid=False)
        valid = photo_crops(args.photo_crops // 4, args.image_size, 2, valid=True)
        no_labels = lambda a: np.full(len(a), -1, dtype=np.int64)  # noqa: E731
        data, overrides = ImageData(Split(train, no_labels(train)), Split(valid, no_labels(valid)), []), common
    if args.valid_images is not None:
        n = args.valid_images
        data = dataclasses.replace(data, valid=dataclasses.replace(data.valid, images=data.valid.images[:n],
                                                                   labels=data.valid.labels[:n]))
    return data, overrides


# -- one recipe ---------------------------------------------------------------------------------------


BATCH = 64
# The VAE-GAN step's mean D(x) and D(x~) (steps/vae_gan.take_stats, in each epoch's metrics row).
STEP_STATS = ("d_real", "d_recon")
PROBE_STEPS = (3, 10)  # --train-seconds: untimed steps, then timed ones, of a throwaway trainer


def row_config(recipe: str, data_overrides: list[str], args, work: Path, extra: list[str], seed: int,
               steps: int) -> tuple[Config, str | None, list[str]]:
    """A row's config, to take `steps` steps (Trainer.fit(max_steps)); with its config file and overrides."""
    path, overrides = recipe_overrides(recipe, args.warmup_fraction, steps, args.default_overrides)
    overrides += extra  # last, so that a variant may also change the seed, the precision or the batch size
    config = load_config(path, [
        *data_overrides, "train.precision=auto", "train.progress=false", f"train.seed={seed}",
        f"train.output_dir={work}", f"train.batch_size={BATCH}", f"train.epochs={MAX_EPOCHS}",
        # fit validates after every epoch: on the whole split for --curve, else on a few images
        # (the row's scores are `score`'s, on the whole split).
        f"train.eval_images={'null' if args.curve else EPOCH_VALID_IMAGES}", *overrides,
    ])
    return config, path, overrides


def make_trainer(recipe: str, data: ImageData, data_overrides: list[str], args, work: Path, extra: list[str],
                 seed: int, steps: int, callbacks: Sequence[Callback] = ()) -> tuple[Trainer, str | None, list[str]]:
    """A row's trainer, to take `steps` steps; with its config file and overrides."""
    config, path, overrides = row_config(recipe, data_overrides, args, work, extra, seed, steps)
    return Trainer(config, data, callbacks=callbacks), path, overrides


MAX_EPOCHS = 10**6  # rows end at their planned steps (Trainer.plan), never at train.epochs
EPOCH_VALID_IMAGES = 512


def steps_in(seconds: float, recipe: str, data: ImageData, data_overrides: list[str], args, work: Path,
             extra: list[str], seed: int) -> int:
    """The steps of this row that take `seconds` of training on this machine: a throwaway trainer of
    the same config times PROBE_STEPS[1] steps after PROBE_STEPS[0] untimed ones. Rows compared at
    the same wall time then differ in the images they saw, as a user with that much time would."""
    warm, timed = PROBE_STEPS
    probe, _, _ = make_trainer(recipe, data, data_overrides, args, work, extra, seed, warm + timed)
    probe.train_epoch(1, max_steps=warm)
    start = time.perf_counter()
    probe.train_epoch(2, max_steps=timed)
    return max(1, int(seconds / ((time.perf_counter() - start) / timed)))


class EpochRows(Callback):
    """Each epoch's metrics (the trainer's metrics.csv row): training seconds, validation values."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_epoch_end(self, trainer, epoch: int, values: dict) -> None:
        self.rows.append(dict(values))

    @property
    def train_seconds(self) -> float:
        return sum(row["seconds"] for row in self.rows)

    def run_means(self, keys: tuple[str, ...]) -> dict[str, float]:
        """The whole run's means of the per-image statistics each epoch's row holds (the training
        step's, which the trainer takes each epoch), each epoch weighted by its images."""
        rows = [row for row in self.rows if all(key in row for key in keys)]
        images = [row["images_per_s"] * row["seconds"] for row in rows]
        return {key: sum(row[key] * n for row, n in zip(rows, images, strict=True)) / sum(images)
                for key in keys} if rows and sum(images) else {}


class WallTimeBudget(Callback):
    """--train-seconds: the probe's few steps misjudged the pace by up to 40% on a 2-core CPU (rows
    meant to train 120 s took 95-163 s), so at each epoch's end the rest of the run is re-planned
    from its own pace so far (training seconds, validation excluded); the cosine horizon moves with
    it, by a few steps once the first epoch is timed."""

    def __init__(self, seconds: float, epochs: EpochRows):
        self.seconds, self.epochs = seconds, epochs

    def on_epoch_end(self, trainer, epoch: int, values: dict) -> None:
        done, elapsed = trainer.step, self.epochs.train_seconds
        trainer.plan(max(done, done + int((self.seconds - elapsed) * done / elapsed)))


def train_recipe(
    recipe: str, data: ImageData, data_overrides: list[str], args, work: Path, extra: list[str] = (), seed: int = 1
) -> tuple[Trainer, dict]:
    batch = row_config(recipe, data_overrides, args, work, list(extra), seed, 1)[0].train.batch_size
    if args.train_seconds is not None:
        steps = steps_in(args.train_seconds, recipe, data, data_overrides, args, work, extra, seed)
    else:
        steps = math.ceil(args.images_seen / batch)
    epochs = EpochRows()
    budget = [WallTimeBudget(args.train_seconds, epochs)] if args.train_seconds is not None else []
    trainer, path, overrides = make_trainer(recipe, data, data_overrides, args, work, extra, seed, steps,
                                            [epochs, *budget])
    trainer.fit(max_steps=steps)
    seconds = epochs.train_seconds
    info = {"config": path or "configs/coco.yaml (train section)", "overrides": overrides, "batch_size": batch,
            "steps": trainer.step, "images_seen": trainer.step * batch, "epochs": trainer.epoch,
            "train_seconds": round(seconds, 1), "train_img_s": round(trainer.step * batch / seconds, 1),
            "final_lr": trainer.training_step.learning_rate,
            **epochs.run_means(STEP_STATS)}
    if args.curve:
        info["valid_by_epoch"] = [{key.removeprefix("valid_"): round(v, 5) for key, v in row.items()
                                   if key.startswith("valid_")} for row in epochs.rows]
        info["last_gain_epoch"] = last_gain_epoch([row["valid_ssim"] for row in epochs.rows])
    return trainer, info


def last_gain_epoch(ssim_by_epoch: list[float], min_delta: float = 1e-3) -> int:
    """The last epoch (1-based) whose validation SSIM beat the best before it by at least min_delta:
    where the run stopped improving."""
    best, last = float("-inf"), 1
    for epoch, ssim in enumerate(ssim_by_epoch, start=1):
        if ssim - best >= min_delta:
            last = epoch
        best = max(best, ssim)
    return last


@torch.no_grad()
def score(trainer: Trainer, data: ImageData, picture_prefix: Path | None,
          feature_networks: dict[str, FeatureNetwork] | None) -> dict:
    """Reconstruction metrics on the whole validation split, then (unless `feature_networks` is
    None: --reconstruction-only) three image sets judged against the real validation images: the
    reconstructions, prior samples and latent-mixture samples (as many as there are validation
    images, at most SAMPLE_SET; seed 0): sharpness and diversity always, and FID, KID, precision and
    recall in the features of each of `feature_networks`."""
    evaluation = evaluate_split(trainer.model, data.valid.images, trainer.normalize, trainer.device, 256,
                                trainer.autocast)
    row = {key: float(v) for key, v in evaluation.means().items()}
    if feature_networks is None:
        return row
    model = trainer.model.eval()
    real, recon = [], []
    for x in evaluation_batches(data.valid.images[:SAMPLE_SET], 256, trainer.device, trainer.normalize):
        with trainer.autocast():
            x_hat = model.reconstruct(x)
        real.append(trainer.normalize.to_unit(x).float().cpu())
        recon.append(trainer.normalize.to_unit(x_hat).float().cpu())
    real = torch.cat(real)
    mixture = fit_model_mixture(model, trainer.normalize, data.train.images, trainer.device, 256)
    row["mixture"] = {key: mixture.info[key] for key in ("components", "points", "seconds")}
    latents = sample_latents(model, mixture, len(real))
    sets = {"reconstructions": torch.cat(recon),
            **{name: decoded_images(model, trainer.normalize, latents[key], trainer.device, 256, trainer.autocast)
               for name, key in (("prior", "prior"), ("mixture", "gmm"))}}
    row["sets"] = {name: {"sharpness": relative_sharpness(images, real),
                          "diversity": relative_diversity(images[:SAMPLES], real[:SAMPLES])}
                   for name, images in sets.items()}
    for network_name, network in feature_networks.items():
        for name, scores in sample_quality(network, real, sets).items():
            row["sets"][name].update({f"{network_name}_{key}": value for key, value in scores.items()
                                      if key != "images"})
    if picture_prefix is not None:
        save_reconstruction_grid(real[:16], sets["reconstructions"][:16], f"{picture_prefix}_reconstructions.png")
        save_sample_grid(sets["prior"][:64], f"{picture_prefix}_samples.png")
        save_sample_grid(sets["mixture"][:64], f"{picture_prefix}_samples_gmm.png")
    return row


def cost(trainer: Trainer, data: ImageData) -> dict:
    """Parameters (the VAE's and, for VAE-GAN, the discriminator's) and GFLOP per image of a
    training step; after scoring, since counting takes a step."""
    networks = trainer.training_step.networks.values()
    x = next(training_batches(data.train.images, BATCH, 0, 1, trainer.device, trainer.normalize))
    return {"parameters": sum(parameter_count(n) for n in networks), "step_gflop_per_image":
            step_gflop_per_image(trainer, x)}


# -- the table ----------------------------------------------------------------------------------------

COLUMNS = SEED_COLUMNS
SET_COLUMNS = (("domain_fid", "domain FID", ".2f"), ("domain_kid", "domain KID", ".4f"),
               ("domain_precision", "precision", ".3f"), ("domain_recall", "recall", ".3f"),
               ("inception_fid", "FID", ".2f"), ("inception_kid", "KID", ".4f"),
               ("sharpness", "sharpness", ".3f"), ("diversity", "diversity", ".3f"))


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def table(results: list[dict]) -> str:
    """The reconstruction metrics, one row per trained model."""
    columns = [*COLUMNS, ("parameters", "params", ",d"), ("step_gflop_per_image", "GFLOP/img (step)", ".3f")]
    rows = [[r["dataset"], r["recipe"], str(r.get("seed", "-")), str(r["images_seen"]),
             *(format(r[key], fmt) if key in r else "-" for key, _, fmt in columns)] for r in results]
    return _markdown(["dataset", "recipe", "seed", "images seen", *(name for _, name, _ in columns)], rows)


def sample_keys(results: list[dict]) -> list[str]:
    """The image-set figures the rows hold, as dotted keys (sets.mixture.domain_fid), for the
    statistics over seeds."""
    keys = {f"sets.{name}.{key}" for r in results for name, s in r.get("sets", {}).items() for key in s}
    order = {key: i for i, (key, _, _) in enumerate(SET_COLUMNS)}
    return sorted(keys, key=lambda k: (k.split(".")[1], order.get(k.split(".")[2], len(order))))


def set_table(results: list[dict]) -> str:
    """The image sets of each model (reconstructions, prior samples, mixture samples) against the
    real validation images; the columns no row has (e.g. FID without Inception weights) left out."""
    columns = [c for c in SET_COLUMNS if any(c[0] in s for r in results for s in r.get("sets", {}).values())]
    rows = [[r["dataset"], r["recipe"], name, *(format(s[key], fmt) if key in s else "-" for key, _, fmt in columns)]
            for r in results for name, s in r.get("sets", {}).items()]
    return _markdown(["dataset", "recipe", "images", *(name for _, name, _ in columns)], rows)


def feature_networks(name: str, data: ImageData, inception: FeatureNetwork | None, info: dict
                     ) -> dict[str, FeatureNetwork]:
    """The feature spaces samples are judged in: Inception-v3 where its weights are present, and for
    Fashion-MNIST a classifier trained here on its training split (its test accuracy into `info`)."""
    networks = {"inception": inception} if inception is not None else {}
    if name == "fashion-mnist":
        from domain_classifier import train_domain_classifier

        networks["domain"], info[name] = train_domain_classifier(
            data.train.images, data.train.labels, data.valid.images, data.valid.labels)
        print(f"domain classifier: {info[name]}", flush=True)
    return networks


def write_document(path: Path | None, command: str, classifiers: dict, seeds: list[int], baseline: str,
                   results: list[dict]) -> tuple[list[dict], list[dict]]:
    """The JSON of the rows so far (at `path`, when given): each row, and over the seeds each row's
    mean with its interval and its difference from `baseline` paired by seed. Returns (summary,
    paired)."""
    keys = [key for key, _, _ in SEED_COLUMNS] + sample_keys(results)
    summary, comparisons = summarize(results, keys), paired(results, baseline, keys)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "machine": describe(), "domain_classifiers": classifiers, "seeds": seeds,
                    "summary": summary, "paired": comparisons, "results": results}
        text = json.dumps(document, indent=2) + "\n"
        atomic_write(path, lambda f: f.write(text), binary=False)
    return summary, comparisons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images-seen", type=int, default=20000,
                        help="training images per recipe (rounded up to batches of 64)")
    parser.add_argument("--train-seconds", type=float,
                        help="instead of --images-seen: train each row for about this many seconds on this machine "
                        "(its steps timed beforehand), the fair comparison of networks of different cost")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--photo-crops", type=int, default=8000, help="training crops (a quarter as many validate)")
    parser.add_argument("--datasets", nargs="+", default=["fashion-mnist", "photos"],
                        choices=["fashion-mnist", "photos"])
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES,
                        help="the recipes as they are (none: only the --variant rows)")
    parser.add_argument("--warmup-fraction", type=float, default=0.25,
                        help="KL warm-up of the default recipe as a share of the run (negative: the config's steps)")
    parser.add_argument("--default-overrides", nargs="+", metavar="train.KEY=VALUE",
                        help="train the default recipe with these train settings instead of configs/coco.yaml's")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME RECIPE KEY=VALUE",
                        help="one more row: RECIPE (seed, default, vae-gan) with these config overrides; repeatable")
    parser.add_argument("--seeds", "--seed", nargs="+", type=int, default=[1],
                        help="train every row from each of these seeds; with two or more, the tables add each "
                        "row's mean with a 95%% interval and each row's difference from --baseline paired by seed")
    parser.add_argument("--baseline", help="the row the paired differences are taken from (default: the first)")
    parser.add_argument("--curve", action="store_true",
                        help="score the validation split after every epoch (valid_by_epoch, last_gain_epoch in the "
                        "JSON; not counted in train s)")
    parser.add_argument("--inception-weights", type=Path,
                        help="Inception-v3 weights for FID / KID (default: torch's hub cache; skipped when absent)")
    parser.add_argument("--reconstruction-only", action="store_true",
                        help="score the reconstructions only (SSIM, PCC, MSE, PSNR): no samples, feature networks, "
                        "pictures or step cost")
    parser.add_argument("--valid-images", type=int, help="score on the first N validation images (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--pictures", type=Path, help="folder for reconstruction and sample grids")
    args = parser.parse_args(argv)
    for variant in args.variant:
        if len(variant) < 2 or variant[1] not in RECIPES:
            parser.error(f"--variant {' '.join(variant)}: expected NAME RECIPE KEY=VALUE... with RECIPE one of "
                         f"{', '.join(RECIPES)}")
    runs = [(recipe, recipe, []) for recipe in args.recipes] + [(v[0], v[1], v[2:]) for v in args.variant]
    if not runs:
        parser.error("no rows: name --recipes or add a --variant")
    baseline = args.baseline or runs[0][0]
    if baseline not in [label for label, _, _ in runs]:
        parser.error(f"--baseline {baseline}: expected one of the rows: {', '.join(label for label, _, _ in runs)}")
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in given)
    inception = None
    if not args.reconstruction_only:
        try:
            inception = inception_network(inception_weights(args.inception_weights))
        except MissingWeights as missing:
            print(f"no Inception FID / KID columns: {missing}", flush=True)
    results, classifiers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.datasets:
            data, data_overrides = dataset(name, args, work)
            print(f"{name}: {len(data.train.images)} train / {len(data.valid.images)} valid images", flush=True)
            networks = None if args.reconstruction_only else feature_networks(name, data, inception, classifiers)
            # Seeds outermost: an interrupted run still holds complete pairs.
            for seed in args.seeds:
                for label, recipe, extra in runs:
                    trainer, info = train_recipe(recipe, data, data_overrides, args, work, extra, seed)
                    prefix = None
                    if args.pictures is not None and seed == args.seeds[0] and networks is not None:
                        args.pictures.mkdir(parents=True, exist_ok=True)
                        prefix = args.pictures / f"{name}_{label}"
                    row = {"dataset": name, "recipe": label, "seed": seed, **info,
                           **score(trainer, data, prefix, networks),
                           "valid_images": len(data.valid.images), "train_images": len(data.train.images)}
                    if networks is not None:
                        row.update(cost(trainer, data))
                    results.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
                    # After every row: a run cut short (a shared machine's time ran out) keeps its rows.
                    write_document(args.json, command, classifiers, args.seeds, baseline, results)
    print(f"\n{command}\n")
    print(table(results))
    if any("sets" in row for row in results):
        print()
        print(set_table(results))
    summary, comparisons = write_document(args.json, command, classifiers, args.seeds, baseline, results)
    if len(args.seeds) > 1:
        print(f"\nover seeds {', '.join(map(str, args.seeds))}: mean [95% interval]\n")
        print(summary_table(summary))
        print(f"\npaired by seed, each row minus {baseline}: mean difference [95% interval]\n")
        print(paired_table(comparisons))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
