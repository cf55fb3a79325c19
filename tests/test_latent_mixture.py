"""The ex-post latent sampler (Ghosh et al. 2020): a Gaussian mixture fitted to the training
images' posterior means, stored as plain arrays, used by `vae sample --sampler gmm`, the Python API,
the report and exports."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import image_autoencoding as ia
from conftest import TINY
from image_autoencoding.cli import main
from image_autoencoding.sampling.latent_mixture import LatentMixture, fit_latent_mixture


def _three_clusters(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[4.0, 0, 0, 0], [-4.0, 0, 0, 0], [0, 4.0, 0, 0]])
    labels = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    return centres[labels] + rng.normal(scale=0.5, size=(n, 4)), centres


def test_the_mixture_finds_the_clusters_of_the_latents_and_bic_picks_their_number():
    points, centres = _three_clusters()
    mixture = fit_latent_mixture(points, choices=(1, 3, 6))
    assert mixture.components == 3 and set(mixture.info["bic"]) == {"1", "3", "6"}
    order = np.argsort(-mixture.weights.numpy())
    np.testing.assert_allclose(mixture.weights.numpy()[order], [0.5, 0.3, 0.2], atol=0.03)
    np.testing.assert_allclose(mixture.means.numpy()[order], centres, atol=0.1)
    # Its samples are where the data is: every sample near one of the centres, none in between.
    samples = mixture.sample(2000, torch.Generator().manual_seed(0)).numpy()
    nearest = np.linalg.norm(samples[:, None] - centres[None], axis=2).min(axis=1)
    assert np.percentile(nearest, 99) < 2.5


def test_a_mixture_is_saved_as_plain_arrays_and_samples_the_same_after_loading(tmp_path, monkeypatch):
    mixture = fit_latent_mixture(_three_clusters(500)[0], choices=(3,))
    mixture.info["checkpoint"] = {"epoch": 2, "step": 9}
    mixture.save(tmp_path / "gmm.safetensors")
    monkeypatch.setattr(pickle, "loads", lambda *a: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    loaded = LatentMixture.load(tmp_path / "gmm.safetensors")
    assert loaded.info == mixture.info
    a = mixture.sample(50, torch.Generator().manual_seed(1), temperature=0.5)
    b = loaded.sample(50, torch.Generator().manual_seed(1), temperature=0.5)
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gmm")
    assert main(["train", "data.dataset=digits", *TINY, f"train.output_dir={out}", "train.epochs=2"]) == 0
    (run_dir,) = (out / "results" / "vae").iterdir()
    return run_dir


def test_training_ends_with_a_mixture_for_best_and_the_report_shows_both_samplers(run):
    assert (run / "latent_gmm_best.safetensors").is_file()
    mixture = LatentMixture.load(run / "latent_gmm_best.safetensors")
    assert mixture.info["points"] == 1438 and mixture.means.shape[1] == 8  # every training latent, latent_dim 8
    report = (run / "report.md").read_text()
    assert "images/samples/samples_prior.png" in report and "images/samples/samples_gmm.png" in report
    assert (run / "images/samples/samples_gmm.png").is_file()


def test_vae_sample_with_the_mixture_writes_what_the_api_samples(run, tmp_path):
    assert main(["sample", str(run), "-n", "4", "--seed", "2", "--sampler", "gmm", "--out", str(tmp_path)]) == 0
    vae = ia.load(run, device="cpu")
    expected = vae.sample(4, seed=2, sampler="gmm")
    prior = vae.sample(4, seed=2)
    for i in range(4):
        written = np.asarray(Image.open(tmp_path / f"sample_{i:04d}.png").convert("RGB"))
        assert np.array_equal(written, np.asarray(expected[i]))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(expected, prior, strict=True))


def test_a_checkpoint_without_a_mixture_gets_one_fitted_on_first_gmm_sampling(run, tmp_path, capsys):
    with pytest.raises(ValueError, match="vae sample RUN_DIR --sampler gmm"):
        ia.load(run, checkpoint="epoch_2", device="cpu").sample(2, sampler="gmm")
    assert main(["sample", str(run), "--checkpoint", "epoch_2", "-n", "2", "--sampler", "gmm",
                 "--out", str(tmp_path)]) == 0
    assert "Gaussian mixture" in capsys.readouterr().err
    assert (run / "latent_gmm_epoch_2.safetensors").is_file()
    assert len(ia.load(run, checkpoint="epoch_2", device="cpu").sample(2, sampler="gmm")) == 2


def test_an_export_carries_the_mixture_of_its_weights(run, tmp_path):
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "latent_gmm.safetensors").is_file()
    from_export = ia.load(tmp_path / "export", device="cpu").sample(3, seed=0, sampler="gmm", as_tensor=True)
    from_run = ia.load(run, device="cpu").sample(3, seed=0, sampler="gmm", as_tensor=True)
    assert torch.equal(from_export, from_run)
