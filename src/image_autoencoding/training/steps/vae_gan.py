"""The VAE-GAN's losses and gradients (Larsen et al. 2016, "Autoencoding beyond pixels using a
learned similarity metric"), the step of `model.mode=vae-gan`.

Per batch x, with z ~ q(z|x), x~ = Dec(z) and, when train.gan_prior_samples is on, x_p = Dec(z_p),
z_p ~ N(0, I) (Larsen et al. alg. 1):

    encoder:        alpha * KL + recon
    decoder:        recon + adversarial_weight * GAN(x~ [, x_p])   (non-saturating: -log D(fake))
    discriminator:  -log D(x) - log(1 - D(x~)) [- log(1 - D(x_p))]
    recon = feature_weight * 0.5 |Dis_l(x) - Dis_l(x~)|^2 + pixel_weight * 0.5 |x - x~|^2

The prior-sample terms are off by default: with them, the decoder's only signal on prior samples is
the adversarial one, and it learned to map the whole prior to one or a few striped patterns that
fool the discriminator (GAN mode collapse), on Fashion-MNIST and photographs, at 32 and 64 px, with
alpha 0.1 and 1 (benchmarks/results/quality_h200.json). Without them the GAN sharpens
reconstructions only (as the autoencoder of Esser et al. 2021 does), and samples from the prior are
as varied as the VAE's.

Dis_l is the discriminator's last conv block (models/discriminator.py). As in the paper the encoder
gets no GAN gradient and the discriminator no reconstruction gradient. One forward pass builds one
graph; `torch.autograd.grad` takes each network's gradient of its own loss from it (the
discriminator's loss, differentiated only with respect to its own weights, never reaches the
generator), and the three optimizers step only after all gradients exist. Stepping between backward
passes through one graph is what breaks the original VAE-GAN code on modern PyTorch (weights
modified in place that a later backward still needs).

The losses are one module's forward (`VaeGanObjective`), which train.compile compiles as it does
the VAE's. DistributedDataParallel synchronises gradients from `backward()` only, not from
`autograd.grad`, so under torchrun the three networks' gradients are summed over the ranks here,
in one all-reduce (each rank's losses are sums over its images, so the sum of the ranks' gradients
is the gradient of the global batch's loss), and BatchNorm statistics are taken from rank 0 before
each step, as DDP does.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from image_autoencoding.config import Config, TrainConfig
from image_autoencoding.models.discriminator import build_discriminator, feature_error
from image_autoencoding.models.vae import VAE, kl_for_objective, loss_terms
from image_autoencoding.training.distributed import Distributed, summed_over_ranks
from image_autoencoding.training.optimizers import make_optimizer
from image_autoencoding.training.steps.base import TermSums, TrainingStep, not_finite, placed_discriminator
from image_autoencoding.training.steps.noise import share_of_global_noise


class VaeGanObjective(nn.Module):
    """x, alpha -> (encoder loss, decoder loss, discriminator loss, pixel recon sum, kl sum,
    sum of D(x), sum of D(x~)) over this rank's images. Noise is this rank's share of the global
    batch's draw (steps/noise.py), as in the VAE's objective."""

    def __init__(self, vae: VAE, discriminator: nn.Module, cfg: TrainConfig,
                 autocast: Callable[[], AbstractContextManager], rank: int = 0, world_size: int = 1):
        super().__init__()
        self.vae, self.discriminator, self.cfg = vae, discriminator, cfg
        self.autocast, self.rank, self.world_size = autocast, rank, world_size

    def forward(self, x: Tensor, alpha: Tensor) -> tuple[Tensor, ...]:
        n = x.shape[0]
        shape = (n, self.vae.latent_size)
        noise = [share_of_global_noise(shape, x.device, self.rank, self.world_size)]
        if self.cfg.gan_prior_samples:
            noise.append(share_of_global_noise(shape, x.device, self.rank, self.world_size))
        with self.autocast():
            posterior = self.vae.encoder(x)
            # One decoder pass for both kinds of fake (one batch for BatchNorm), one
            # discriminator pass for real and fake images.
            decoded = self.vae.decoder(torch.cat([posterior.sample(noise[0]), *noise[1:]]))
            x_tilde = decoded[:n]
            logits, features = self.discriminator(torch.cat([x, decoded]))
        real_logit, *fake_logits = logits.float().split(n)
        real_features, recon_features = features[:n], features[n:2 * n]
        pixel, kl = loss_terms(x, x_tilde, posterior)
        # Dis_l(x) is the target, not something to move (no reconstruction gradient reaches D).
        feature = feature_error(real_features.detach(), recon_features)
        recon = self.cfg.gan_feature_weight * feature + self.cfg.gan_pixel_weight * pixel
        fakes = torch.cat(fake_logits)
        generator_gan = F.binary_cross_entropy_with_logits(fakes, torch.ones_like(fakes), reduction="sum")
        discriminator_gan = (
            F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit), reduction="sum")
            + F.binary_cross_entropy_with_logits(fakes, torch.zeros_like(fakes), reduction="sum"))
        objective_kl = kl_for_objective(posterior, self.cfg.free_bits,
                                        summed_over_ranks if self.world_size > 1 else None, self.world_size)
        with torch.no_grad():
            judged = torch.sigmoid(real_logit).sum(), torch.sigmoid(fake_logits[0]).sum()
        return (recon.sum() + alpha * objective_kl.sum(),
                recon.sum() + self.cfg.gan_adversarial_weight * generator_gan,
                discriminator_gan, pixel.sum(), kl.sum(), *judged)


class VaeGanStep(TrainingStep):
    """The VAE's encoder and decoder plus the discriminator, its optimizer, and the gradients of all
    three networks for one step."""

    def __init__(self, config: Config, model: VAE, device: torch.device, dist: Distributed,
                 autocast: Callable[[], AbstractContextManager], precision: str):
        cfg = config.train
        self.discriminator = placed_discriminator(build_discriminator(config.model, config.data.image_size), cfg,
                                                  device, dist)
        objective: nn.Module = VaeGanObjective(model, self.discriminator, cfg, autocast, dist.rank, dist.world_size)
        if cfg.compile:
            objective = torch.compile(objective, dynamic=False)  # static shapes: see steps/vae.py
        # The same kind of optimizer for all three (Larsen et al. used RMSprop), the discriminator's
        # at train.discriminator_lr.
        optimizers = {"encoder": make_optimizer(model.encoder.parameters(), cfg),
                      "decoder": make_optimizer(model.decoder.parameters(), cfg),
                      "discriminator": make_optimizer(self.discriminator.parameters(), cfg, cfg.discriminator_lr)}
        # The gradients come from autograd.grad, unscaled: no loss scaling, whatever the precision.
        super().__init__(cfg, model, device, dist, {"model": model, "discriminator": self.discriminator},
                         optimizers, objective, loss_scaling=False)
        self.groups = [list(model.encoder.parameters()), list(model.decoder.parameters()),
                       list(self.discriminator.parameters())]
        # D(x) near 1 and D(x~) near 0 for long means the discriminator has won (benchmarks/quality.py
        # reports them).
        self.terms = TermSums(("d_real", "d_recon", "images"), device)
        self._shared_buffers = [b for module in (model, self.discriminator) for b in module.buffers()]

    def gradients(self, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        if self.dist.enabled:
            self.dist.broadcast_from_rank_0_(self._shared_buffers)
        encoder, decoder, discriminator, pixel, kl, d_real, d_recon = self.objective(x, alpha)
        losses = (encoder, decoder, discriminator)
        grads = [torch.autograd.grad(loss, params, retain_graph=index < 2)
                 for index, (loss, params) in enumerate(zip(losses, self.groups, strict=True))]
        flat = [g for group in grads for g in group]
        if self.dist.enabled:
            self.dist.all_reduce_sum_(flat)
        for params, group_grads in zip(self.groups, grads, strict=True):
            for param, grad in zip(params, group_grads, strict=True):
                param.grad = grad
        bad = not_finite(losses, flat)
        self.terms.add(torch.stack([d_real, d_recon, torch.full((), float(x.shape[0]), device=x.device)]), bad)
        return torch.stack([pixel, kl]).detach(), bad

    def term_means(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean D(x) and D(x~) over the steps summed."""
        images = max(sums["images"], 1)
        return {"d_real": sums["d_real"] / images, "d_recon": sums["d_recon"] / images}
