from __future__ import annotations

import math

import pytest
import torch

from image_autoencoding.config import load_config
from image_autoencoding.models.factory import build_model
from image_autoencoding.models.vae import DiagonalGaussian, loss_terms, training_objective


def test_loss_terms_match_a_hand_computation():
    x = torch.zeros(2, 1, 1, 2)
    x_hat = torch.tensor([[[[1.0, 2.0]]], [[[0.5, -0.5]]]])
    mean = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    recon, kl = loss_terms(x, x_hat, DiagonalGaussian(mean, logvar))
    # recon: 0.5 * (1 + 4) = 2.5 ; 0.5 * (0.25 + 0.25) = 0.25
    assert recon.tolist() == pytest.approx([2.5, 0.25])
    # kl = -0.5 * sum(1 + logvar - mu^2 - exp(logvar))
    kl0 = -0.5 * ((1 + 0 - 1 - 1) + (1 + math.log(2) - 0 - 2))
    kl1 = -0.5 * ((1 + 0 - 0 - 1) + (1 + 0 - 4 - 1))
    assert kl.tolist() == pytest.approx([kl0, kl1])
    assert training_objective(recon, kl, 0.5).item() == pytest.approx(2.75 + 0.5 * (kl0 + kl1))


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


def test_one_backward_gives_each_network_its_own_objective():
    """Encoder: d[sum(recon) + alpha sum(kl)]; decoder: d[sum(recon)] (docs/design.md, the model and the loss)."""
    cfg = load_config(None, ["data.image_size=16", "model.encoder_channels=[4,8,8]",
                             "model.decoder_channels=[8,8,4,3]", "model.fc_dim=16", "model.latent_dim=4"])
    model = build_model(cfg.model, 16)
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    alpha = 0.3

    def forward():
        torch.manual_seed(0)  # the same reparametrisation noise in every pass
        x_hat, posterior = model(x)
        return loss_terms(x, x_hat, posterior)

    model.zero_grad()
    recon, kl = forward()
    training_objective(recon, kl, alpha).backward()
    encoder_one, decoder_one = _grads(model.encoder), _grads(model.decoder)

    model.zero_grad()
    recon, kl = forward()
    (recon.sum() + alpha * kl.sum()).backward()
    encoder_own = _grads(model.encoder)
    model.zero_grad()
    recon, kl = forward()
    recon.sum().backward()
    decoder_own = _grads(model.decoder)

    for one, own in zip(encoder_one, encoder_own, strict=True):
        assert torch.allclose(one, own, atol=1e-6)
    for one, own in zip(decoder_one, decoder_own, strict=True):
        assert torch.allclose(one, own, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in decoder_own)


def test_the_reparametrisation_is_the_posteriors_own_and_takes_the_training_noise():
    """Training draws its noise for the whole global batch (training/steps/noise.py) and passes it
    in; VAE.forward, the objectives and DiagonalGaussian.sample all compute z = mu + sigma * eps
    the same way."""
    mean, logvar = torch.randn(4, 3), torch.randn(4, 3)
    posterior, noise = DiagonalGaussian(mean, logvar), torch.randn(4, 3)
    torch.testing.assert_close(posterior.sample(noise), mean + torch.exp(0.5 * logvar) * noise, rtol=0, atol=0)
    drawn = posterior.sample(torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn, posterior.sample(torch.randn(4, 3, generator=torch.Generator().manual_seed(5))))
