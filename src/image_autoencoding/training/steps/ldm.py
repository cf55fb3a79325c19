"""The loss of latent diffusion's autoencoders, the step of `model.mode=ldm` (Rombach et al. 2022,
CompVis latent-diffusion's LPIPSWithDiscriminator; the GAN part from Esser et al. 2021, Taming
Transformers). Per batch x of N images (N: the global batch), x~ = Dec(z), z ~ q(z|x):

    rec     = |x - x~| + perceptual_weight * LPIPS(x, x~)     per pixel (LPIPS, one value per
              image, added to each of its pixels; train.pixel_loss=l2: (x - x~)^2)
    nll     = sum over pixels and images of rec / exp(logvar) + logvar, / N  (logvar: one learned scalar)
    kl      = sum over the latent and images of KL(q || N(0, I)), / N
    encoder and decoder: nll + alpha * kl + d_weight * disc_factor * g,   g = -mean D(x~)
    d_weight = disc_weight * clamp(|grad_L nll| / (|grad_L g| + 1e-4), 0, 1e4), detached
    discriminator: disc_factor * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x~)))   (hinge)

grad_L is the gradient with respect to the decoder's last layer weight (decoder_last_layer): the
adaptive weight scales the adversarial gradient to the reconstruction's size where both act on the
image. D is a PatchGAN (models/patch_discriminator.py), one logit per patch. disc_factor is 0 for
the first train.disc_start steps and 1 after; while it is 0 the discriminator does not even run
(upstream runs it and multiplies by 0), so its weights, optimizer and BatchNorm statistics wait
untouched, and the step costs what the reconstruction part costs. torch.compile builds one graph
for each phase (the phase is a Python bool argument).

logvar is trained by the decoder's optimizer, as upstream's comment says ("train
encoder+decoder+logvar"); upstream's configure_optimizers leaves it out, so there it stays at 0.

Gradients come from torch.autograd.grad, each loss with respect to the networks it trains (as the
VAE-GAN's, steps/vae_gan.py): nll + alpha kl, then g, for the encoder, decoder (and logvar); the
hinge loss for the discriminator. Under torchrun each rank's losses are its images' share of the
global batch's (sums divided by the global N), so the ranks' gradients summed in the step's one
all-reduce are the global batch's, and d_weight, computed after that sum, is the one a single process
with the global batch computes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from image_autoencoding.config import Config, DataConfig, TrainConfig
from image_autoencoding.evaluation.lpips import PerceptualDistance, perceptual_distance, vgg16_weights
from image_autoencoding.models.patch_discriminator import PatchDiscriminator
from image_autoencoding.models.vae import VAE, kl_for_objective, loss_terms
from image_autoencoding.training.distributed import Distributed, summed_over_ranks
from image_autoencoding.training.optimizers import make_optimizer
from image_autoencoding.training.steps.base import TermSums, TrainingStep, not_finite, placed_discriminator
from image_autoencoding.training.steps.noise import share_of_global_noise

VGG_WEIGHTS_KEY = "train.lpips_vgg_weights"
# The step's own terms, summed on the device (steps/base.TermSums).
STATS = ("pixel", "lpips", "nll", "images", "steps", "adversarial_steps", "g_loss", "d_weight", "disc_loss",
         "logits_real", "logits_fake")


def decoder_last_layer(decoder: nn.Module) -> nn.Parameter:
    """The weight of the decoder's output layer: its `last_layer` where the architecture names it,
    else the weight of its last Conv2d (every decoder here ends with one before its tanh)."""
    named = getattr(decoder, "last_layer", None)
    if named is not None:
        return named
    convs = [module for module in decoder.modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise TypeError(f"{type(decoder).__name__} has no Conv2d and no last_layer for the adaptive GAN weight")
    return convs[-1].weight


def lpips_for(cfg: TrainConfig) -> PerceptualDistance | None:
    """The LPIPS network train.perceptual_weight asks for (None at 0); one line (MissingWeights)
    saying where to put the VGG16 file when it is absent."""
    if cfg.perceptual_weight == 0:
        return None
    return perceptual_distance(vgg16_weights(cfg.lpips_vgg_weights, VGG_WEIGHTS_KEY))


def check_lpips_weights(config: Config) -> None:
    """Before a run folder is made: the VGG16 file model.mode=ldm's LPIPS will read is there."""
    if config.model.mode == "ldm" and config.train.perceptual_weight > 0:
        vgg16_weights(config.train.lpips_vgg_weights, VGG_WEIGHTS_KEY)


class LdmLoss(nn.Module):
    """The loss's own state, saved in checkpoints under "ldm_loss": the learned log-variance of the
    reconstruction (one scalar, Rombach et al.'s logvar, initialised at 0). disc_start counts the
    trainer's steps (the checkpoint's "step"); older checkpoints also hold a copy of that count,
    "steps", which loading ignores."""

    def __init__(self):
        super().__init__()
        self.logvar = nn.Parameter(torch.zeros(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "steps", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LdmObjective(nn.Module):
    """x, alpha, adversarial -> (encoder-decoder loss without the GAN term, g, hinge loss, sum of
    recon, sum of kl, statistics) for this rank's images (module docstring). `adversarial`: the
    discriminator's phase (step >= train.disc_start); off, g and the hinge loss are zeros."""

    def __init__(self, vae: VAE, discriminator: nn.Module, lpips: PerceptualDistance | None, loss: LdmLoss,
                 cfg: TrainConfig, data: DataConfig, autocast: Callable[[], AbstractContextManager],
                 device: torch.device, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.vae, self.discriminator, self.lpips, self.loss = vae, discriminator, lpips, loss
        self.cfg, self.autocast, self.rank, self.world_size = cfg, autocast, rank, world_size
        # LPIPS takes images in [-1, 1]: the model's inputs are (pixel - mean) / std, pixel in [0, 1].
        std, mean = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (data.std, data.mean))
        self.lpips_scale, self.lpips_shift = 2 * std, 2 * mean - 1

    def forward(self, x: Tensor, alpha: Tensor, adversarial: bool) -> tuple[Tensor, ...]:
        n, world = x.shape[0], self.world_size
        noise = share_of_global_noise((n, self.vae.latent_size), x.device, self.rank, world)
        with self.autocast():
            x_hat, posterior = self.vae(x, noise)
        x32, x_hat32 = x.float(), x_hat.float()
        error = (x32 - x_hat32).abs() if self.cfg.pixel_loss == "l1" else (x32 - x_hat32).pow(2)
        pixels = error[0].numel()
        pixel = error.flatten(1).sum(dim=1)
        if self.lpips is not None:
            perceptual = self.lpips(x32 * self.lpips_scale + self.lpips_shift,
                                    x_hat32 * self.lpips_scale + self.lpips_shift)
        else:
            perceptual = torch.zeros_like(pixel)
        rec = pixel + self.cfg.perceptual_weight * pixels * perceptual
        logvar = self.loss.logvar
        nll = rec / torch.exp(logvar) + pixels * logvar
        kl = kl_for_objective(posterior, self.cfg.free_bits, summed_over_ranks if world > 1 else None, world)
        reconstruction = (nll.sum() + alpha * kl.sum()) / (n * world)
        recon, true_kl = loss_terms(x, x_hat, posterior)
        zero = torch.zeros((), device=x.device)
        g = hinge = real_mean = fake_mean = zero
        if adversarial:
            with self.autocast():
                fake = self.discriminator(x_hat).float()
                real = self.discriminator(x).float()
            patches = fake.numel() * world
            g = -fake.sum() / patches
            # The hinge loss moves the discriminator only (its gradient is taken with respect to it).
            hinge = 0.5 * (F.relu(1 - real).sum() + F.relu(1 + fake).sum()) / patches
            real_mean, fake_mean = real.detach().mean(), fake.detach().mean()
        stats = torch.stack([pixel.sum(), perceptual.sum(), nll.sum(), g * world, hinge * world, real_mean,
                             fake_mean]).detach()
        return reconstruction, g, hinge, recon.sum(), true_kl.sum(), stats


class LdmStep(TrainingStep):
    """The VAE's encoder and decoder, the loss's logvar, the PatchGAN and its optimizer."""

    def __init__(self, config: Config, model: VAE, device: torch.device, dist: Distributed,
                 autocast: Callable[[], AbstractContextManager], precision: str):
        cfg = config.train
        self.discriminator = placed_discriminator(PatchDiscriminator(config.model, config.data.image_size), cfg,
                                                  device, dist)
        self.loss = LdmLoss().to(device)
        lpips = lpips_for(cfg)
        objective: nn.Module = LdmObjective(model, self.discriminator, lpips.to(device) if lpips else None,
                                            self.loss, cfg, config.data, autocast, device, dist.rank,
                                            dist.world_size)
        if cfg.compile:
            objective = torch.compile(objective, dynamic=False)  # static shapes: see steps/vae.py
        optimizers = {"encoder": make_optimizer(model.encoder.parameters(), cfg),
                      "decoder": make_optimizer([*model.decoder.parameters(), self.loss.logvar], cfg),
                      "discriminator": make_optimizer(self.discriminator.parameters(), cfg, cfg.discriminator_lr)}
        # The gradients come from autograd.grad, unscaled: no loss scaling, whatever the precision.
        super().__init__(cfg, model, device, dist,
                         {"model": model, "discriminator": self.discriminator, "ldm_loss": self.loss},
                         optimizers, objective, loss_scaling=False)
        self.autoencoder = [*model.encoder.parameters(), *model.decoder.parameters()]
        self.generator = [*self.autoencoder, self.loss.logvar]
        self.discriminator_params = list(self.discriminator.parameters())
        last = decoder_last_layer(model.decoder)
        self.last = next(index for index, p in enumerate(self.autoencoder) if p is last)
        self.adversarial = self.phase(0)  # the discriminator's phase of the step under way
        self.terms = TermSums(STATS, device)
        self._shared_buffers = [b for module in (model, self.discriminator) for b in module.buffers()]

    def phase(self, step: int) -> bool:
        """The discriminator's phase: the trainer's steps done (skipped ones included) >= disc_start."""
        self.adversarial = step >= self.cfg.disc_start
        return self.adversarial

    def gradients(self, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        if self.dist.enabled:
            self.dist.broadcast_from_rank_0_(self._shared_buffers)
        adversarial = self.adversarial
        reconstruction, g, hinge, recon, kl, stats = self.objective(x, alpha, adversarial)
        grads = list(torch.autograd.grad(reconstruction, self.generator, retain_graph=adversarial,
                                         materialize_grads=True))
        adversarial_grads: list[Tensor] = []
        discriminator_grads: list[Tensor] = []
        if adversarial:
            adversarial_grads = list(torch.autograd.grad(g, self.autoencoder, retain_graph=True,
                                                         materialize_grads=True))
            discriminator_grads = list(torch.autograd.grad(hinge, self.discriminator_params, materialize_grads=True))
        if self.dist.enabled:
            self.dist.all_reduce_sum_([*grads, *adversarial_grads, *discriminator_grads])
        d_weight = torch.zeros((), device=x.device)
        if adversarial:
            d_weight = self.adaptive_weight(grads[self.last], adversarial_grads[self.last])
            torch._foreach_add_(grads[:len(self.autoencoder)], torch._foreach_mul(adversarial_grads, d_weight))
        for param, grad in zip(self.generator, grads, strict=True):
            param.grad = grad
        for param, grad in zip(self.discriminator_params, discriminator_grads, strict=True) if adversarial else ():
            param.grad = grad  # before disc_start none: its optimizer leaves it as it is
        bad = not_finite([reconstruction, g, hinge], [*grads, *discriminator_grads])
        # Filled on the device (a tensor copied from host memory would wait for the queued work).
        count = torch.stack([torch.full((), float(x.shape[0]), device=x.device), torch.ones((), device=x.device),
                             torch.full((), float(adversarial), device=x.device)])
        self.terms.add(torch.cat([stats[:3], count, stats[3:4], d_weight.view(1), stats[4:]]), bad)
        return torch.stack([recon, kl]).detach(), bad

    def adaptive_weight(self, reconstruction_grad: Tensor, adversarial_grad: Tensor) -> Tensor:
        """Esser et al. 2021 eq. 7: the GAN gradient scaled to the reconstruction's at the decoder's
        last layer, times train.disc_weight."""
        ratio = torch.linalg.vector_norm(reconstruction_grad) / (torch.linalg.vector_norm(adversarial_grad) + 1e-4)
        return ratio.clamp(0.0, 1e4).detach() * self.cfg.disc_weight

    def term_means(self, values: dict[str, float]) -> dict[str, float]:
        """Per image (pixel: the summed train.pixel_loss; lpips; nll) and per step over the steps
        summed; the discriminator's terms over the steps it ran (absent when it did not); logvar
        now; disc_factor: the share of steps with the discriminator on. This process's own images
        under torchrun."""
        images, steps, adversarial = values["images"], values["steps"], values["adversarial_steps"]
        out = {"pixel": values["pixel"] / max(images, 1), "lpips": values["lpips"] / max(images, 1),
               "nll": values["nll"] / max(images, 1), "logvar": float(self.loss.logvar.detach()),
               "disc_factor": adversarial / max(steps, 1)}
        if adversarial:
            out.update({key: values[key] / adversarial
                        for key in ("g_loss", "d_weight", "disc_loss", "logits_real", "logits_fake")})
        return out
