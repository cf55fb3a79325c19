"""The VAE, its posterior and the loss terms, with the original project's encoder and decoder
(model.arch=seed): DCGAN-style convolutions (Larsen et al. 2016, as in the VAE-GAN reference code
the original built on). models/resnet.py holds the other architecture.

Shapes for the defaults (image 64, latent 128):
    encoder: 3x64x64 -> conv5/2 64 -> 128 -> 256 (8x8) -> FC 1024 -> mu, logvar (128 each)
    decoder: z (128) -> FC 8x8x256 -> convT5/2 256 -> 128 -> 32 (64x64) -> conv5 3 -> tanh
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from image_autoencoding.config import DataConfig, ModelConfig


class DiagonalGaussian:
    """q(z|x) = N(mu, diag(exp(logvar))), the posterior as an object (as diffusers does)."""

    def __init__(self, mean: Tensor, logvar: Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0):
        # In fp32 even under autocast: in fp16, mean^2 overflows past 256 and exp(logvar) past 11,
        # which made every fp16 step on the H200 non-finite after the first optimizer steps.
        self.mean = mean.float()
        # Clamped so exp() stays finite; gradients stop outside the range.
        self.logvar = logvar.float().clamp(logvar_min, logvar_max)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, noise: Tensor | torch.Generator | None = None) -> Tensor:
        """The reparametrisation trick (Kingma & Welling 2014): z = mu + sigma * eps, with eps the
        given standard normal `noise` (training draws it for the whole global batch, see
        training/steps/noise.py), or drawn here from `generator`."""
        if not isinstance(noise, Tensor):
            noise = torch.randn(self.mean.shape, generator=noise, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl_per_dim(self) -> Tensor:
        """KL(q || N(0, I)) for each image and latent unit, shape (N, latent_size)."""
        return -0.5 * (1 + self.logvar - self.mean.pow(2) - self.logvar.exp())

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per image, shape (N,)."""
        return self.kl_per_dim().sum(dim=1)


def _conv_block(cfg: ModelConfig, c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, cfg.kernel_size, cfg.stride, cfg.padding, bias=False),
        nn.BatchNorm2d(c_out, momentum=cfg.bn_momentum),
        nn.ReLU(inplace=True),
    )


def _deconv_block(cfg: ModelConfig, c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(
            c_in, c_out, cfg.kernel_size, cfg.stride, cfg.padding, output_padding=cfg.output_padding, bias=False
        ),
        nn.BatchNorm2d(c_out, momentum=cfg.bn_momentum),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        self.cfg = cfg
        widths = [3, *cfg.encoder_channels]
        self.features = nn.Sequential(*(_conv_block(cfg, a, b) for a, b in zip(widths, widths[1:], strict=False)))
        side = cfg.feature_side(image_size)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cfg.encoder_channels[-1] * side * side, cfg.fc_dim, bias=False),
            nn.BatchNorm1d(cfg.fc_dim, momentum=cfg.bn_momentum),
            nn.ReLU(inplace=True),
        )
        self.to_mean = nn.Linear(cfg.fc_dim, cfg.latent_dim)
        self.to_logvar = nn.Linear(cfg.fc_dim, cfg.latent_dim)

    def forward(self, x: Tensor) -> DiagonalGaussian:
        h = self.fc(self.features(x))
        return DiagonalGaussian(self.to_mean(h), self.to_logvar(h), self.cfg.logvar_min, self.cfg.logvar_max)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        *widths, out_channels = cfg.decoder_channels
        self.side = cfg.feature_side(image_size)
        self.first_channels = widths[0]
        self.fc = nn.Sequential(
            nn.Linear(cfg.latent_dim, widths[0] * self.side * self.side, bias=False),
            nn.BatchNorm1d(widths[0] * self.side * self.side, momentum=cfg.bn_momentum),
            nn.ReLU(inplace=True),
        )
        # The original's first transposed block keeps the FC's width (256 -> 256), then narrows.
        ins = [widths[0], *widths[:-1]]
        self.features = nn.Sequential(*(_deconv_block(cfg, a, b) for a, b in zip(ins, widths, strict=True)))
        self.to_image = nn.Sequential(
            nn.Conv2d(widths[-1], out_channels, cfg.kernel_size, 1, (cfg.kernel_size - 1) // 2),
            nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(-1, self.first_channels, self.side, self.side)
        return self.to_image(self.features(h))

    @property
    def last_layer(self) -> Tensor:
        """The weight of the layer that makes the pixels (the adaptive GAN weight's reference)."""
        return self.to_image[0].weight


class VAE(nn.Module):
    """An encoder (image -> DiagonalGaussian over flat latent vectors) and a decoder (latent vectors
    -> images in [-1, 1]); `models/factory.build_model` picks them by model.arch."""

    def __init__(self, cfg: ModelConfig, image_size: int, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        self.latent_size = cfg.latent_size(image_size)  # floats per image, a spatial latent's too
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: Tensor, noise: Tensor | torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """x -> (the decode of a posterior sample, the posterior); `noise` as DiagonalGaussian.sample's."""
        posterior = self.encoder(x)
        return self.decoder(posterior.sample(noise)), posterior

    def reconstruct(self, x: Tensor) -> Tensor:
        """Deterministic reconstruction through the posterior mean (for pictures and metrics)."""
        return self.decoder(self.encoder(x).mode())

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> Tensor:
        """Decode n latent vectors drawn from the prior N(0, temperature^2 I)."""
        return self.decoder(self.prior_latents(n, generator, temperature))

    def prior_latents(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> Tensor:
        """n latent vectors from the prior N(0, temperature^2 I), on the model's device. Drawn on the
        generator's device (the CPU for torch.Generator()), then moved: a CPU generator cannot fill
        a CUDA tensor, and the same seed then gives the same latents on every device."""
        device = next(self.parameters()).device
        where = generator.device if generator is not None else device
        return torch.randn(n, self.latent_size, generator=generator, device=where).to(device) * temperature

    def save_pretrained(self, directory: str | Path, data: DataConfig, *, source: str | Path | None = None,
                        epoch: int = 0, step: int = 0) -> Path:
        """This model and its preprocessing (`data`, the data section it was trained with) as a folder
        that `image_autoencoding.load` and `VAE.from_pretrained` read: models/pretrained.py."""
        from image_autoencoding.models.pretrained import save_pretrained

        return save_pretrained(self, directory, data, source=source, epoch=epoch, step=step)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VAE:
        """The model a `save_pretrained` (or `vae export`) folder holds, on the CPU in eval mode; its
        preprocessing comes with models.pretrained.from_pretrained(directory).config.data."""
        from image_autoencoding.models.pretrained import from_pretrained

        return from_pretrained(directory).model


def loss_terms(x: Tensor, x_hat: Tensor, posterior: DiagonalGaussian) -> tuple[Tensor, Tensor]:
    """Per-image reconstruction 0.5 * sum((x - x_hat)^2) and KL, each of shape (N,), in fp32.

    Summed (not averaged) over pixels as in the original, so alpha keeps its meaning.
    """
    recon = 0.5 * (x.float() - x_hat.float()).pow(2).flatten(1).sum(dim=1)
    return recon, posterior.kl().float()


def training_objective(recon: Tensor, kl: Tensor, alpha: float) -> Tensor:
    """One scalar whose gradient is each network's own objective.

    The original's encoder minimises sum(recon) + alpha * sum(kl) and its decoder sum(recon). The KL
    term does not depend on the decoder, so the gradient of this sum with respect to the decoder is
    exactly d sum(recon); with respect to the encoder it is the encoder objective. One backward pass
    therefore replaces the original's two, which modern PyTorch rejects when a step() in between has
    modified weights in place. (Giving the encoder only the KL term, as one reading of the original
    text does, would leave it with no reconstruction signal at all: it would learn to output the
    prior for every image.)
    """
    return recon.sum() + alpha * kl.sum()


def kl_for_objective(
    posterior: DiagonalGaussian, free_bits: float = 0.0, sum_over_ranks: Callable[[Tensor], Tensor] | None = None,
    world_size: int = 1,
) -> Tensor:
    """Per-image KL as the objective sees it, shape (N,), in fp32.

    With free bits (Kingma et al. 2016) each latent unit's KL, averaged over the batch, counts as at
    least `free_bits` nats: below that the unit gets no push towards the prior, so the encoder can
    use it to carry information instead of collapsing it (posterior collapse). Each image gets the
    batch's clamped total, so sum() over the batch is N * sum_j max(free_bits, mean_i KL_ij) and the
    gradient of a unit above the floor is exactly that of the true KL. Only the objective changes:
    metrics and logs keep reporting `posterior.kl()`.

    Under torchrun the batch is the global one: `sum_over_ranks` (a differentiable all-reduce) adds
    up the per-unit sums of the `world_size` ranks, each holding an equal share, so every rank clamps
    the same global means and the ranks' objectives add up to the one-process objective.
    """
    if free_bits <= 0:
        return posterior.kl().float()
    per_unit = posterior.kl_per_dim().float()
    if sum_over_ranks is None:
        unit_means = per_unit.mean(dim=0)
    else:
        unit_means = sum_over_ranks(per_unit.sum(dim=0)) / (per_unit.shape[0] * world_size)
    clamped_total = unit_means.clamp_min(free_bits).sum()
    return clamped_total.expand(per_unit.shape[0])
