from __future__ import annotations

import pytest
import torch

from image_autoencoding.config import load_config
from image_autoencoding.models.factory import build_model
from image_autoencoding.models.vae import DiagonalGaussian


@pytest.mark.parametrize("size", [32, 64, 128])
def test_output_shapes_for_each_image_size(size):
    cfg = load_config(None, [f"data.image_size={size}"])
    model = build_model(cfg.model, size).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        x_hat, posterior = model(x)
        samples = model.sample(3)
    assert x_hat.shape == x.shape and samples.shape == (3, 3, size, size)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 128)
    assert x_hat.abs().max() <= 1.0  # tanh output, the same range as normalised inputs


def test_architecture_is_the_originals():
    cfg = load_config()
    model = build_model(cfg.model, 64)
    convs = [m for m in model.encoder.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 64, (5, 5), (2, 2)), (64, 128, (5, 5), (2, 2)), (128, 256, (5, 5), (2, 2))
    ]
    assert model.encoder.fc[1].in_features == 8 * 8 * 256 and model.encoder.fc[1].out_features == 1024
    assert model.decoder.fc[0].out_features == 8 * 8 * 256
    deconvs = [m for m in model.decoder.features.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(d.in_channels, d.out_channels) for d in deconvs] == [(256, 256), (256, 128), (128, 32)]
    assert model.decoder.to_image[0].out_channels == 3 and model.decoder.to_image[0].kernel_size == (5, 5)


def test_reparametrize_has_the_posterior_mean_and_variance():
    mean = torch.tensor([[1.5, -2.0, 0.0]]).repeat(200_000, 1)
    logvar = torch.log(torch.tensor([[0.25, 4.0, 1.0]])).repeat(200_000, 1)
    z = DiagonalGaussian(mean, logvar).sample(torch.Generator().manual_seed(0))
    assert torch.allclose(z.mean(0), torch.tensor([1.5, -2.0, 0.0]), atol=0.02)
    assert torch.allclose(z.var(0), torch.tensor([0.25, 4.0, 1.0]), rtol=0.02)


def test_prior_samples_are_standard_normal_scaled_by_temperature():
    cfg = load_config(None, ["model.latent_dim=4", "data.image_size=32"])
    model = build_model(cfg.model, 32)
    seen = []
    model.decoder.forward = lambda z: seen.append(z) or z  # capture the latent vectors
    model.sample(50_000, torch.Generator().manual_seed(1), temperature=0.5)
    assert seen[0].std().item() == pytest.approx(0.5, rel=0.02)


def test_logvar_is_clamped_so_exp_stays_finite():
    posterior = DiagonalGaussian(torch.zeros(1, 2), torch.tensor([[500.0, -500.0]]))
    assert torch.isfinite(posterior.kl()).all() and torch.isfinite(posterior.sample()).all()


def test_posterior_from_fp16_activations_keeps_a_finite_kl():
    """Under fp16 autocast the encoder's outputs are fp16; mean^2 and exp(logvar) overflow there
    (every fp16 step on an H200 was skipped as non-finite before the posterior moved to fp32)."""
    posterior = DiagonalGaussian(torch.full((2, 4), 300.0, dtype=torch.float16),
                                 torch.full((2, 4), 15.0, dtype=torch.float16))
    assert posterior.mean.dtype == torch.float32
    assert torch.isfinite(posterior.kl()).all() and torch.isfinite(posterior.sample()).all()


@pytest.mark.parametrize("overrides", [[], ["model.arch=resnet", "model.resnet_channels=[8,16]"]])
def test_every_decoders_last_layer_is_the_weight_that_makes_the_pixels(overrides):
    """The adaptive GAN weight (Esser et al. 2021) compares gradients at this weight: it must be the
    last layer's, whose gradient a change of the output pixels reaches first."""
    cfg = load_config(None, ["data.image_size=16", *overrides])
    model = build_model(cfg.model, 16)
    weight = model.decoder.last_layer
    assert isinstance(weight, torch.nn.Parameter) and weight.shape[0] == 3
    model.decoder(torch.randn(2, model.latent_size)).sum().backward()
    last_conv = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert weight is last_conv.weight and weight.grad is not None
