"""Writes tests/fixtures_data/legacy_<commit>/: small run folders and an export made by the code of
one commit, kept in the repository so that later code is checked against what that commit wrote
(tests/test_legacy_runs.py): a run folder, checkpoint or export written today must keep resuming and
loading after the formats change.

Run from the repository root, at the commit to record, with no uncommitted change under src/:

    PYTHONPATH=src python tests/fixtures_data/make_legacy_runs.py

It trains tiny networks on the CPU in fp32 on 20 of the bundled digits, written as PNG files into
digits/ (a folder dataset: the whole split is read at the end of every run, and 1,797 images took a
test a minute); config.yaml names digits/ and the cache (cache/, not kept: the tests rebuild it) by
relative paths, so the tests run from a copy of the fixture folder. It writes:

    seed_vae_finished/      the seed architecture, 2 epochs done: last.pt, best.pt, epoch_2.pt
    seed_vae_inside_epoch/  the same, stopped by SIGINT after step 5 (2 of epoch 2's 3 steps): its
                            last.pt is inside epoch 2, best.pt is epoch 1
    resnet_vae_gan_spatial/ model.arch=resnet with a spatial latent, model.mode=vae-gan: the
                            checkpoints hold the discriminator and its optimizer
    digits/                 the training images (16 train, 4 valid by data.valid_fraction)
    export/                 `vae export seed_vae_finished`
    expected/<name>.npz     what ia.load(<name>) gave at build time: latents z, their decode,
                            and the posterior of fixed pixels (see DECODED)
    built_at.json           the commit, its date, torch's version and the command

Pictures, TensorBoard files and the run lock are left out (size); each run folder keeps the rest.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))

import image_autoencoding as ia  # noqa: E402
from helpers.faults import SignalAtStep  # noqa: E402
from image_autoencoding.cli import main  # noqa: E402

# Frozen here on purpose, not taken from tests/conftest.py: the fixture must not change when the
# tests' own tiny settings do.
IMAGES = 20
TINY = [
    "data.dataset=folder",
    "data.data_root=digits",
    "data.cache_dir=cache",
    "data.image_size=16",  # the smallest side SSIM's 11-pixel window accepts
    "data.num_workers=0",
    "model.encoder_channels=[4,8]",
    "model.decoder_channels=[8,4,3]",
    "model.fc_dim=8",
    "model.latent_dim=4",
    "train.batch_size=4",
    "train.max_steps_per_epoch=3",
    "train.grid_images=2",
    "train.sample_images=4",
    "train.tsne_points=0",
    "train.progress=false",
    "train.device=cpu",
    "train.precision=fp32",  # the same numbers on every machine, bf16 or not
]
RESNET_VAE_GAN = [
    "model.arch=resnet",
    "model.resnet_channels=[4,8]",
    "model.latent_channels=2",
    "model.mode=vae-gan",
    "model.discriminator_channels=[4,4,4,8]",
]
LEFT_OUT = (".lock", "images", "tensorboard")
# Loaded with ia.load at build time; the test loads the same paths and compares.
DECODED = {
    "seed_vae_finished": "seed_vae_finished",
    "seed_vae_finished_last": "seed_vae_finished/checkpoints/last.pt",
    "seed_vae_inside_epoch": "seed_vae_inside_epoch",
    "seed_vae_inside_epoch_last": "seed_vae_inside_epoch/checkpoints/last.pt",
    "resnet_vae_gan_spatial": "resnet_vae_gan_spatial",
    "export": "export",
}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def _train(name: str, args: list[str], status: int = 0, callbacks=()) -> Path:
    before = set(Path("results/vae").glob("*")) if Path("results/vae").is_dir() else set()
    got = main(["train", "--quiet", *TINY, *args], callbacks=callbacks)
    if got != status:
        raise SystemExit(f"training {name} ended with status {got}, expected {status}")
    (made,) = set(Path("results/vae").glob("*")) - before
    return made.rename(name)


def _record(path: str) -> dict[str, np.ndarray]:
    vae = ia.load(path, device="cpu")
    z = torch.randn(3, vae.latent_dim, generator=torch.Generator().manual_seed(0))
    pixels = np.random.default_rng(0).integers(0, 256, (3, vae.image_size, vae.image_size, 3), dtype=np.uint8)
    posterior = vae.encode_pixels(pixels)
    return {"z": z.numpy(), "decoded": vae.decode(z, as_tensor=True).numpy(), "pixels": pixels,
            "mean": posterior.mean.numpy(), "logvar": posterior.logvar.numpy()}


def _write_digits(folder: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir()
    for index, digit in enumerate(load_digits().images[:IMAGES]):  # 8 x 8, grey levels 0 to 16
        pixels = np.round(digit * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((16, 16), Image.Resampling.NEAREST).save(folder / f"{index:02d}.png")


def build(out: Path) -> None:
    with tempfile.TemporaryDirectory() as staging:
        os.chdir(staging)
        _write_digits(Path("digits"))
        _train("seed_vae_finished", ["train.epochs=2", "train.checkpoint_every=1", "train.keep_checkpoints=1"])
        # checkpoint_every_steps off: the SIGINT's own checkpoint is the one inside the epoch.
        _train("seed_vae_inside_epoch", ["train.epochs=2", "train.checkpoint_every_steps=null"], status=130,
               callbacks=[SignalAtStep("SIGINT@5")])
        _train("resnet_vae_gan_spatial", [*RESNET_VAE_GAN, "train.epochs=1"])
        if main(["export", "seed_vae_finished", "--out", "export"]) != 0:
            raise SystemExit("vae export failed")
        shutil.rmtree("results")
        shutil.rmtree("cache")
        for run in Path(".").glob("*/checkpoints"):
            for name in LEFT_OUT:
                target = run.parent / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        Path("expected").mkdir()
        for name, path in DECODED.items():
            np.savez(Path("expected") / f"{name}.npz", **_record(path))
        built = {
            "commit": _git("rev-parse", "HEAD"),
            "commit_date": _git("log", "-1", "--format=%cI"),
            "torch": torch.__version__,
            "command": "PYTHONPATH=src python tests/fixtures_data/make_legacy_runs.py",
            "settings": {"tiny": TINY, "resnet_vae_gan_spatial": RESNET_VAE_GAN},
            "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        Path("built_at.json").write_text(json.dumps(built, indent=2) + "\n")
        shutil.copytree(staging, out)


if __name__ == "__main__":
    if _git("status", "--porcelain", "src"):
        raise SystemExit("src/ has uncommitted changes: the fixture must record a commit's code")
    if Path(ia.__file__).resolve().parents[2] != REPO:
        raise SystemExit(f"image_autoencoding is imported from {ia.__file__}, not this checkout: set PYTHONPATH=src")
    out = HERE / f"legacy_{_git('rev-parse', '--short=7', 'HEAD')}"
    if out.exists():
        raise SystemExit(f"{out} exists: delete it first to build it again")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the stopped run sends itself one
    build(out)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {total / 1024:.0f} KiB")
