"""The ex-post latent sampler (Ghosh et al. 2020): a Gaussian mixture fitted to the training
images' posterior means, stored as plain arrays, used by `vae sample --sampler gmm`, the Python API,
the report and exports."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import image_autoencoding as ia
from conftest import TINY
from image_autoencoding import atomic_files
from image_autoencoding.cli import main
from image_autoencoding.errors import UserError
from image_autoencoding.runs.latent_sampler import fit_and_save, load_run_mixture
from image_autoencoding.runs.loading import load_from_run
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
    loaded = LatentMixture.load(tmp_path / "gmm.safetensors", latent_size=4)
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
    mixture = LatentMixture.load(run / "latent_gmm_best.safetensors", latent_size=8)
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


# -- sampling and fitting ----------------------------------------------------------------------------


def _batched_draws(mixture: LatentMixture, n: int, seed: int, temperature: float) -> torch.Tensor:
    """The same draws as one batched product, which gathers an n x D x D tensor."""
    generator = torch.Generator().manual_seed(seed)
    component = torch.multinomial(mixture.weights, n, replacement=True, generator=generator)
    eps = torch.randn(n, mixture.means.shape[1], 1, generator=generator)
    return mixture.means[component] + temperature * (mixture.cholesky[component] @ eps).squeeze(-1)


def test_sampling_takes_memory_for_the_samples_not_a_covariance_factor_per_sample():
    rng = np.random.default_rng(0)
    dim, n = 32, 2000
    factors = np.tril(rng.normal(size=(3, dim, dim))) + 3 * np.eye(dim)
    mixture = LatentMixture(torch.tensor([0.5, 0.3, 0.2]), torch.from_numpy(rng.normal(size=(3, dim))).float(),
                            torch.from_numpy(factors).float())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        z = mixture.sample(n, torch.Generator().manual_seed(4), temperature=0.7)
    largest = max(event.cpu_memory_usage for event in profile.key_averages())
    assert largest <= 2 * n * dim * 4  # never the n x D x D floats (8 MB here) of one factor per sample
    assert torch.equal(z, mixture.sample(n, torch.Generator().manual_seed(4), temperature=0.7))
    torch.testing.assert_close(z, _batched_draws(mixture, n, 4, 0.7), rtol=1e-5, atol=1e-5)


def test_bic_searches_beyond_the_largest_choice_while_it_still_falls():
    rng = np.random.default_rng(1)
    centres = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 10.0  # 30 clusters
    points = centres[rng.integers(0, 30, 1500)] + rng.normal(scale=0.5, size=(1500, 2))
    mixture = fit_latent_mixture(points, choices=(1, 2, 4))
    tried = sorted(map(int, mixture.info["bic"]))
    assert tried[:4] == [1, 2, 4, 8] and mixture.components >= 16  # the grid's top end (4) was not the end
    assert tried[-1] > mixture.components  # it stopped where BIC turned up


def test_a_mixture_of_one_latent_is_a_one_line_error_saying_how_many_are_needed():
    with pytest.raises(UserError, match=r"at least 2 training latents.*there is 1$"):
        fit_latent_mixture(np.zeros((1, 8)))


# -- which weights a mixture belongs to ------------------------------------------------------------


def _copy(run: Path, to: Path) -> Path:
    return Path(shutil.copytree(run, to, ignore=shutil.ignore_patterns("samples", "images", "export")))


def test_a_mixture_is_never_used_or_overwritten_for_other_weights_of_the_same_epoch_and_step(run, tmp_path, capsys):
    other = _copy(run, tmp_path / "other")  # same epoch and step as run's best.pt, other weights
    state = torch.load(other / "checkpoints" / "best.pt", weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, other / "checkpoints" / "best.pt")
    ours = {path.name: path.read_bytes() for path in run.glob("latent_gmm_*")}
    foreign = str(other / "checkpoints" / "best.pt")

    assert main(["export", str(run), "--checkpoint", foreign, "--out", str(tmp_path / "export")]) == 0
    assert not (tmp_path / "export" / "latent_gmm.safetensors").exists()
    assert ia.load(run, checkpoint=foreign, device="cpu").mixture is None
    assert main(["sample", str(run), "--checkpoint", foreign, "-n", "2", "--sampler", "gmm",
                 "--out", str(tmp_path / "out")]) == 0
    assert "Gaussian mixture" in capsys.readouterr().err  # fitted to these weights, not run's taken
    assert {path.name: path.read_bytes() for path in run.glob("latent_gmm_*")} == ours


def test_a_mixture_written_before_mixtures_recorded_their_weights_is_not_used(run, tmp_path):
    copy = _copy(run, tmp_path / "run")
    path = copy / "latent_gmm_best.safetensors"
    old = LatentMixture.load(path, latent_size=8)
    old.info["checkpoint"] = {key: old.info["checkpoint"][key] for key in ("epoch", "step")}
    old.save(path)
    vae = ia.load(copy, device="cpu")
    assert vae.mixture is None  # so `vae sample --sampler gmm` fits a new one, as for a checkpoint without
    with pytest.raises(ValueError, match="no latent mixture fitted to these weights"):
        vae.sample(2, sampler="gmm")


# -- damaged files, full disks, read-only runs -----------------------------------------------------


def _mixture(dim: int = 8) -> LatentMixture:
    rng = np.random.default_rng(0)
    return LatentMixture(torch.tensor([0.6, 0.4]), torch.from_numpy(rng.normal(size=(2, dim))).float(),
                         torch.eye(dim).repeat(2, 1, 1) * 0.5, {"checkpoint": {"epoch": 1, "step": 3}})


def _damaged(path: Path, how: str) -> Path:
    mixture = _mixture()
    if how == "nan":
        mixture.means[0, 0] = float("nan")
    elif how == "shapes":
        mixture.means = torch.zeros(2, 9)
    elif how == "weights":
        mixture.weights = torch.tensor([0.6, 0.6])
    elif how == "not_triangular":
        mixture.cholesky[0, 0, 1] = 1.0
    blob = mixture.to_bytes()
    if how == "truncated":
        blob = blob[:200]
    elif how == "metadata":  # the same length, so the header stays valid JSON of the right size
        info = json.dumps(json.dumps(mixture.info)).encode()
        blob = blob.replace(info, b'"' + b"[" * (len(info) - 3) + b'1"')
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("how", ["truncated", "nan", "shapes", "weights", "not_triangular", "metadata"])
def test_a_damaged_mixture_file_is_refused_in_one_line_naming_it(tmp_path, how):
    path = _damaged(tmp_path / "latent_gmm_best.safetensors", how)
    with pytest.raises(UserError, match=f"^latent mixture '{path}' (cannot be read|is not valid): [^\n]+$"):
        LatentMixture.load(path, latent_size=8)


def test_a_damaged_mixture_stops_only_sampling_from_it(run, tmp_path, capsys, caplog):
    copy = _copy(run, tmp_path / "run")
    path = copy / "latent_gmm_best.safetensors"
    mixture = LatentMixture.load(path, latent_size=8)
    path.write_bytes(mixture.to_bytes()[:200])
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20), "red").save(image)
    assert main(["reconstruct", str(copy), str(image), "--out", str(tmp_path / "r")]) == 0
    assert main(["encode", str(copy), str(image), "-o", str(tmp_path / "z.npz")]) == 0
    assert main(["sample", str(copy), "-n", "2", "--out", str(tmp_path / "prior")]) == 0
    # What can do without it (the report's samples, an export) leaves it out, saying so once.
    trained = load_from_run(copy, "best")
    assert load_run_mixture(copy, trained) is None and load_run_mixture(copy, trained) is None
    assert caplog.text.count(f"latent mixture '{path}' cannot be read") == 1
    mixture.means[0, 0] = float("nan")  # the weights' digest still right: no black images either
    path.write_bytes(mixture.to_bytes())
    capsys.readouterr()
    assert main(["sample", str(copy), "-n", "2", "--sampler", "gmm", "--out", str(tmp_path / "gmm")]) == 2
    error = capsys.readouterr().err
    assert error == f"vae: error: latent mixture '{path}' is not valid: it holds NaN or infinite values\n"
    assert not (tmp_path / "gmm").exists()
    with pytest.raises(UserError, match="latent mixture"):
        ia.load(copy, device="cpu").sample(2, sampler="gmm")


def test_the_mixture_is_written_whole_with_the_usual_file_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        _mixture().save(tmp_path / "latent_gmm_best.safetensors")
    finally:
        os.umask(mask)
    assert (tmp_path / "latent_gmm_best.safetensors").stat().st_mode & 0o777 == 0o644  # as the run's other files
    assert LatentMixture.load(tmp_path / "latent_gmm_best.safetensors", latent_size=8).components == 2


class _DiskFullAfter:
    """A file handle on a disk that fills up after `room` bytes."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_a_full_disk_while_saving_the_mixture_is_one_line_and_keeps_the_previous_file(run, tmp_path, monkeypatch):
    copy = _copy(run, tmp_path / "run")
    before = (copy / "latent_gmm_best.safetensors").read_bytes()
    trained = load_from_run(copy, "best")
    images = np.zeros((4, 16, 16, 3), np.uint8)
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: _DiskFullAfter(fdopen(*a, **k), 100))
    with pytest.raises(UserError, match=r"latent_gmm_best.safetensors': No space left on device$"):
        fit_and_save(copy, trained, images, torch.device("cpu"), 4)
    assert (copy / "latent_gmm_best.safetensors").read_bytes() == before
    assert atomic_files.leftover_temporaries(copy, "*") == []


def test_gmm_sampling_in_a_read_only_run_samples_from_the_mixture_it_could_not_save(run, tmp_path, monkeypatch,
                                                                                       capsys):
    copy = _copy(run, tmp_path / "run")
    (copy / "latent_gmm_best.safetensors").unlink()

    mkstemp = atomic_files.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # mkstemp in the run folder, as a read-only file system answers
        if dir is not None and Path(dir).resolve() == copy.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(atomic_files.tempfile, "mkstemp", read_only)
    assert main(["sample", str(copy), "-n", "3", "--sampler", "gmm", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "could not be saved" in err and "Read-only file system" in err
    assert len(list((tmp_path / "out").glob("sample_*.png"))) == 3
    assert not (copy / "latent_gmm_best.safetensors").exists()
