"""The `vae` command line. `main(argv) -> int` so tests call it in-process."""

from __future__ import annotations

import argparse
import sys

from image_autoencoding.config import ConfigError, load_config
from image_autoencoding.errors import UserError


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a VAE (or continue a run with --resume)",
        description="Train the VAE. Values come from the defaults, then --config, then overrides "
        "such as train.epochs=20 data.image_size=64.",
    )
    parser.add_argument("--config", "-c", help="YAML file with data / model / train sections")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run folder from its last checkpoint")
    parser.add_argument(
        "--checkpoint", metavar="NAME|PATH", help="with --resume: checkpoint to continue from (default last.pt)"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or console log")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from image_autoencoding.data.image_data import load_image_data
    from image_autoencoding.training.resume import prepare_resume
    from image_autoencoding.training.run_dir import create_run_dir
    from image_autoencoding.training.run_log import run_logging
    from image_autoencoding.training.trainer import Trainer

    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's saved config.yaml; give changes as overrides, not --config")
        resume = prepare_resume(args.resume, args.checkpoint, args.overrides)
        config, state = resume.config, resume.state
    else:
        if args.checkpoint:
            raise ConfigError("--checkpoint needs --resume RUN_DIR")
        config, state, resume = load_config(args.config, args.overrides), None, None
    if args.quiet:
        config.train.progress = False

    # Fails on a missing dataset or too many bad images before any run folder is made.
    data = load_image_data(config.data, progress=config.train.progress)
    run_dir = resume.run_dir if resume else create_run_dir(config.train.output_dir)
    data.write_bad_files(run_dir / "bad_files.csv")
    with run_logging(run_dir, config.train.log_dir, console=not args.quiet) as logger:
        if data.bad_files:
            logger.warning("%d unreadable images skipped: %s", len(data.bad_files), run_dir / "bad_files.csv")
        if resume:
            logger.info("resuming %s at epoch %d", run_dir, state["epoch"])
            for key, (old, new) in resume.changed.items():
                logger.info("resume changes %s: %r -> %r", key, old, new)
        Trainer(config, run_dir, data, resume=state).fit()
    print(run_dir)
    return 0


def _add_prepare(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="decode a dataset once into the cache (vae train does this on first use)",
        description="Decode every image of the configured dataset once (to RGB, centre crop, resize) into "
        "a memory-mapped uint8 cache that training reads without decoding. Reuses a valid cache.",
    )
    parser.add_argument("--config", "-c", help="YAML file with data / model / train sections")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.set_defaults(handler=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from image_autoencoding.data.image_data import load_image_data

    config = load_config(args.config, args.overrides)
    data = load_image_data(config.data, progress=not args.quiet)
    for name, split in (("train", data.train), ("valid", data.valid)):
        where = split.cache_dir or "in memory (bundled dataset, not cached)"
        print(f"{config.data.dataset} {name}: {len(split.labels)} images, {split.images.shape[1]} px -> {where}")
    if data.bad_files:
        print(f"{len(data.bad_files)} files skipped (listed in bad_files.csv in each cache folder); first:")
        for item in data.bad_files[:5]:
            print(f"  {item.path}: {item.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae",
        description="Train and use variational autoencoders on image datasets.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(subparsers)
    _add_prepare(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"vae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vae: interrupted", file=sys.stderr)
        return 130
