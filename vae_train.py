#!/usr/bin/env python3
"""The original project's entry point, kept so its command lines still work:

    python3 vae_train.py -o ~/work -l ~/work/logs [-b 64 -lr 0.001 -e 100 --dataset digits ...]

Data is read from `<-o>/datasets/`, results go to `<-o>/results/vae/vae_<YYYYmmdd-HHMMSS>/` and a
copy of the log to `<-l>/`. Every flag becomes a `vae train` config override; run
`vae train --help` for the full configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_REEXEC = "IMAGE_AUTOENCODING_REEXEC"


def _ensure_importable() -> None:
    """Let `python3 vae_train.py` work from a checkout: use src/ directly, and re-run under the
    project's .venv when this interpreter has no torch."""
    try:
        import torch  # noqa: F401
    except ImportError:
        venv = HERE / ".venv"
        venv_python = venv / "bin" / "python"
        # A venv's python is a symlink to the base interpreter, so comparing resolved executables
        # cannot tell them apart: sys.prefix is what says which environment is running. The
        # environment variable stops a loop should the venv itself lack torch.
        in_venv = Path(sys.prefix).resolve() == venv.resolve()
        if venv_python.exists() and not in_venv and not os.environ.get(_REEXEC):
            os.environ[_REEXEC] = "1"
            os.execv(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])
        sys.exit("vae_train.py: error: PyTorch is not installed; run `make demo` or `pip install -e .` first")
    if (HERE / "src" / "image_autoencoding").is_dir():
        sys.path.insert(0, str(HERE / "src"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", "-o", required=True, help="user path: datasets/ and results/ live here")
    p.add_argument("--logs", "-l", required=True, help="folder for a copy of the training log")
    p.add_argument("--config", "-c", help="YAML config applied before the flags below")
    p.add_argument("--batch_size", "-b", type=int, help="batch size")
    p.add_argument("--learning_rate", "-lr", type=float, help="learning rate")
    p.add_argument("--epochs", "-e", type=int, help="number of epochs")
    p.add_argument("--image_crop", "-im_crop", type=int, help="centre crop side before resizing")
    p.add_argument("--image_size", "-im_size", type=int, help="side the images are resized to")
    p.add_argument("--device", "-d", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num_workers", "-nw", type=int, help="processes that decode images into the cache")
    p.add_argument("--dataset", help="dataset name, as data.dataset in the config")
    p.add_argument("--latent_dim", "-lat_dim", type=int, help="dimension of the latent space")
    p.add_argument("--weight_decay", "--wd", type=float, help="weight decay of both optimizers")
    p.add_argument("--decay_lr", type=float, help="learning rate multiplier applied after every epoch")
    p.add_argument("--pretrained_net", "-pretrain", help="run folder name under <-o>/results/vae/ to continue")
    p.add_argument("--load_epoch", "-load_epoch", type=int, help="with -pretrain: continue from epoch_N.pt")
    p.add_argument(
        "--mode", choices=["vae", "beta-vae"],
        help="vae: KL weight alpha = 1; beta-vae: alpha = --beta (default 1/batch_size)",
    )
    p.add_argument("--beta", help="KL weight alpha: a number, or 1/batch_size")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="further config overrides")
    return p


FLAG_TO_KEY = {
    "batch_size": "train.batch_size",
    "learning_rate": "train.lr",
    "epochs": "train.epochs",
    "image_crop": "data.image_crop",
    "image_size": "data.image_size",
    "device": "train.device",
    "num_workers": "data.num_workers",
    "dataset": "data.dataset",
    "latent_dim": "model.latent_dim",
    "weight_decay": "train.weight_decay",
    "decay_lr": "train.decay_lr",
}


def to_vae_argv(args: argparse.Namespace) -> list[str]:
    """Translate the original flags into a `vae train` command line."""
    user = Path(args.output).expanduser()
    overrides = [f"train.output_dir={user}", f"train.log_dir={Path(args.logs).expanduser()}"]
    for flag, key in FLAG_TO_KEY.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.mode == "vae":
        overrides.append("train.alpha=1.0")
    elif args.mode == "beta-vae" or args.beta is not None:
        overrides.append(f"train.alpha={args.beta or '1/batch_size'}")

    if args.decay_lr is not None:  # the flag is the per-epoch multiplier of the original's schedule
        overrides.append("train.lr_schedule=exponential")

    if args.pretrained_net:
        # Continue the named run in place; its data and model settings come from its checkpoint.
        # Without -load_epoch, --resume picks last.pt (or the newest readable epoch_N.pt). Every
        # flag goes through: --resume accepts a data or model value equal to the run's and refuses
        # a different one naming it (dropping it would train at settings the user did not ask for),
        # as it refuses --config.
        checkpoint = ["--checkpoint", f"epoch_{args.load_epoch}.pt"] if args.load_epoch is not None else []
        run_dir = user / "results" / "vae" / args.pretrained_net
        config = ["--config", args.config] if args.config else []
        return ["train", "--resume", str(run_dir), *config, *checkpoint, *overrides, *args.overrides]
    if args.load_epoch is not None:
        raise SystemExit("vae_train.py: error: -load_epoch needs -pretrain RUN_NAME")
    # The original kept its datasets under <user path>/datasets/.
    overrides.insert(0, f"data.data_root={user / 'datasets'}")
    if not args.config:
        # The original's schedule, as its flags mean it: x decay_lr after every epoch, no warm-up
        # (the defaults are cosine with a warm-up).
        overrides[1:1] = ["train.lr_schedule=exponential", "train.warmup_steps=0"]
    config = ["--config", args.config] if args.config else []
    return ["train", *config, *overrides, *args.overrides]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _ensure_importable()
    from image_autoencoding.cli import main as vae_main

    return vae_main(to_vae_argv(args))


if __name__ == "__main__":
    sys.exit(main())
