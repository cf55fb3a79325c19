"""The VAE and its training loss as one module: the thing DistributedDataParallel wraps.

DDP synchronises gradients through hooks that its forward sets up; a loss computed from a second
call into the unwrapped model would silently train each rank on its own gradients. Putting the whole
objective inside this module's forward rules that out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from image_autoencoding.models.vae import VAE, kl_for_objective, loss_terms, training_objective
from image_autoencoding.training.distributed import summed_over_ranks


class VAEObjective(nn.Module):
    """x -> (objective, sum of recon, sum of kl) over this rank's images.

    `rank` and `world_size` place this rank's images inside the global batch: the reparametrisation
    noise is drawn for the whole global batch (the same draw on every rank, since every rank's
    generator starts from the run seed) and each rank takes its rows. A W-process run therefore
    samples exactly the noise a one-process run with the global batch samples, and all ranks' RNG
    states stay equal, so rank 0's checkpoint holds the RNG state of every rank.

    `scale` multiplies the objective by the number of ranks: the objective is a sum over the global
    batch, and DDP averages the ranks' gradients, so W x (average of per-rank sums) = the gradient of
    the global sum, as one process with the global batch computes it."""

    def __init__(
        self,
        vae: VAE,
        autocast: Callable[[], AbstractContextManager],
        rank: int = 0,
        world_size: int = 1,
        free_bits: float = 0.0,
    ):
        super().__init__()
        self.vae = vae
        self.autocast = autocast
        self.rank = rank
        self.world_size = world_size
        self.free_bits = free_bits

    def forward(self, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`alpha`: this step's KL weight (TrainConfig.kl_weight, warm-up included); a tensor, so
        torch.compile does not recompile for every new value."""
        with self.autocast():
            posterior = self.vae.encoder(x)
            z = posterior.mean + posterior.std * share_of_global_noise(posterior.mean, self.rank, self.world_size)
            x_hat = self.vae.decoder(z)
        # The loss in fp32 outside autocast, as before: loss_terms casts its inputs itself.
        recon, kl = loss_terms(x, x_hat, posterior)
        # Free bits change what the objective sees of the KL; the returned sums keep the true KL.
        objective_kl = kl if self.free_bits <= 0 else kl_for_objective(
            posterior, self.free_bits, summed_over_ranks if self.world_size > 1 else None, self.world_size)
        objective = training_objective(recon, objective_kl, alpha)
        if self.world_size > 1:
            objective = objective * self.world_size
        return objective, recon.sum(), kl.sum()


def share_of_global_noise(like: Tensor, rank: int, world_size: int) -> Tensor:
    """Standard normal noise shaped like `like` (this rank's n rows): drawn for the whole global
    batch, n x world_size rows, and this rank's rows taken (every W-th from the r-th, where
    `batches.training_batches` puts this rank's images), so that W processes draw exactly the noise
    one process with the global batch draws, for the same images, and every rank's generator stays
    in step."""
    n = like.shape[0]
    noise = torch.randn((n * world_size, *like.shape[1:]), device=like.device, dtype=like.dtype)
    return noise[rank::world_size]


def not_finite(losses: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """A device flag: some loss or gradient of a step holds NaN or Inf. Checked after the gradients
    exist, so a finite loss with an overflowing gradient is caught too; one fused norm over all
    gradients keeps it to a few kernels."""
    total_norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
    return ~(torch.isfinite(torch.stack([loss.detach() for loss in losses])).all() & torch.isfinite(total_norm))
