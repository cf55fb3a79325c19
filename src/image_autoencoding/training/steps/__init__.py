"""One training step object per objective (model.mode): each owns its objective module, its
optimizers, the buffers a skipped step restores, its state in a checkpoint and the ranks'
agreement (steps/base.py). The trainer builds one here and holds it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from image_autoencoding.config import Config
from image_autoencoding.models.vae import VAE
from image_autoencoding.training.distributed import Distributed
from image_autoencoding.training.steps.base import StepResult, TrainingStep
from image_autoencoding.training.steps.ldm import LdmStep
from image_autoencoding.training.steps.vae import VAEStep
from image_autoencoding.training.steps.vae_gan import VaeGanStep

__all__ = ["StepResult", "TrainingStep", "build_training_step"]


def build_training_step(config: Config, model: VAE, device: torch.device, dist: Distributed,
                        autocast: Callable[[], AbstractContextManager], precision: str) -> TrainingStep:
    if config.model.mode == "vae-gan":
        return VaeGanStep(config, model, device, dist, autocast, precision)
    if config.model.mode == "ldm":
        return LdmStep(config, model, device, dist, autocast, precision)
    return VAEStep(config.train, model, device, dist, autocast, precision)
