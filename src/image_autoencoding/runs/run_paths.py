"""Every name in a run folder, in one place: what training writes, what `vae evaluate`, `sample`,
`reconstruct` and `export` read and add, and how `--checkpoint NAME|PATH` names a checkpoint.

    <run>/config.yaml            the resolved config (runs/run_dir.py)
    <run>/train.log              the run's log (runs/run_log.py)
    <run>/metrics.csv            one row per epoch (runs/metrics_log.py)
    <run>/bad_files.csv          images skipped as unreadable, when any were
    <run>/.lock                  held by the one `vae train` writing the folder (runs/run_lock.py)
    <run>/checkpoints/           last.pt, best.pt, epoch_N.pt; abandoned_<time>/ set aside by a resume
    <run>/tensorboard/           TensorBoard's event files
    <run>/images/{train,valid}/reconstruction_epoch_NNN.png, images/samples/samples_epoch_NNN.png
                                 each epoch's pictures (runs/epoch_pictures.py, shown by the report)
    <run>/images/latent/, images/samples/samples_{prior,gmm}<suffix>.png, images/training_curves.png
                                 an evaluation's pictures (runs/report.py)
    <run>/metrics<suffix>.json, report<suffix>.md, sample_quality<suffix>.json
                                 an evaluation's figures; "" is the run's own (runs/report.py's output_suffix)
    <run>/latent_gmm_<checkpoint>.safetensors   the latent sampler of one of its checkpoints
    <run>/export/, samples/, reconstructions/   where `vae export`, `sample`, `reconstruct` write by default
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_CHOICES = "best, last, epoch_N or a .pt path"  # what --checkpoint accepts, for messages and help
LAST_CHECKPOINT, BEST_CHECKPOINT = "last.pt", "best.pt"  # in checkpoints/ (RunPaths.last, .best)
ABANDONED_PREFIX = "abandoned"  # checkpoints/abandoned_<time>/: what a resume from an older point set aside
_EPOCH_CHECKPOINT = re.compile(r"epoch_(\d+)\.pt")


def names_a_file(checkpoint: str) -> bool:
    """Whether --checkpoint gives a file path (an existing file, or a path with folders) rather
    than a name in the run's checkpoints/ (best, last, epoch_N)."""
    candidate = Path(checkpoint)
    return candidate.is_file() or candidate.is_absolute() or len(candidate.parts) > 1


def epoch_checkpoints(folder: Path) -> list[Path]:
    """epoch_N.pt files in the folder, oldest epoch first."""
    return sorted((p for p in folder.glob("epoch_*.pt") if _EPOCH_CHECKPOINT.fullmatch(p.name)), key=epoch_of)


def epoch_of(path: Path) -> int:
    """N of an epoch_N.pt file (one `epoch_checkpoints` lists)."""
    return int(_EPOCH_CHECKPOINT.fullmatch(path.name).group(1))


@dataclass(frozen=True)
class RunPaths:
    """The files and folders of the run folder `root`; nothing is created or read here."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def holding(cls, checkpoint: str | Path) -> RunPaths:
        """The run a checkpoint file would belong to (RUN for RUN/checkpoints/X.pt)."""
        return cls(Path(checkpoint).parent.parent)

    # -- what training writes ------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def bad_files(self) -> Path:
        return self.root / "bad_files.csv"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST_CHECKPOINT

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch}.pt"

    def checkpoint(self, name: str | None = None) -> Path:
        """The file `--checkpoint NAME|PATH` names: None is last.pt; a path (names_a_file) is itself;
        best, last, epoch_N (with or without .pt) are in checkpoints/. Nothing is checked or
        substituted here: see runs/loading.resolve_checkpoint for the commands that read a run."""
        if name is None:
            return self.last
        if names_a_file(name):
            return Path(name)
        return self.checkpoints / (name if name.endswith(".pt") else f"{name}.pt")

    @property
    def images(self) -> Path:
        return self.root / "images"

    def reconstruction_picture(self, split: str, epoch: int) -> Path:
        """Inputs above reconstructions of the split's fixed images after an epoch."""
        return self.images / split / f"reconstruction_epoch_{epoch:03d}.png"

    def samples_picture(self, epoch: int) -> Path:
        """The decoded fixed latent vectors after an epoch."""
        return self.images / "samples" / f"samples_epoch_{epoch:03d}.png"

    # -- what an evaluation writes (suffix: runs/report.py's output_suffix, "" for the run's own) -------

    def latent_picture(self, name: str, suffix: str = "") -> Path:
        return self.images / "latent" / f"{name}{suffix}.png"

    def sampler_picture(self, sampler: str, suffix: str = "") -> Path:
        """Samples of one latent sampler (prior, gmm), seed 0."""
        return self.images / "samples" / f"samples_{sampler}{suffix}.png"

    @property
    def training_curves(self) -> Path:
        return self.images / "training_curves.png"

    def metrics_json(self, suffix: str = "") -> Path:
        return self.root / f"metrics{suffix}.json"

    def report(self, suffix: str = "") -> Path:
        return self.root / f"report{suffix}.md"

    def sample_quality(self, suffix: str = "") -> Path:
        return self.root / f"sample_quality{suffix}.json"

    def mixture(self, checkpoint: Path) -> Path | None:
        """Where the run keeps the latent mixture of one of its own checkpoints; None for a checkpoint
        from outside its checkpoints/, whose mixture is not saved in the run: named after the
        checkpoint's file it would take the place of the run's own (RUN/latent_gmm_best.safetensors
        for OTHER/checkpoints/best.pt), and a name made unique by the digest would fill the run with
        files for other runs' weights that nothing lists or removes."""
        if Path(checkpoint).resolve().parent != self.checkpoints.resolve():
            return None
        return self.root / f"latent_gmm_{Path(checkpoint).stem}.safetensors"

    # -- where the reading commands write by default ---------------------------------------------------

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def samples(self) -> Path:
        """`vae sample`'s folders (one per sampler, seed and temperature)."""
        return self.root / "samples"

    @property
    def reconstructions(self) -> Path:
        return self.root / "reconstructions"
