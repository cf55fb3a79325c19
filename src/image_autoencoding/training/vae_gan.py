"""One VAE-GAN training step (Larsen et al. 2016, "Autoencoding beyond pixels using a learned
similarity metric"), used by `Trainer.train_step` when `model.mode` is `vae-gan`.

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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer

from image_autoencoding.config import Config
from image_autoencoding.models.discriminator import build_discriminator, feature_error
from image_autoencoding.models.vae import VAE, kl_for_objective, loss_terms
from image_autoencoding.training.buffer_snapshot import BufferSnapshot
from image_autoencoding.training.optimizers import make_optimizer


class VaeGanStep:
    """The discriminator, its optimizer, and the step that trains all three networks."""

    def __init__(self, config: Config, model: VAE, device: torch.device):
        self.cfg = config.train
        self.discriminator = build_discriminator(config.model, config.data.image_size).to(device)
        if self.cfg.channels_last:
            self.discriminator = self.discriminator.to(memory_format=torch.channels_last)
        # The same kind of optimizer as the encoder's and decoder's (Larsen et al. used RMSprop for all
        # three), at train.discriminator_lr.
        self.optimizer = make_optimizer(self.discriminator.parameters(), self.cfg, self.cfg.discriminator_lr)
        # Running means over the steps since the last reset, for logs and the collapse check:
        # D(x) near 1 and D(fake) near 0 for long means the discriminator has won.
        self.stats = torch.zeros(3, device=device)  # sum of D(x), sum of D(x~), images
        self._buffers = BufferSnapshot(model, self.discriminator)

    # -- checkpoints -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"discriminator": self.discriminator.state_dict(),
                "discriminator_optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["discriminator_optimizer"])

    # -- the step --------------------------------------------------------------------------------

    def losses(self, model: VAE, x: Tensor, alpha: float, autocast) -> dict[str, Tensor]:
        n = x.shape[0]
        with autocast():
            posterior = model.encoder(x)
            latents = [posterior.sample()]
            if self.cfg.gan_prior_samples:
                latents.append(torch.randn(n, model.cfg.latent_dim, device=x.device))
            # One decoder pass for both kinds of fake (one batch for BatchNorm), one
            # discriminator pass for real and fake images.
            decoded = model.decoder(torch.cat(latents))
            x_tilde = decoded[:n]
            logits, features = self.discriminator(torch.cat([x, decoded]))
        real_logit, *fake_logits = logits.float().split(n)
        recon_logit = fake_logits[0]
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
        with torch.no_grad():
            self.stats += torch.stack([torch.sigmoid(real_logit).sum(), torch.sigmoid(recon_logit).sum(),
                                       torch.full((), float(n), device=x.device)])
        return {
            "encoder": recon.sum() + alpha * kl_for_objective(posterior, self.cfg.free_bits).sum(),
            "decoder": recon.sum() + self.cfg.gan_adversarial_weight * generator_gan,
            "discriminator": discriminator_gan,
            "pixel": pixel, "kl": kl,
        }

    def train_step(self, model: VAE, x: Tensor, alpha: float, autocast, optimizers: list[Optimizer]) -> Tensor | None:
        """Returns detached batch sums (pixel recon, kl) like the VAE step, or None when a loss or
        gradient is not finite: then no optimizer steps and every BatchNorm statistic is put back.
        `optimizers`: the encoder's and the decoder's."""
        self._buffers.take()
        loss = self.losses(model, x, alpha, autocast)
        groups = [list(model.encoder.parameters()), list(model.decoder.parameters()),
                  list(self.discriminator.parameters())]
        names = ("encoder", "decoder", "discriminator")
        grads = []
        for index, (name, params) in enumerate(zip(names, groups, strict=True)):
            grads.append(torch.autograd.grad(loss[name], params, retain_graph=index < 2))
        flat = [g for group in grads for g in group]
        total_norm = torch.nn.utils.get_total_norm(flat, error_if_nonfinite=False)
        finite = torch.isfinite(torch.stack([loss[n].detach() for n in names])).all() & torch.isfinite(total_norm)
        if not bool(finite):
            self._buffers.restore()
            return None
        for params, group_grads in zip(groups, grads, strict=True):
            for param, grad in zip(params, group_grads, strict=True):
                param.grad = grad
        for optimizer in (*optimizers, self.optimizer):
            optimizer.step()
        return torch.stack([loss["pixel"].sum(), loss["kl"].sum()]).detach()

    def take_stats(self) -> dict[str, float]:
        """Mean D(x) and D(x~) since the last call (then reset)."""
        real, recon, n = self.stats.tolist()
        self.stats.zero_()
        return {"d_real": real / max(n, 1), "d_recon": recon / max(n, 1)}
