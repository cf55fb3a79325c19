"""The `vae` command line. `main(argv) -> int` so tests call it in-process."""

from __future__ import annotations

import argparse
import sys

from image_autoencoding.config import ConfigError, load_config
from image_autoencoding.errors import UserError
from image_autoencoding.training.interrupts import TrainingInterrupted


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
    from image_autoencoding.data.sources import load_image_data
    from image_autoencoding.training.resume import prepare_resume
    from image_autoencoding.training.run_dir import create_run_dir, ensure_writable
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

    ensure_writable(resume.run_dir if resume else f"{config.train.output_dir}/results/vae")
    data = load_image_data(config.data)  # fails on a missing dataset before any folder is made
    run_dir = resume.run_dir if resume else create_run_dir(config.train.output_dir)
    with run_logging(run_dir, config.train.log_dir, console=not args.quiet) as logger:
        if resume:
            for failure in resume.fallbacks:
                logger.warning("%s; falling back to an older checkpoint", failure)
            logger.info("resuming %s from %s at epoch %d, step %d", run_dir, resume.checkpoint, state["epoch"],
                        state["step"])
            for key, (old, new) in resume.changed.items():
                logger.info("resume changes %s: %r -> %r", key, old, new)
        Trainer(config, run_dir, data, resume=state).fit()
    print(run_dir)
    return 0


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a run's encoder and decoder as safetensors plus a config.json",
        description="Export a checkpoint's weights as encoder.safetensors and decoder.safetensors with "
        "the model config as config.json: loadable with safetensors and json alone, no pickle.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    parser.add_argument("--checkpoint", metavar="NAME|PATH", help="checkpoint to export (default last.pt)")
    parser.add_argument("--out", metavar="DIR", help="folder to write (default RUN_DIR/export)")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from image_autoencoding.export import export_run

    print(export_run(args.run_dir, args.checkpoint, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae",
        description="Train and use variational autoencoders on image datasets.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(subparsers)
    _add_export(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"vae: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"vae: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("vae: interrupted", file=sys.stderr)
        return 130
