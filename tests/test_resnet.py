"""model.arch=resnet: residual blocks with GroupNorm, resize + conv upsampling, a global or a spatial
latent; and the rest of the package (resume, export, the API, sampling, torchrun, VAE-GAN) with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import image_autoencoding as ia
from conftest import TINY, any_arch
from helpers.faults import SignalAtStep
from image_autoencoding.cli import main
from image_autoencoding.config import load_config
from image_autoencoding.models.factory import build_model
from image_autoencoding.runs.checkpoint import load_checkpoint
from image_autoencoding.training.optimizers import make_optimizer
from test_distributed import vae_gan_first_step

RESNET = ["model.arch=resnet", "model.resnet_channels=[8,16]"]
SPATIAL = [*RESNET, "model.latent_channels=1"]  # 16 px: 1 x 8 x 8 = 64 floats


def _model(overrides: list[str], image_size: int = 16):
    cfg = load_config(None, [f"data.image_size={image_size}", *overrides])
    return build_model(cfg.model, image_size)


def test_global_and_spatial_latents_are_flat_vectors_of_their_size():
    x = torch.randn(3, 3, 32, 32)
    for overrides, size in ((["model.arch=resnet", "model.latent_dim=128"], 128),
                            (["model.arch=resnet", "model.latent_channels=4"], 4 * 8 * 8),  # 1/4 of the side
                            (["model.arch=resnet", "model.resnet_channels=[16,32,64,64]",
                              "model.latent_channels=16"], 16 * 4 * 4)):  # 1/8 of the side
        model = _model(overrides, 32)
        x_hat, posterior = model(x)
        assert model.latent_size == size and posterior.mean.shape == (3, size)
        assert x_hat.shape == x.shape and x_hat.abs().max() <= 1
        assert model.prior_latents(5).shape == (5, size)
        assert model.decoder(posterior.mean).shape == x.shape


def test_each_architecture_trains_with_the_optimizer_measured_for_it_unless_one_is_named():
    """train.optimizer=auto (the default and the shipped dataset configs): with RMSprop at lr 1e-3 the
    resnet reached 15.6 dB validation PSNR where Adam reached 21.1 (photos, 32 px, 120 s)."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in (None, configs / "coco.yaml", configs / "food101.yaml", configs / "fashion_mnist.yaml"):
        assert load_config(path, ["model.arch=resnet"]).train.optimizer == "adam"
        assert load_config(path, []).train.optimizer == "rmsprop"
    assert load_config(None, [*RESNET, "train.optimizer=rmsprop"]).train.optimizer == "rmsprop"
    cfg = load_config(None, ["data.image_size=16", *RESNET])
    model = build_model(cfg.model, 16)
    encoder_optimizer, decoder_optimizer = (make_optimizer(net.parameters(), cfg.train)
                                            for net in (model.encoder, model.decoder))
    assert isinstance(encoder_optimizer, torch.optim.Adam) and isinstance(decoder_optimizer, torch.optim.Adam)
    assert cfg.to_dict()["train"]["optimizer"] == "adam"  # what config.yaml and checkpoints record


def test_the_resnet_has_no_transposed_convolution_and_no_batch_statistics():
    """Upsampling by resize + conv (no checkerboard: Odena et al. 2016), GroupNorm: each image's
    output in training mode is the same alone as in a batch."""
    model = _model(SPATIAL)
    kinds = {type(m) for m in model.modules()}
    assert nn.ConvTranspose2d not in kinds and not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert nn.GroupNorm in kinds
    model.train()
    x = torch.randn(4, 3, 16, 16)
    together = model.decoder(model.encoder(x).mean)
    alone = model.decoder(model.encoder(x[:1]).mean)
    torch.testing.assert_close(alone, together[:1], rtol=1e-5, atol=1e-5)


def test_a_spatial_latent_needs_the_resnet_and_an_image_side_its_levels_divide(tiny, capsys):
    assert main(["train", *tiny, "model.latent_channels=4"]) == 2
    error = capsys.readouterr().err.strip()
    assert "'model.latent_channels' belongs to model.arch resnet or autoencoder-kl, not to model.arch seed" in error
    assert "Traceback" not in error and "\n" not in error
    # Three levels halve the side twice: 18 px is not a multiple of 4.
    assert main(["train", *any_arch(tiny), "model.arch=resnet", "model.resnet_channels=[8,8,8]",
                 "data.image_size=18"]) == 2
    assert "data.image_size" in capsys.readouterr().err


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A resnet run with a spatial latent, stopped by SIGTERM after step 4 (inside epoch 2) and
    resumed, and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("resnet")
    common = ["train", "--quiet", "data.dataset=digits", *any_arch(TINY), *SPATIAL, "train.epochs=2",
              "train.device=cpu", "train.precision=fp32", "train.eval_images=50",
              "train.checkpoint_every=1", "train.lr_schedule=cosine", "train.warmup_steps=2"]
    assert main([*common, f"train.output_dir={root / 'whole'}"]) == 0
    assert main([*common, f"train.output_dir={root / 'stopped'}"], callbacks=[SignalAtStep("SIGTERM@4")]) != 0
    (stopped,) = (root / "stopped" / "results" / "vae").iterdir()
    assert main(["train", "--quiet", "--resume", str(stopped)]) == 0
    (whole,) = (root / "whole" / "results" / "vae").iterdir()
    return {"whole": whole, "resumed": stopped, "root": root}


def test_a_resnet_run_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(resnet_run):
    resumed = load_checkpoint(resnet_run["resumed"] / "checkpoints" / "last.pt")
    whole = load_checkpoint(resnet_run["whole"] / "checkpoints" / "last.pt")
    assert resumed.step == whole.step == 6
    for key, value in whole.model.items():
        assert torch.equal(resumed.model[key], value), key
    assert (resnet_run["whole"] / "report.md").read_text().count("spatial latent 1x8x8") == 1


def test_a_resnet_run_exports_and_loads_through_the_api(resnet_run, tmp_path):
    run = resnet_run["whole"]
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    pixels = np.random.default_rng(0).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
    from_run, from_export = ia.load(run, device="cpu"), ia.load(tmp_path / "export", device="cpu")
    # 64 floats per image (1 x 8 x 8) where model.latent_dim is 8: the spatial latent's size, under its own name
    assert from_run.latent_size == 64 and from_run.config.model.latent_dim == 8
    with pytest.warns(DeprecationWarning, match="latent_size"):
        assert from_run.latent_dim == 64  # the old name still answers, and says which to use
    assert torch.equal(from_run.reconstruct(list(pixels), as_tensor=True),
                       from_export.reconstruct(list(pixels), as_tensor=True))
    z = from_run.encode(list(pixels)).mean
    assert z.shape == (2, 64) and from_run.decode(z, as_tensor=True).shape == (2, 3, 16, 16)
    assert len(from_run.sample(3, seed=0)) == 3
    assert main(["sample", str(run), "-n", "4", "--sampler", "gmm", "--out", str(tmp_path / "gmm")]) == 0
    assert len(list((tmp_path / "gmm").glob("*.png"))) >= 4


def test_a_resnet_exports_to_onnx_matching_torch(resnet_run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="vae export --onnx needs onnxruntime (the onnx extra)")
    pytest.importorskip("onnxscript", reason="vae export --onnx needs onnxscript (the onnx extra)")
    out = tmp_path / "export"
    assert main(["export", str(resnet_run["whole"]), "--out", str(out), "--onnx"]) == 0
    vae = ia.load(out, device="cpu")
    z = torch.randn(3, vae.latent_size, generator=torch.Generator().manual_seed(0))
    decoder = onnxruntime.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    (image,) = decoder.run(["image"], {"z": z.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(image, vae.model.decoder(z).numpy(), rtol=0, atol=1e-4)


def test_a_resnet_vae_gan_on_two_processes_takes_the_step_of_one_process(tmp_path):
    mp.spawn(vae_gan_first_step, args=(tmp_path, 2, tuple(SPATIAL)), nprocs=2)
    vae_gan_first_step(0, tmp_path, 1, tuple(SPATIAL))
    two, one = torch.load(tmp_path / "gan2.pt"), torch.load(tmp_path / "gan1.pt")
    for key in ("train_recon", "train_kl", "train_loss"):
        assert two["values"][key] == pytest.approx(one["values"][key], rel=1e-5), key
    largest = max(float(g.abs().max()) for g in one["grads"].values())
    for key, grad in one["grads"].items():
        # Within 1% of the tensor's largest element (the discriminator's BatchNorm backward subtracts
        # nearly equal sums; see test_distributed's VAE-GAN test), or 1e-6 of the largest gradient
        # anywhere: a conv bias just before a GroupNorm of one channel per group has gradient 0 up
        # to rounding, which summation order alone changes.
        atol = max(1e-2 * float(grad.abs().max()), 1e-6 * largest)
        torch.testing.assert_close(two["grads"][key], grad, rtol=0, atol=atol, msg=key)
