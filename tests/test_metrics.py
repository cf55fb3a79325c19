"""PCC, SSIM, MSE, PSNR against independent references on real photographs and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from skimage import data as photos
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import resize

from image_autoencoding.evaluation.metrics import batch_pcc, mse, pcc, psnr, ssim, summarize


def _photo(name: str) -> np.ndarray:
    """A 64x64 RGB photograph in [0, 1], HWC."""
    image = getattr(photos, name)()
    side = min(image.shape[:2])
    return resize(image[:side, :side], (64, 64), anti_aliasing=True).astype(np.float64)


@pytest.fixture(scope="module")
def pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Photographs and distorted versions of them (noise, blur-like shift, darkening), NCHW."""
    rng = np.random.default_rng(0)
    originals = np.stack([_photo(name) for name in ("astronaut", "coffee", "chelsea", "rocket")])
    distorted = originals.copy()
    distorted[0] = np.clip(distorted[0] + rng.normal(0, 0.1, distorted[0].shape), 0, 1)
    distorted[1] = np.roll(distorted[1], 2, axis=1)
    distorted[2] = distorted[2] * 0.6
    distorted[3] = np.clip(0.5 * distorted[3] + 0.5 * distorted[0], 0, 1)
    to_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    return to_nchw(originals), to_nchw(distorted)


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def test_ssim_matches_scikit_image(pairs):
    x, y = pairs
    ours = ssim(x, y)
    for i in range(len(x)):
        reference = structural_similarity(
            _hwc(x[i]), _hwc(y[i]), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0, channel_axis=2,
        )
        assert ours[i].item() == pytest.approx(reference, abs=1e-4)
    assert ours.shape == (4,) and (ours < 0.99).all()


def test_pcc_matches_scipy_and_numpy(pairs):
    x, y = pairs
    ours = pcc(x, y)
    for i in range(len(x)):
        a, b = x[i].flatten().numpy(), y[i].flatten().numpy()
        assert ours[i].item() == pytest.approx(pearsonr(a, b).statistic, abs=1e-4)
        assert ours[i].item() == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-4)


def test_mse_and_psnr_match_scikit_image(pairs):
    x, y = pairs
    for i in range(len(x)):
        assert mse(x, y)[i].item() == pytest.approx(float(((x[i] - y[i]) ** 2).mean()), rel=1e-9)
        reference = peak_signal_noise_ratio(_hwc(x[i]), _hwc(y[i]), data_range=1.0)
        assert psnr(x, y)[i].item() == pytest.approx(reference, abs=1e-4)


def test_identical_images_score_perfectly(pairs):
    x, _ = pairs
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(pcc(x, x), torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert (mse(x, x) == 0).all() and (psnr(x, x) == 100.0).all()


def test_inverted_images(pairs):
    x, _ = pairs
    inverted = 1 - x
    assert torch.allclose(pcc(x, inverted), -torch.ones(4, dtype=torch.float64), atol=1e-12)
    for i in range(len(x)):
        reference = structural_similarity(
            _hwc(x[i]), _hwc(inverted[i]), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0, channel_axis=2,
        )
        assert ssim(x, inverted)[i].item() == pytest.approx(reference, abs=1e-4)
        assert reference < 0.1  # structure reversed: nothing like the original


def test_constant_images_never_give_nan(pairs):
    x, _ = pairs
    grey = torch.full_like(x, 0.5)
    black = torch.zeros_like(x)
    for a, b in ((grey, x), (x, grey), (grey, grey), (grey, black)):
        for metric in (pcc, ssim, mse, psnr):
            assert torch.isfinite(metric(a, b)).all(), metric.__name__
    assert (pcc(grey, x) == 0).all() and (pcc(grey, black) == 0).all()
    assert (pcc(grey, grey) == 1).all()
    reference = structural_similarity(_hwc(grey[0]), _hwc(black[0]), gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1.0, channel_axis=2)
    assert ssim(grey, black)[0].item() == pytest.approx(reference, abs=1e-4)


def test_whole_batch_pcc_is_the_originals_single_figure(pairs):
    x, y = pairs
    reference = np.corrcoef(x.flatten().numpy(), y.flatten().numpy())[0, 1]
    assert batch_pcc(x, y) == pytest.approx(reference, abs=1e-9)
    assert batch_pcc(x, y) != pytest.approx(pcc(x, y).mean().item(), abs=1e-3)  # a different figure


def test_summary_mean_std_and_confidence_interval():
    values = torch.tensor([0.5, 0.7, 0.9, 0.6])
    summary = summarize(values)
    std = float(np.std(values.numpy(), ddof=1))
    assert summary.mean == pytest.approx(0.675) and summary.std == pytest.approx(std)
    assert summary.ci95_high - summary.mean == pytest.approx(1.959964 * std / math.sqrt(4), rel=1e-6)
    assert summary.n == 4


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape|one shape"):
        ssim(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 15))
