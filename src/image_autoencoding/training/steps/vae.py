"""The VAE's step (model.mode=vae): one backward pass of sum(recon) + alpha * sum(kl) gives the
encoder and the decoder each the gradient of its own objective (models/vae.training_objective)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from image_autoencoding.config import TrainConfig
from image_autoencoding.models.vae import VAE, kl_for_objective, loss_terms, training_objective
from image_autoencoding.training.distributed import Distributed, summed_over_ranks
from image_autoencoding.training.optimizers import make_optimizer
from image_autoencoding.training.steps.base import TrainingStep, not_finite
from image_autoencoding.training.steps.noise import share_of_global_noise


class VAEObjective(nn.Module):
    """x, alpha -> (objective, sum of recon, sum of kl) over this rank's images: the VAE and its loss
    as one module, the thing DistributedDataParallel wraps. DDP synchronises gradients through hooks
    that its forward sets up; a loss computed from a second call into the unwrapped model would
    silently train each rank on its own gradients.

    `rank` and `world_size` place this rank's images inside the global batch (steps/noise.py).
    Under torchrun the objective is multiplied by the number of ranks: it is a sum over the global
    batch, and DDP averages the ranks' gradients, so W x (average of per-rank sums) = the gradient
    of the global sum, as one process with the global batch computes it."""

    def __init__(self, vae: VAE, autocast: Callable[[], AbstractContextManager], rank: int = 0,
                 world_size: int = 1, free_bits: float = 0.0):
        super().__init__()
        self.vae, self.autocast = vae, autocast
        self.rank, self.world_size, self.free_bits = rank, world_size, free_bits

    def forward(self, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`alpha`: this step's KL weight (TrainConfig.kl_weight, warm-up included); a tensor, so
        torch.compile does not recompile for every new value."""
        noise = share_of_global_noise((x.shape[0], self.vae.latent_size), x.device, self.rank, self.world_size)
        with self.autocast():
            x_hat, posterior = self.vae(x, noise)
        # The loss in fp32 outside autocast: loss_terms casts its inputs itself.
        recon, kl = loss_terms(x, x_hat, posterior)
        # Free bits change what the objective sees of the KL; the returned sums keep the true KL.
        objective_kl = kl if self.free_bits <= 0 else kl_for_objective(
            posterior, self.free_bits, summed_over_ranks if self.world_size > 1 else None, self.world_size)
        objective = training_objective(recon, objective_kl, alpha)
        if self.world_size > 1:
            objective = objective * self.world_size
        return objective, recon.sum(), kl.sum()


class VAEStep(TrainingStep):
    def __init__(self, cfg: TrainConfig, model: VAE, device: torch.device, dist: Distributed,
                 autocast: Callable[[], AbstractContextManager], precision: str):
        objective: nn.Module = VAEObjective(model, autocast, dist.rank, dist.world_size, cfg.free_bits)
        # Static shapes: the last partial batch of an epoch gets a graph of its own. By default a
        # second batch size makes torch.compile build a dynamic-shape graph, which every full batch
        # then runs, slower to build and to run (docs/performance.md).
        if cfg.compile:
            objective = torch.compile(objective, dynamic=False)
        if dist.enabled:
            objective = DistributedDataParallel(
                objective, device_ids=[device.index] if device.type == "cuda" else None)
        optimizers = {"encoder": make_optimizer(model.encoder.parameters(), cfg),
                      "decoder": make_optimizer(model.decoder.parameters(), cfg)}
        super().__init__(cfg, model, device, dist, {"model": model}, optimizers, objective,
                         loss_scaling=precision == "fp16")

    def gradients(self, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        loss, recon, kl = self.objective(x, alpha)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            # fp16: overflowing gradients are expected while the loss scale settles; GradScaler skips
            # those steps itself and lowers the scale, so only a non-finite loss counts as bad here.
            bad = ~torch.isfinite(loss.detach())
        else:
            bad = not_finite([loss], [p.grad for p in self.model.parameters() if p.grad is not None])
        return torch.stack([recon, kl]).detach(), bad
