"""A run's ex-post latent sampler (sampling/latent_mixture.py): fitted to one checkpoint's posterior
means of the training images, saved beside it in the run folder as latent_gmm_<checkpoint>.safetensors,
and used only for the weights it was fitted to (their weights_digest, recorded in its info)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from image_autoencoding.data.batches import Normalizer, evaluation_batches
from image_autoencoding.errors import UserError
from image_autoencoding.models.vae import VAE
from image_autoencoding.runs.loading import TrainedModel
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.sampling.latent_mixture import FIT_POINTS, LatentMixture, MixtureFileError, fit_latent_mixture

logger = logging.getLogger("image_autoencoding")
_warned: set[str] = set()  # damaged mixture files already reported by this process


def weights_digest(model: nn.Module) -> str:
    """What identifies a model's weights: BLAKE2b over each state-dict entry's name, dtype, shape and
    bytes (0.12 s for 100 MB of float32 on one core). (epoch, step) does not: two runs, or a run
    trained again in the same folder, share them with other weights. The same weights from a
    checkpoint or an export give the same digest."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(frozen=True)
class MixtureFile:
    """A mixture file and the weights it must have been fitted to, to be read when it is needed (a
    command that never samples from the mixture is not stopped by a damaged file)."""

    path: Path
    weights: str  # weights_digest of the model it is for
    latent_size: int

    @classmethod
    def of(cls, path: Path | None, trained: TrainedModel) -> MixtureFile | None:
        """None where there is no file. Digests the weights as loaded: call before they are moved
        to another dtype."""
        if path is None or not path.is_file():
            return None
        return cls(path, weights_digest(trained.model), trained.model.latent_size)

    def read(self) -> LatentMixture | None:
        """The mixture, or None where it was fitted to other weights or records none (written before
        mixtures recorded their weights: refitted by the next `vae sample --sampler gmm`). A damaged
        file raises MixtureFileError."""
        mixture = LatentMixture.load(self.path, self.latent_size)
        fitted = mixture.info.get("checkpoint")
        return mixture if isinstance(fitted, dict) and fitted.get("weights") == self.weights else None


def _fitted_to(trained: TrainedModel) -> dict:
    return {"epoch": trained.epoch, "step": trained.step, "weights": weights_digest(trained.model)}


@torch.no_grad()
def fit_model_mixture(model: VAE, normalize: Normalizer, images: np.ndarray, device: torch.device, batch_size: int,
                      seed: int = 0) -> LatentMixture:
    """Encode (up to FIT_POINTS of, drawn with `seed`) the training images through the posterior
    mean and fit the mixture to them."""
    chosen = np.arange(len(images))
    if len(images) > FIT_POINTS:
        chosen = np.sort(np.random.default_rng(seed).choice(len(images), FIT_POINTS, replace=False))
    model = model.to(device).eval()
    means = [model.encoder(x).mean.cpu() for x in evaluation_batches(images[chosen], batch_size, device, normalize)]
    mixture = fit_latent_mixture(torch.cat(means) if means else torch.zeros(0, model.latent_size), seed=seed)
    mixture.info.update(training_images=len(images))
    return mixture


def fit_run_mixture(trained: TrainedModel, images: np.ndarray, device: torch.device, batch_size: int,
                    seed: int = 0) -> LatentMixture:
    """A trained model's mixture (fit_model_mixture), recording the weights it was fitted to."""
    fitted_to = _fitted_to(trained)
    normalize = Normalizer(trained.config.data, device)
    mixture = fit_model_mixture(trained.model, normalize, images, device, batch_size, seed)
    mixture.info.update(checkpoint=fitted_to)
    return mixture


def fit_and_save(run_dir: Path, trained: TrainedModel, images: np.ndarray, device: torch.device,
                 batch_size: int, seed: int = 0) -> LatentMixture:
    """The mixture of one of the run's own checkpoints, fitted and saved in the run (a full disk is a
    one-line UserError, and the previous file is left whole)."""
    mixture = fit_run_mixture(trained, images, device, batch_size, seed)
    path = RunPaths(run_dir).mixture(trained.source)
    if path is None:
        raise ValueError(f"{trained.source} is not one of {run_dir}'s checkpoints")
    try:
        mixture.save(path)
    except OSError as exc:
        raise UserError(f"cannot write the latent mixture '{path}': {exc.strerror or exc}") from None
    info = mixture.info
    logger.info("latent sampler: a %d-component Gaussian mixture (lowest BIC of %s) fitted to %d training "
                "latents in %.1f s, %s", info["components"], "/".join(info["bic"]), info["points"],
                info["seconds"], path.name)
    return mixture


def optional_mixture(file: MixtureFile | None) -> LatentMixture | None:
    """For what can do without the mixture (reports, exports): a damaged file is left out with a
    warning, once per file and process, instead of stopping the command."""
    try:
        return file.read() if file is not None else None
    except MixtureFileError as exc:
        if str(file.path) not in _warned:
            _warned.add(str(file.path))
            logger.warning("%s; left out (`vae sample --sampler gmm` fits a new one once it is removed)", exc)
        return None


def load_run_mixture(run_dir: Path, trained: TrainedModel) -> LatentMixture | None:
    """The run's mixture for exactly this checkpoint's weights, or None (none fitted, fitted to
    other weights, e.g. a best.pt that has changed since, a checkpoint from outside the run, or a
    damaged file: see optional_mixture)."""
    return optional_mixture(MixtureFile.of(RunPaths(run_dir).mixture(trained.source), trained))
