"""Image similarity per image: PCC, SSIM, MSE, PSNR on batches (N, 3, H, W) in [0, 1].

Every function returns one value per image (shape (N,)) as float64, from inputs converted to
float32 or float64, so that the figures do not depend on the precision the model ran in.
`summarize` turns them into mean, standard deviation and a 95% confidence interval of the mean that
stays inside the figure's range (`BOUNDS`).

Definitions (the ones a reader of the literature expects):

- PCC: Pearson's correlation between all pixel values of an image (all channels) and its
  reconstruction. Undefined when either image is constant; we return 1.0 when both are constant and
  equal, else 0.0 (no linear relation can be measured), never NaN.
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 L)^2,
  C2 = (0.03 L)^2, L = 1, population (not sample) covariances, averaged over the window positions
  that lie wholly inside the image (no padding), per channel, then over channels. This equals
  scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=...)`; torchmetrics pads the borders and
  differs from it by up to 0.035 on 64x64 photographs.
- MSE: mean over pixels and channels of the squared difference.
- PSNR: 10 log10(1 / MSE) in dB, capped at PSNR_CAP for identical images (no infinities in JSON).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from image_autoencoding.config import SSIM_WINDOW

SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PSNR_CAP = 100.0  # dB; what identical images get (MSE 1e-10)
Z_95 = 1.959963984540054


def _check(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two batches of one shape (N, C, H, W), got {tuple(x.shape)} and {tuple(y.shape)}")
    return x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)


def mse(x: Tensor, y: Tensor) -> Tensor:
    x, y = _check(x, y)
    return (x - y).pow(2).flatten(1).mean(dim=1)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    error = mse(x, y)
    decibels = 10 * torch.log10(1.0 / error.clamp_min(1e-300))
    return torch.where(error > 0, decibels, torch.full_like(error, PSNR_CAP)).clamp(max=PSNR_CAP)


def pcc(x: Tensor, y: Tensor) -> Tensor:
    x, y = _check(x, y)
    x, y = x.flatten(1), y.flatten(1)
    x_centred = x - x.mean(dim=1, keepdim=True)
    y_centred = y - y.mean(dim=1, keepdim=True)
    norms = x_centred.norm(dim=1) * y_centred.norm(dim=1)
    defined = norms > 0
    value = (x_centred * y_centred).sum(dim=1) / torch.where(defined, norms, torch.ones_like(norms))
    identical = (x == y).all(dim=1).to(torch.float64)  # the constant-image rule in the module docstring
    return torch.where(defined, value, identical)


def batch_pcc(x: Tensor, y: Tensor) -> float:
    """The original project's figure: one correlation over a whole batch flattened together. It
    mixes differences between images with reconstruction quality; kept only for comparison."""
    x, y = _check(x, y)
    return float(pcc(x.reshape(1, 1, 1, -1), y.reshape(1, 1, 1, -1))[0])


def _gaussian_window(channels: int) -> Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim(x: Tensor, y: Tensor) -> Tensor:
    x, y = _check(x, y)
    n, channels, height, width = x.shape
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}")
    # The window filtering runs in float32: ten times faster than float64 on CPU, and within 1e-6 of
    # it (measured); the SSIM formula itself is evaluated in float64.
    window = _gaussian_window(channels).float()
    x32, y32 = x.float(), y.float()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=channels).double()  # no padding: valid window positions only

    mu_x, mu_y = blur(x32), blur(y32)
    var_x = blur(x32 * x32) - mu_x**2
    var_y = blur(y32 * y32) - mu_y**2
    cov = blur(x32 * y32) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    ci95_low: float
    ci95_high: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# The range each per-image figure cannot leave (MSE, reconstruction loss and KL are sums of squares
# or divergences; SSIM and PCC are correlations). PSNR has none in practice: it stays far from its
# 0 dB floor and its 100 dB cap, so its interval is the plain normal one.
BOUNDS: dict[str, tuple[float, float]] = {
    "ssim": (-1.0, 1.0), "pcc": (-1.0, 1.0), "mse": (0.0, math.inf), "recon": (0.0, math.inf), "kl": (0.0, math.inf),
}


def summarize(values: Tensor, bounds: tuple[float, float] | None = None) -> Summary:
    """Mean, sample standard deviation and a 95% confidence interval of the mean.

    Without `bounds`: the normal approximation, mean +- 1.96 sd / sqrt(n).

    With `bounds` (low, high), for a figure that cannot leave that range: the same normal
    approximation on a scale that stretches the range over the whole line, mapped back (the delta
    method): log(mean - low) when only the lower bound is finite (KL, MSE), the logit of
    (mean - low) / (high - low) when both are (SSIM, PCC; for PCC this is Fisher's z). A small split
    with a few images far out on one side (a KL ten times the others') makes the symmetric interval
    reach past the bound, to a negative KL; the transformed interval is skewed the way the data are
    and never reaches the bound. When the standard error is small next to the distance from the
    bound (hundreds of images, as a validation split has) the two intervals agree.
    """
    values = values.to(torch.float64).flatten()
    n = values.numel()
    if n == 0:
        return Summary(math.nan, 0.0, math.nan, math.nan, 0)
    mean = float(values.mean())
    std = float(values.std(unbiased=True)) if n > 1 else 0.0
    half = Z_95 * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None and half > 0:
        lower, upper = bounds
        if lower < mean < upper:
            low, high = _bounded_interval(mean, half, lower, upper)
        else:  # values rounded onto or just past a bound: no transformed scale there, so clip
            low, high = max(low, min(lower, mean)), min(high, max(upper, mean))
    return Summary(mean, std, low, high, n)


def _bounded_interval(mean: float, half: float, lower: float, upper: float) -> tuple[float, float]:
    """mean -+ half (half = 1.96 standard errors) carried over to the log or logit scale (see `summarize`)."""
    if math.isinf(upper):
        distance = mean - lower
        spread = math.exp(half / distance)  # half width on the log scale: half * d log(m - low) / dm
        return lower + distance / spread, lower + distance * spread
    width = upper - lower
    p = (mean - lower) / width
    centre, spread = math.log(p / (1 - p)), half / (width * p * (1 - p))
    return lower + width * _sigmoid(centre - spread), lower + width * _sigmoid(centre + spread)


def _sigmoid(t: float) -> float:
    # Two forms so that exp never overflows, however far from 0 t is.
    return 1 / (1 + math.exp(-t)) if t >= 0 else math.exp(t) / (1 + math.exp(t))


METRICS = {"ssim": ssim, "pcc": pcc, "mse": mse, "psnr": psnr}
