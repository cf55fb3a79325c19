"""FID / KID / precision-recall formulas on features (evaluation/sample_metrics.py), against direct
computations and cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from image_autoencoding.evaluation.sample_metrics import frechet_distance, kernel_distance, precision_recall


def _features(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Correlated features (as a network's), the same distribution for every seed; `seed` draws the points."""
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1234)) / dim**0.5
    return (torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) @ mixing) * scale + shift


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The FID formula as pytorch-fid / torchmetrics write it, with scipy's matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (0.5, 1.0), (0.0, 1.7), (0.3, 0.6)])
def test_frechet_distance_equals_scipys_computation(shift, scale):
    real, fake = _features(800, 24, seed=0), _features(700, 24, seed=1, shift=shift, scale=scale)
    expected = _scipy_frechet(real.double().numpy(), fake.double().numpy())
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    real = _features(500, 8, seed=0)
    assert abs(frechet_distance(real, real)) < 1e-9
    near, far = (frechet_distance(real, real + shift) for shift in (0.1, 1.0))
    assert near == pytest.approx(8 * 0.1**2, rel=1e-6) and far == pytest.approx(8 * 1.0, rel=1e-6)


def test_kernel_distance_is_near_zero_for_one_distribution_and_large_for_two():
    real = _features(600, 16, seed=0)
    fresh = _features(600, 16, seed=5)  # another draw of the same distribution
    other = _features(600, 16, seed=2, shift=1.0)
    mean_same, _ = kernel_distance(real, fresh, subsets=20, subset_size=200)
    mean_other, std_other = kernel_distance(real, other, subsets=20, subset_size=200)
    assert abs(mean_same) < 0.05 * mean_other and mean_other > 10 * std_other


def test_kernel_distance_matches_the_unbiased_mmd_formula_on_one_subset():
    x, y = _features(50, 6, seed=0).double(), _features(50, 6, seed=1, shift=0.4).double()
    k = lambda a, b: (a @ b.T / 6 + 1) ** 3  # noqa: E731
    n = 50
    direct = ((k(x, x).sum() - k(x, x).trace()) / (n * (n - 1)) + (k(y, y).sum() - k(y, y).trace()) / (n * (n - 1))
              - 2 * k(x, y).mean())
    mean, std = kernel_distance(x, y, subsets=1, subset_size=50)
    assert mean == pytest.approx(float(direct), rel=1e-10) and std == 0.0


def test_precision_and_recall_separate_looking_real_from_covering_it():
    real = _features(400, 4, seed=0)
    # Mode collapse: 40 samples all next to one real image, so they look real and cover nothing else.
    collapsed = real[0] + 0.01 * torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision == 1.0 and recall < 0.05
    elsewhere = real + 10.0  # varied but off the data: neither
    assert precision_recall(real, elsewhere, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(real[:3], real, k=3)


# -- the feature networks and `vae evaluate --fid` -----------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import TINY
    from image_autoencoding.cli import main

    out = tmp_path_factory.mktemp("fid")
    assert main(["train", "data.dataset=digits", *TINY, f"train.output_dir={out}", "train.epochs=1"]) == 0
    (run_dir,) = (out / "results" / "vae").iterdir()
    return run_dir


def test_fid_without_inception_weights_is_one_line_saying_which_file_goes_where(run, tmp_path, monkeypatch, capsys):
    from image_autoencoding.cli import main
    from image_autoencoding.evaluation.feature_networks import INCEPTION_FILE

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    before = (run / "metrics.json").read_bytes()
    assert main(["evaluate", str(run), "--fid"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and INCEPTION_FILE in error
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE) in error
    assert (run / "metrics.json").read_bytes() == before and not list(run.glob("sample_quality*"))


def test_fid_runs_through_the_real_inception_code_with_a_weights_file(run, tmp_path, capsys):
    """torchvision's Inception-v3 with random weights saved to a file (no download here): the same
    loading (weights_only), resizing and scoring as with the real weights."""
    import json

    from torchvision.models import inception_v3

    from image_autoencoding.cli import main

    weights = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    assert main(["evaluate", str(run), "--fid", "--inception-weights", str(weights), "--limit", "8"]) == 0
    assert "| reconstructions |" in capsys.readouterr().out
    (report,) = run.glob("report_limit_8.md")
    assert "| prior_samples |" in report.read_text()
    (path,) = run.glob("sample_quality*.json")
    scores = json.loads(path.read_text())["scores"]
    assert set(scores) == {"reconstructions", "prior_samples", "mixture_samples"}
    for score in scores.values():
        assert score["images"] == 8 and np.isfinite(score["fid"]) and 0 <= score["precision"] <= 1


def test_a_weights_file_for_another_network_is_refused_in_one_line(tmp_path):
    from image_autoencoding.errors import UserError
    from image_autoencoding.evaluation.feature_networks import inception_network

    path = tmp_path / "other.pth"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(UserError, match="not usable weights for Inception3: ") as refused:
        inception_network(path)
    assert "\n" not in str(refused.value) and "first 'w'" in str(refused.value) and "missing" in str(refused.value)


def test_the_report_says_where_the_inception_weights_go_when_they_are_absent(run, tmp_path, monkeypatch):
    from image_autoencoding.cli import main
    from image_autoencoding.evaluation.feature_networks import INCEPTION_FILE

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["evaluate", str(run), "--limit", "4"]) == 0
    section = (run / "report_limit_4.md").read_text().split("## Sample quality")[1].split("##")[0]
    assert f"vae evaluate {run} --fid" in section
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE) in section


def test_inception_features_are_those_of_torchvisions_own_constructor_for_its_weights(tmp_path):
    """torchvision's inception_v3(weights=IMAGENET1K_V1) sets transform_input=True: the weights,
    ported from TensorFlow, expect inputs in [-1, 1]. Random weights here (no download); the same
    file loaded both ways, the same ImageNet-normalised 299 px images, as torchvision's transforms give."""
    from torchvision.models import inception_v3

    from image_autoencoding.evaluation.feature_networks import IMAGENET_MEAN, IMAGENET_STD, inception_network

    torch.manual_seed(0)
    reference = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    torch.save(reference.state_dict(), tmp_path / "inception.pth")
    reference.fc = torch.nn.Identity()
    images = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        expected = reference.eval()((images - mean) / std).double()
    ours = inception_network(tmp_path / "inception.pth").features(images)
    # Random weights give pooled features of ~1e-6: compare relative to their size.
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()


class _CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("content", ["a pickle that runs code", "a list of tensors"])
def test_inception_weights_that_are_not_a_state_dict_are_one_line(run, tmp_path, capsys, content):
    from image_autoencoding.cli import main

    marker, weights = tmp_path / "marker", tmp_path / "weights.pth"
    torch.save(_CreatesFileWhenUnpickled(marker) if content.startswith("a pickle") else [torch.ones(2)], weights)
    files = sorted(run.rglob("*"))
    assert main(["evaluate", str(run), "--fid", "--inception-weights", str(weights), "--limit", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(weights) in err and "Traceback" not in err, err
    assert "weights_only" not in err and "False" not in err  # no advice to load it unsafely
    assert not marker.exists() and sorted(run.rglob("*")) == files


def test_fid_on_too_few_images_is_refused_before_any_feature_is_computed(run, tmp_path, monkeypatch, capsys):
    from image_autoencoding.cli import main
    from image_autoencoding.evaluation import feature_networks

    computed = []
    tiny_network = feature_networks.FeatureNetwork(torch.nn.Conv2d(3, 4, 3), input_size=8)
    monkeypatch.setattr(feature_networks.FeatureNetwork, "features", lambda self, images: computed.append(1))
    monkeypatch.setattr(feature_networks, "inception_network", lambda weights: tiny_network)
    weights = tmp_path / "any.pth"
    weights.write_bytes(b"")
    assert main(["evaluate", str(run), "--fid", "--inception-weights", str(weights), "--limit", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least 4 images" in err and "gives 3" in err, err
    assert computed == [] and not list(run.rglob("*limit_3*"))
