"""The `vae` command line. `main(argv) -> int` so tests call it in-process."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from image_autoencoding.config import ConfigError, load_config
from image_autoencoding.errors import UserError, quoted
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.training.interrupts import TrainingInterrupted, stop_at_once

if TYPE_CHECKING:
    from image_autoencoding.training.callbacks import Callback


def _add_train(subparsers) -> None:
    from image_autoencoding.config_docs import keys_help_text

    parser = subparsers.add_parser(
        "train",
        help="train a VAE (or continue a run with --resume)",
        description="Train the VAE. Values come from the defaults, then --config, then overrides "
        "such as train.epochs=20 data.image_size=64. `vae config` prints the resolved configuration.",
        epilog="configuration keys (section.key=value):\n" + keys_help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", help="YAML file with data / model / train sections")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run folder from its last checkpoint")
    parser.add_argument(
        "--checkpoint", metavar="NAME|PATH", help="with --resume: checkpoint to continue from (default last.pt)"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or console log")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace, callbacks: Sequence[Callback] = ()) -> int:
    from image_autoencoding.models.factory import check_model_sources
    from image_autoencoding.runs import report
    from image_autoencoding.runs.resume import prepare_resume
    from image_autoencoding.runs.run_callbacks import run_folder_callbacks
    from image_autoencoding.runs.run_dir import write_run_config
    from image_autoencoding.runs.run_log import run_logging
    from image_autoencoding.runtime import resolve_device, resolve_precision, use_cuda_graphs
    from image_autoencoding.training.distributed import from_environment, process_group
    from image_autoencoding.training.progress_bar import ProgressBar
    from image_autoencoding.training.steps.ldm import check_lpips_weights
    from image_autoencoding.training.trainer import Trainer

    if args.resume:
        if args.config:
            raise ConfigError("--resume continues with the config saved in the checkpoint; give changes as "
                              "overrides, not --config")
        resume = prepare_resume(args.resume, args.checkpoint, args.overrides, from_environment().world_size)
        config, state = resume.config, resume.state
    else:
        if args.checkpoint:
            raise ConfigError("--checkpoint needs --resume RUN_DIR")
        config, state, resume = load_config(args.config, args.overrides), None, None
        check_model_sources(config.model)
    if args.quiet:
        config.train.progress = False
    check_lpips_weights(config)  # before a run folder is made
    if config.train.cuda_graphs is True:  # refused before a run folder is made, where it cannot work
        device = resolve_device(config.train.device)
        use_cuda_graphs(True, device, resolve_precision(config.train.precision, device), from_environment().world_size)

    with process_group(config.train.device) as dist, ExitStack() as run_folder_held:
        run_dir, data = _run_dir_and_data(config, resume, dist, run_folder_held)
        if not dist.is_main:  # the other ranks train and write nothing
            Trainer(config, data, resume=state, dist=dist, callbacks=callbacks).fit()
            return 0
        with run_logging(run_dir, config.train.log_dir, console=not args.quiet) as logger:
            if data.bad_files:
                logger.warning("%d unreadable images skipped: %s", len(data.bad_files), RunPaths(run_dir).bad_files)
            if resume:
                for failure in resume.fallbacks:
                    logger.warning("%s; falling back to an older checkpoint", failure)
                logger.info("resuming %s from %s at epoch %d, step %d (saved by %d process(es), now %d)", run_dir,
                            resume.checkpoint, state.epoch, state.step, state.world_size,
                            dist.world_size)
                for key, (old, new) in resume.changed.items():
                    logger.info("resume changes %s: %r -> %r", key, old, new)
            logger.info("run folder %s", run_dir)
            bar = [ProgressBar()] if _bars(config.train.progress) else []
            trainer = Trainer(config, data, resume=state, dist=dist,
                              callbacks=[*run_folder_callbacks(run_dir, config, data), *bar, *callbacks])
            write_run_config(config, RunPaths(run_dir).config, {
                "train.device": (config.train.device, str(trainer.device)),
                "train.precision": (config.train.precision, trainer.precision)})
            # The report is part of the run: a signal from the trainer's last check to the report's
            # end stops at once and `--resume` writes the report (a finished run trains nothing).
            # Installed around fit, whose own handlers put these back when it returns: no gap.
            try:
                with stop_at_once("during the final report (training is complete)"):
                    trainer.fit()
                    if trainer.finished:  # one process scores the whole split
                        report.final_report(run_dir, data, str(trainer.device))
            except TrainingInterrupted as exc:
                if not exc.after_callbacks:  # a second signal: stopped at once, nothing written
                    raise
                message = (f"{exc}; last checkpoint {RunPaths(run_dir).last}; "
                           f"continue with: vae train --resume {run_dir}")
                logger.info(message)
                raise TrainingInterrupted(exc.signum, message, after_callbacks=True) from None
            if trainer.finished:
                logger.info("next: vae evaluate %s | vae sample %s -n 64 | vae reconstruct %s IMAGE ...\n"
                            "in Python: import image_autoencoding as ia; vae = ia.load(%r)", run_dir, run_dir, run_dir,
                            str(run_dir))
    print(run_dir)
    return 0


def _bars(wanted: bool) -> bool:
    """Progress bars only on a terminal: their carriage returns would flood a redirected log."""
    return wanted and sys.stderr.isatty()


def _run_dir_and_data(config, resume, dist, run_folder_held: ExitStack):
    """Rank 0 checks the output folder, locks the run folder for the rest of `run_folder_held`
    (runs/run_lock.py; a resumed one before its data is read, so a second writer is refused at
    once), reads (on first use builds) the cache and makes the run folder; then it tells the other
    ranks the folder, or the error that stopped it, and they open the finished cache. One run folder
    whatever the number of processes."""
    from image_autoencoding.data.device_split import residence
    from image_autoencoding.data.image_data import check_split_sizes, load_image_data
    from image_autoencoding.runs.run_dir import create_run_dir, ensure_writable
    from image_autoencoding.runs.run_lock import run_folder_lock

    if not dist.is_main:
        error, run_dir = dist.broadcast_from_main(None)
        if error is not None:
            raise UserError(f"rank 0 stopped: {error}")
        return Path(run_dir), load_image_data(config.data, progress=False)
    try:
        if config.train.log_dir is not None:
            ensure_writable(config.train.log_dir, "train.log_dir")
        ensure_writable(resume.run_dir if resume else f"{config.train.output_dir}/results/vae")
        if resume:
            run_folder_held.enter_context(run_folder_lock(resume.run_dir))
        # Fails on a missing dataset, too many bad images, too few images or a training split that
        # data.on_device=true cannot fit on the GPU, before any run folder is made.
        data = load_image_data(config.data, progress=_bars(config.train.progress))
        check_split_sizes(data, config.data.dataset, config.train.batch_size, dist.world_size)
        residence(data.train.images.nbytes, config.data.on_device, dist.device(config.train.device))
        if resume:
            run_dir = resume.run_dir
        else:
            run_dir = create_run_dir(config.train.output_dir)
            run_folder_held.enter_context(run_folder_lock(run_dir))
        data.write_bad_files(RunPaths(run_dir).bad_files)
    except UserError as exc:
        dist.broadcast_from_main((str(exc), None))
        raise
    dist.broadcast_from_main((None, str(run_dir)))
    return run_dir, data


def _add_prepare(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="decode a dataset once into the cache (vae train does this on first use)",
        description="Decode every image of the configured dataset once (to RGB, centre crop, resize) into "
        "a memory-mapped uint8 cache that training reads without decoding. Reuses a valid cache: by default "
        "one whose files kept their sizes and mtimes.",
    )
    parser.add_argument("--config", "-c", help="YAML file with data / model / train sections")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument(
        "--verify", action="store_true",
        help="also read and hash every file, and decode again those whose content changed even where size "
        "and mtime did not (costs one read of the dataset)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.set_defaults(handler=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from image_autoencoding.data.image_data import load_image_data

    config = load_config(args.config, args.overrides)
    data = load_image_data(config.data, progress=_bars(not args.quiet), verify=args.verify)
    for name, split in (("train", data.train), ("valid", data.valid)):
        where = split.cache_dir or "in memory (bundled dataset, not cached)"
        print(f"{config.data.dataset} {name}: {len(split.labels)} images, {split.images.shape[1]} px -> {where}")
    if data.bad_files:
        print(f"{len(data.bad_files)} files skipped (listed in bad_files.csv in each cache folder); first:")
        for item in data.bad_files[:5]:
            print(f"  {item.path}: {item.reason}")
    if not args.verify:
        return 0
    found = [split.verification for split in (data.train, data.valid) if split.verification is not None]
    if not found:
        print("--verify: nothing to verify (bundled dataset, not cached)")
        return 0
    unhashed = sum(item.unhashed for item in found)
    if unhashed:
        print(f"{unhashed} decoded again: the cache held no content hashes to compare with (now it does)")
    for name in [name for item in found for name in item.changed_files][:5]:
        print(f"  {name}: content changed since it was cached")
    redecoded = sum(item.redecoded for item in found)
    files, seconds = sum(item.hashed for item in found), sum(item.seconds for item in found)
    what = "1 image re-decoded because its" if redecoded == 1 else f"{redecoded} images re-decoded because their"
    print(f"{what} content changed ({files} files hashed in {seconds:.1f} s)")
    return 0


def _add_run_command(subparsers, name: str, handler, help: str, description: str,
                     run_dir_nargs: str | None = None) -> argparse.ArgumentParser:
    """A command that reads a run folder and one of its checkpoints and runs its networks (evaluate,
    sample, reconstruct, encode)."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs=run_dir_nargs)
    parser.add_argument("--checkpoint", default="best", help="best (default), last, epoch_N or a .pt path")
    parser.add_argument("--device", help="auto, cpu, cuda[:N] (default: the run's)")
    parser.set_defaults(handler=handler)
    return parser


def _add_evaluate(subparsers) -> None:
    parser = _add_run_command(
        subparsers, "evaluate", _evaluate,
        help="PCC, SSIM, MSE, PSNR of a run on a whole split; pictures and report.md",
        # argparse %-formats help strings but not descriptions: a literal % here.
        description="Score a run's checkpoint on every image of a split (mean, std, 95% CI), print a table "
        "and write a metrics document, the latent-space pictures and a report into the run folder. "
        "The valid split scored by the best checkpoint, as at the end of training, writes the run's own "
        "metrics.json, report.md and images/latent/*.png; any other split, checkpoint or --limit adds them "
        "to the names (metrics_train_epoch_3_limit_100.json, report_train_epoch_3_limit_100.md, ...) and "
        "leaves the run's own files alone. With --model DIR instead of RUN_DIR: a diffusers AutoencoderKL folder "
        "(a downloaded Stable Diffusion VAE) scored the same way on the data of --config and data.* overrides "
        "(the config's model section is left out), written into --out.",
        run_dir_nargs="?",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="with --model: data.* and train.* overrides")
    parser.add_argument("--model", metavar="DIR",
                        help="score this diffusers AutoencoderKL folder instead of a run (e.g. the VAE a run was "
                        "fine-tuned from, to compare)")
    parser.add_argument("--config", "-c", help="with --model: YAML file whose data and train sections to use")
    parser.add_argument("--out", metavar="DIR",
                        help="with --model: the folder for metrics_<DIR name>.json, report_<DIR name>.md and "
                        "the pictures (_train, _limit_N added to the names as for a run); default: a new folder "
                        "evaluation_<DIR name>_<YYYYmmdd-HHMMSS> in the current directory")
    parser.add_argument("--split", choices=["valid", "train"], default="valid")
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N images")
    parser.add_argument("--fid", action="store_true",
                        help="also FID, KID, precision and recall (Inception-v3 features) of reconstructions, prior "
                        "samples and latent-mixture samples against the split: sample_quality.json")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="Inception-v3 weights file (default: torch's hub cache, where torchvision keeps it)")


def _evaluate(args: argparse.Namespace) -> int:
    from image_autoencoding.api import load
    from image_autoencoding.data.image_data import load_image_data
    from image_autoencoding.runs.report import evaluate_and_write, write_sample_quality
    from image_autoencoding.runs.report_markdown import metrics_table, sample_quality_table
    from image_autoencoding.runs.run_dir import ensure_writable

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: expected a number of images >= 1 (got {args.limit})")
    if args.model is not None:
        return _evaluate_model(args)
    if args.overrides or args.config or args.out:
        raise ConfigError("overrides, --config and --out go with --model DIR; a run is scored with its own config")
    if args.run_dir is None:
        raise ConfigError("vae evaluate: give RUN_DIR, or --model DIR")
    run_dir = _run_folder(args.run_dir)
    requested = _requested_device(args)
    ensure_writable(run_dir, "run folder")  # every evaluation writes its figures there
    network = _inception(args)
    vae = load(run_dir, args.checkpoint, device="cpu")
    device = str(requested or _run_device(vae.config))
    data = load_image_data(vae.config.data, progress=False)  # read once for the metrics and --fid
    quality, written = None, []
    if network is not None:  # first, so that the report shows it
        quality, path = write_sample_quality(run_dir, vae.trained, network, args.split, args.limit, data, device)
        written.append(path)
    document, files = evaluate_and_write(run_dir, vae.trained, args.split, args.limit, data, device, quality)
    print(f"{document['split']} split, {document['images']} images, {Path(document['checkpoint']).name} "
          f"(epoch {document['epoch']})")
    print(metrics_table(document))
    print(f"original first-batch PCC: {document['original_first_batch_pcc']:.4f}")
    if quality is not None:
        print(sample_quality_table(quality["scores"]))
    written = files + written
    print("written:")
    for path in written:
        print(path)
    return 0


def _evaluate_model(args: argparse.Namespace) -> int:
    """vae evaluate --model DIR: a diffusers folder scored as a run's checkpoint is, into --out."""
    from image_autoencoding.data.image_data import load_image_data
    from image_autoencoding.runs.loading import load_from_diffusers
    from image_autoencoding.runs.report import evaluate_and_write, write_sample_quality
    from image_autoencoding.runs.report_markdown import metrics_table, sample_quality_table
    from image_autoencoding.runs.run_dir import create_stamped_dir, ensure_writable

    # The positional RUN_DIR takes the first override when --model is given.
    overrides = [*([args.run_dir] if args.run_dir is not None else []), *args.overrides]
    requested = _requested_device(args)
    model_dir = Path(args.model)
    trained = load_from_diffusers(model_dir, args.config, overrides)
    if args.out is not None:
        out = ensure_writable(args.out)
    else:
        out = create_stamped_dir(ensure_writable(Path.cwd(), "current directory"), f"evaluation_{model_dir.name}")
    network = _inception(args)
    data = load_image_data(trained.config.data, progress=False)
    device = str(requested or _run_device(trained.config))
    quality, written = None, []
    if network is not None:
        quality, path = write_sample_quality(out, trained, network, args.split, args.limit, data, device)
        written.append(path)
    document, files = evaluate_and_write(out, trained, args.split, args.limit, data, device, quality)
    print(f"{document['split']} split, {document['images']} images, {model_dir}")
    print(metrics_table(document))
    if quality is not None:
        print(sample_quality_table(quality["scores"]))
    print("written:")
    for path in files + written:
        print(path)
    return 0


def _inception(args: argparse.Namespace):
    """--fid's feature network, loaded before any work: missing weights are a one-line error, exit 2."""
    if not args.fid:
        return None
    from image_autoencoding.evaluation.feature_networks import inception_network, inception_weights

    return inception_network(inception_weights(args.inception_weights))


# samples_grid.png shows the first this many samples: a grid of all of 100000 would be a picture too
# large to open, and too crowded to look at.
SAMPLE_GRID_IMAGES = 256
# The most images one `vae sample` writes. Every latent is drawn first, in one call (see _sample): a
# million 128-float latents take 512 MB (a spatial latent of 4 x 16 x 16, 4 GB); and a million PNG
# files in one folder is already more than file browsers and shells handle well (FID papers use 50,000).
MAX_SAMPLES = 1_000_000


def _add_sample(subparsers) -> None:
    parser = _add_run_command(
        subparsers, "sample", _sample,
        help="decode random latent vectors into images",
        description="Decode n latent vectors drawn from N(0, T^2 I) with a run's decoder, in batches of the "
        "run's train.batch_size; writes each image as a PNG as soon as it is decoded, and the first "
        f"{SAMPLE_GRID_IMAGES} of them as one grid, samples_grid.png. The same -n, --seed and --temperature give the "
        "same images whatever the batch size.",
    )
    parser.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="scale of the prior's (or each mixture component's) std, > 0 (default 1)")
    parser.add_argument("--sampler", choices=["prior", "gmm"], default="prior",
                        help="prior: N(0, I); gmm: a Gaussian mixture fitted to the training images' latents "
                        "(Ghosh et al. 2020), fitted and saved in the run folder on first use")
    parser.add_argument("--out", help="output folder (default RUN_DIR/samples/[gmm_]seed_S_tT)")


def _sample(args: argparse.Namespace) -> int:
    import math

    import torch
    from tqdm import tqdm

    from image_autoencoding.api import MAX_SEED
    from image_autoencoding.runs.run_dir import ensure_writable
    from image_autoencoding.visualization.grids import save_sample_grid
    from image_autoencoding.visualization.images import save_images

    if not 1 <= args.n <= MAX_SAMPLES:
        raise ConfigError(f"-n: expected a number of images from 1 to {MAX_SAMPLES} (got {args.n})")
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed: expected an integer from 0 to 2**64-1 = {MAX_SEED} (got {args.seed})")
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        raise ConfigError(f"--temperature: expected a finite number > 0 (got {args.temperature})")
    run_dir = _run_folder(args.run_dir)
    requested = _requested_device(args)
    prefix = "gmm_" if args.sampler == "gmm" else ""
    out = Path(args.out) if args.out else RunPaths(run_dir).samples / f"{prefix}seed_{args.seed}_t{args.temperature:g}"
    vae = _load(run_dir, args.checkpoint, requested)
    fit = args.sampler == "gmm" and vae.mixture is None  # a damaged mixture file stops here, nothing made
    ensure_writable(out)  # before any network runs: a read-only run folder or a file named by --out
    if fit:
        vae.mixture = _fit_mixture(run_dir, vae)
    # Every latent is drawn first, in one call: the same seed gives the same images whatever the
    # batch size. n x latent_size floats are small; the decoded images are what must not all be in
    # memory at once.
    z = vae.sample_latents(args.n, args.temperature, args.seed, args.sampler)
    batch_size = vae.config.train.batch_size
    digits = max(4, len(str(args.n - 1)))  # names sort in order however many there are
    grid, grid_size = [], min(args.n, SAMPLE_GRID_IMAGES)
    bar = tqdm(total=args.n, desc="sampling", unit="img", file=sys.stderr, dynamic_ncols=True,
               disable=args.n <= batch_size or not _bars(True))
    with _writing_into(out):
        for start in range(0, args.n, batch_size):
            images = vae.decode(z[start : start + batch_size], as_tensor=True)
            save_images(images, [out / f"sample_{i:0{digits}d}.png" for i in range(start, start + len(images))])
            if start < grid_size:
                grid.append(images[: grid_size - start])
                if start + len(images) >= grid_size:
                    save_sample_grid(torch.cat(grid), out / "samples_grid.png")
                    grid = []
            bar.update(len(images))
    bar.close()
    print(out)
    return 0


def _fit_mixture(run_dir: Path, vae):
    """The latent mixture for these weights, fitted now (to the training split the run's config
    names) and saved beside the run's checkpoints for next time where it can be; where it cannot (a
    checkpoint from outside the run, a read-only run folder, a full disk) it is still sampled from."""
    from image_autoencoding.data.image_data import load_image_data
    from image_autoencoding.runs.latent_sampler import fit_run_mixture

    data = load_image_data(vae.config.data, progress=_bars(True))
    mixture = fit_run_mixture(vae.trained, data.train.images, vae.device, vae.config.train.batch_size,
                              vae.config.train.seed)
    info = mixture.info
    fitted = (f"fitted a {info['components']}-component Gaussian mixture to {info['points']} training latents in "
              f"{info['seconds']} s")
    path = RunPaths(run_dir).mixture(vae.source)
    if path is None:
        print(f"{fitted}; not saved, as {vae.source} is not one of {RunPaths(run_dir).checkpoints}", file=sys.stderr)
        return mixture
    try:
        mixture.save(path)
    except OSError as exc:
        print(f"{fitted}; it could not be saved to {path} ({exc.strerror or exc}), so it is used unsaved",
              file=sys.stderr)
        return mixture
    print(f"{fitted}: {path}", file=sys.stderr)
    return mixture


def _run_folder(path: str) -> Path:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {quoted(run_dir)} not found")
    return run_dir


def _requested_device(args: argparse.Namespace):
    """--device as a device of this machine, checked before any work; None when not given."""
    from image_autoencoding.runtime import resolve_device

    return resolve_device(args.device, "--device") if args.device else None


def _run_device(config):
    """The device the run's config names, for a command given no --device."""
    from image_autoencoding.runtime import resolve_device

    return resolve_device(config.train.device, "train.device in the run's config (choose another with --device)")


def _load(run_dir: Path, checkpoint: str, requested):
    """The run's (or export's) model, api.load, on the `requested` device, or else on the one its
    config names."""
    from image_autoencoding.api import load

    vae = load(run_dir, checkpoint, device="cpu")
    return vae.to(requested or _run_device(vae.config))


@contextlib.contextmanager
def _writing_into(out: Path):
    """A failed write of an output file (a full disk) as the one-line error naming the folder."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write into {quoted(out)}: {exc.strerror or exc}") from None


def _add_reconstruct(subparsers) -> None:
    parser = _add_run_command(
        subparsers, "reconstruct", _reconstruct,
        help="encode and decode your own image files",
        description="Preprocess each image as the run's data (crop, resize), encode it, decode the "
        "posterior mean, and save the input beside its reconstruction as NAME_reconstruction.png. Inputs "
        "with the same name (a/x.png b/x.png) get x_reconstruction.png, x_2_reconstruction.png, ... in the "
        "order given. Images over data.max_image_pixels are refused.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--out", help="output folder (default RUN_DIR/reconstructions)")


def _reconstruct(args: argparse.Namespace) -> int:
    import torch

    from image_autoencoding.runs.run_dir import ensure_writable
    from image_autoencoding.visualization.grids import save_reconstruction_grid

    run_dir = _run_folder(args.run_dir)
    vae = _load(run_dir, args.checkpoint, _requested_device(args))
    out = Path(args.out) if args.out else RunPaths(run_dir).reconstructions
    names = _reconstruction_names(args.images, out)
    pixels = vae.preprocess(args.images)  # every file read (or refused) before anything is written
    ensure_writable(out)  # before encoding and decoding: a read-only run folder or a file named by --out
    inputs = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    # The pixels are preprocessed already: cropping and resizing them again would not be the identity
    # when data.image_crop is smaller than data.image_size.
    outputs = vae.decode(vae.encode_pixels(pixels).mean, as_tensor=True)
    with _writing_into(out):
        for i, path in enumerate(names):
            save_reconstruction_grid(inputs[i : i + 1], outputs[i : i + 1], path, per_row=1,
                                     min_tile=RECONSTRUCTION_TILE)
            print(path)
    return 0


RECONSTRUCTION_SUFFIX = "_reconstruction.png"


def _reconstruction_names(images: list[str], out: Path) -> list[Path]:
    """NAME_reconstruction.png in `out` for each image; NAME_2_... for a name already taken; a stem
    cut (at a character boundary) where the name would exceed the file system's limit on one name
    (NAME_MAX, 255 bytes on most): the suffix takes 19 bytes, so an input whose name is legal but
    whose stem is over 236 bytes would otherwise give a name the file system refuses."""
    limit = _name_max(out)
    taken: set[str] = set()
    names = []
    for name in images:
        stem, copy = Path(name).stem, 1
        while True:
            tail = f"_{copy}" if copy > 1 else ""
            candidate = _cut_to_bytes(stem, limit - len((tail + RECONSTRUCTION_SUFFIX).encode())) + tail
            if candidate.casefold() not in taken:  # casefold: on macOS and Windows X.png and x.png are one file
                break
            copy += 1
        taken.add(candidate.casefold())
        names.append(out / f"{candidate}{RECONSTRUCTION_SUFFIX}")
    return names


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, the file system holding `folder` (or its nearest existing
    parent) accepts."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer: the usual limit
        return 255


def _cut_to_bytes(text: str, size: int) -> str:
    """`text`'s longest prefix of at most `size` bytes in UTF-8 (never half a character)."""
    return text.encode()[: max(size, 1)].decode(errors="ignore")


# `vae reconstruct`'s pictures: each image enlarged (nearest neighbour) to at least this many pixels,
# so a 64 px reconstruction is a picture a person can look at, not a 68 x 134 px file.
RECONSTRUCTION_TILE = 256


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a run's encoder and decoder as safetensors plus a config.json (and ONNX)",
        description="Export a checkpoint's weights as encoder.safetensors and decoder.safetensors with "
        "the model and preprocessing as config.json: loadable with safetensors and json alone, no pickle, "
        "and with image_autoencoding.load(). --onnx adds encoder.onnx (image -> mean, logvar) and "
        "decoder.onnx (z -> image) with a dynamic batch axis, checked against torch in onnxruntime.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    parser.add_argument("--checkpoint", default="best", metavar="NAME|PATH",
                        help="best (default), last, epoch_N or a .pt path")
    parser.add_argument("--out", metavar="DIR", help="folder to write (default RUN_DIR/export)")
    parser.add_argument("--onnx", action="store_true", help="also write encoder.onnx and decoder.onnx")
    parser.add_argument(
        "--diffusers", metavar="DIR",
        help="instead, write a folder diffusers opens with AutoencoderKL.from_pretrained(DIR) (model.arch "
        "autoencoder-kl runs), with scaling_factor and shift_factor measured on posterior samples of up to 4096 "
        "training images so that a diffusion model sees zero-mean, unit-variance latents",
    )
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from image_autoencoding.export import export_run

    if args.diffusers is not None:
        from image_autoencoding.export_diffusers import export_diffusers
        from image_autoencoding.runs.loading import load_from_checkpoint, load_from_run
        from image_autoencoding.runs.run_paths import names_a_file

        if args.out is not None or args.onnx:
            raise ConfigError("--diffusers DIR writes a diffusers folder only: give it without --out and --onnx")
        run_dir = _run_folder(args.run_dir)
        trained = (load_from_checkpoint(args.checkpoint) if names_a_file(args.checkpoint)
                   else load_from_run(run_dir, args.checkpoint))
        print(export_diffusers(trained, args.diffusers))
        return 0
    print(export_run(_run_folder(args.run_dir), args.checkpoint, args.out, onnx=args.onnx))
    return 0


def _add_encode(subparsers) -> None:
    parser = _add_run_command(
        subparsers, "encode", _encode,
        help="latent vectors of a split or of image files, into an .npz file",
        description="Encode images with a run's encoder and save the posterior of each: an .npz with "
        "`mean` and `logvar` (N x latent_size, float32), and `labels` and `class_names` for a split, `files` "
        "for image files. Files go through the run's preprocessing (crop, resize), as in training.",
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files (or --split)")
    parser.add_argument("--split", choices=["valid", "train"], help="encode every image of this split")
    parser.add_argument("-o", "--out", required=True, metavar="FILE.npz",
                        help="the .npz file to write, under exactly this name")


def _encode(args: argparse.Namespace) -> int:
    import numpy as np

    from image_autoencoding.atomic_files import atomic_write_or_explain
    from image_autoencoding.data.image_data import load_image_data
    from image_autoencoding.runs.run_dir import ensure_writable

    if bool(args.images) == bool(args.split):
        raise ConfigError("vae encode: give image files or --split valid|train (one of them)")
    run_dir, requested, out = _run_folder(args.run_dir), _requested_device(args), Path(args.out)
    if out.is_dir():
        raise ConfigError(f"-o {quoted(out)} is a folder; expected the name of the .npz file to write")
    ensure_writable(out.parent)  # before encoding
    vae = _load(run_dir, args.checkpoint, requested)
    if args.split:
        data = load_image_data(vae.config.data, progress=False)
        split = data.valid if args.split == "valid" else data.train
        posterior = vae.encode_pixels(split.images)
        extra = {"labels": np.asarray(split.labels), "class_names": np.array(data.class_names, dtype=str)}
    else:
        posterior = vae.encode(args.images)
        extra = {"files": np.array([str(name) for name in args.images], dtype=str)}
    arrays = {"mean": posterior.mean.cpu().numpy(), "logvar": posterior.logvar.cpu().numpy(), **extra}
    # Written to a handle, so the file has exactly the name given (np.savez adds .npz to a name without it).
    atomic_write_or_explain(out, lambda handle: np.savez(handle, **arrays))
    print(out)
    return 0


def _add_config(subparsers) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print the resolved configuration (defaults, then --config, then overrides) as YAML",
        description="Print the configuration `vae train` would run with the same --config and overrides, "
        "without training. Every key, its default and meaning: docs/configuration.md.",
    )
    parser.add_argument("--config", "-c", help="YAML file with data / model / train sections")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.set_defaults(handler=_config)


def _config(args: argparse.Namespace) -> int:
    import yaml

    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def _version() -> str:
    from image_autoencoding import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae",
        description="Train and use variational autoencoders on image datasets.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(subparsers)
    _add_prepare(subparsers)
    _add_evaluate(subparsers)
    _add_sample(subparsers)
    _add_reconstruct(subparsers)
    _add_export(subparsers)
    _add_encode(subparsers)
    _add_config(subparsers)
    return parser


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """`callbacks`: run by `vae train`'s trainer at the points of its loop (training/callbacks.py);
    for code that drives the command line and wants to observe or act on the training."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args, callbacks) if args.handler is _train else args.handler(args)
    except UserError as exc:
        print(f"vae: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"vae: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("vae: interrupted", file=sys.stderr)
        return 130
