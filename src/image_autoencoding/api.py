"""The Python API: a trained VAE from a run folder, a checkpoint or an export folder, used from
your own code.

    import image_autoencoding as ia
    vae = ia.load("results/vae/vae_20261130-101500")      # run folder, .pt checkpoint or export folder
    z = vae.encode(["photo.jpg", pil_image, uint8_array])  # the posterior: z.mean, z.logvar, z.sample()
    images = vae.decode(z.mean)                            # PIL images (as_tensor=True: (N, 3, S, S) in [0, 1])

Inputs go through exactly the preprocessing of the training cache (EXIF orientation, alpha on
white, 16-bit scaled, grey to RGB, centre crop data.image_crop, resize to data.image_size) with the
run's own settings, and the network runs in batches, so any number of inputs takes bounded memory
beyond the results themselves. `vae evaluate`, `sample`, `reconstruct` and `export` load runs the
same way (runs/loading.py).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from image_autoencoding.config import Config
from image_autoencoding.data.batches import Normalizer
from image_autoencoding.data.preprocess import array_to_image, load_image, prepare_image
from image_autoencoding.errors import UserError, quoted
from image_autoencoding.export import EXPORT_MIXTURE
from image_autoencoding.models.pretrained import from_pretrained, is_pretrained
from image_autoencoding.models.vae import DiagonalGaussian
from image_autoencoding.runs.latent_sampler import MixtureFile
from image_autoencoding.runs.loading import DEFAULT_CHECKPOINT, TrainedModel, load_from_checkpoint, load_from_run
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.runtime import resolve_device
from image_autoencoding.sampling.latent_mixture import LatentMixture

__all__ = ["DiagonalGaussian", "ImageInput", "TrainedVAE", "load"]

ImageInput = Union[str, Path, Image.Image, np.ndarray]  # noqa: UP007 -- a runtime alias users may import
BATCH_SIZE = 64  # images through the network at a time
SAMPLERS = ("prior", "gmm")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit unsigned seed


def load(
    path: str | Path, checkpoint: str = DEFAULT_CHECKPOINT, device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
) -> TrainedVAE:
    """A trained VAE from a run folder (its `checkpoint`: best, last, epoch_N), a `.pt` checkpoint
    file, or a `vae export` folder (read with safetensors and JSON: nothing is unpickled).
    `device`: auto (a GPU when there is one), cpu, cuda, cuda:N; `dtype`: the weights' and the
    computation's type (float32, or bfloat16 / float16 for speed)."""
    path = Path(path)
    if path.is_dir() and is_pretrained(path):
        trained = from_pretrained(path)
        mixture_file = path / EXPORT_MIXTURE
    elif path.is_dir():
        trained = load_from_run(path, checkpoint)
        mixture_file = RunPaths(path).mixture(trained.source)
    elif path.is_file():
        trained = load_from_checkpoint(path)
        mixture_file = RunPaths.holding(path).mixture(path)  # a run's own checkpoint: its mixture, if fitted to it
    else:
        raise UserError(f"'{path}' not found (expected a run folder, a .pt checkpoint or an export folder)")
    device = device if isinstance(device, torch.device) else resolve_device(device, "device")
    # Read when first sampled from (TrainedVAE.mixture), checked against the weights as loaded.
    return TrainedVAE(trained, device, dtype, mixture_file=MixtureFile.of(mixture_file, trained))


class TrainedVAE:
    """A trained encoder and decoder with the preprocessing they were trained with."""

    def __init__(self, trained: TrainedModel, device: torch.device, dtype: torch.dtype = torch.float32,
                 mixture: LatentMixture | None = None, mixture_file: MixtureFile | None = None):
        self.trained = trained  # what was loaded: config, model, source, epoch, step
        self._mixture = mixture
        self._mixture_file = mixture_file if mixture is None else None
        self.config: Config = trained.config
        self.source: Path = trained.source
        self.epoch: int = trained.epoch
        self.device = device
        self.dtype = dtype
        self.model = trained.model.to(device=device, dtype=dtype).eval()
        self.normalize = Normalizer(self.config.data, device)

    @property
    def mixture(self) -> LatentMixture | None:
        """The ex-post latent sampler (sampler="gmm"): the one a run or export has for these weights,
        read on first use (a damaged file is a UserError naming it, here and not in commands that
        never sample from it), or one set from
        sampling.latent_mixture.fit_latent_mixture(vae.encode(images).mean)."""
        if self._mixture_file is not None:
            self._mixture = self._mixture_file.read()
            self._mixture_file = None
        return self._mixture

    @mixture.setter
    def mixture(self, mixture: LatentMixture | None) -> None:
        self._mixture, self._mixture_file = mixture, None

    def to(self, device: str | torch.device) -> TrainedVAE:
        """The networks moved to `device` (auto, cpu, cuda, cuda:N); returns self."""
        self.device = device if isinstance(device, torch.device) else resolve_device(device, "device")
        self.model.to(self.device)
        self.normalize = Normalizer(self.config.data, self.device)
        return self

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def latent_size(self) -> int:
        """Floats in one image's latent: model.latent_dim for a latent vector, channels x side x side
        for a resnet's spatial latent (model.latent_channels)."""
        return self.config.model.latent_size(self.config.data.image_size)

    @property
    def latent_dim(self) -> int:
        """The old name of `latent_size` (deprecated): it read as the config's model.latent_dim, which
        differs from it for a spatial latent."""
        warnings.warn("TrainedVAE.latent_dim is deprecated: use latent_size", DeprecationWarning, stacklevel=2)
        return self.latent_size

    # -- images in ------------------------------------------------------------------------------------

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Files, Pillow images or uint8 arrays ((H, W), (H, W, 3), (H, W, 4); a 4-D array is a batch)
        -> uint8 (N, image_size, image_size, 3), as the training cache stores them."""
        return np.stack([self._pixels(item) for item in _as_list(images)])

    def _pixels(self, item: ImageInput) -> np.ndarray:
        data = self.config.data
        if isinstance(item, str | Path):
            try:
                return load_image(item, data.image_crop, data.image_size, data.max_image_pixels)
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
                raise UserError(f"image {quoted(item)} cannot be read: {exc}") from None
        if isinstance(item, Image.Image):
            return prepare_image(item, data.image_crop, data.image_size)
        if isinstance(item, np.ndarray):
            return prepare_image(array_to_image(item), data.image_crop, data.image_size)
        raise TypeError(f"expected an image path, a PIL image or a uint8 array, got {type(item).__name__}")

    def _batches(self, images: ImageInput | Sequence[ImageInput]) -> Iterator[Tensor]:
        items = _as_list(images)
        for start in range(0, len(items), BATCH_SIZE):
            yield self._normalized(self.preprocess(items[start : start + BATCH_SIZE]))

    def _normalized(self, pixels: np.ndarray) -> Tensor:
        if not (pixels.flags.c_contiguous and pixels.flags.writeable):
            # A batch's copy: torch.from_numpy warns on a read-only array, as the memory-mapped
            # training cache is (`vae encode --split`).
            pixels = np.array(pixels, order="C")
        return self.normalize(torch.from_numpy(pixels).to(self.device)).to(self.dtype)

    # -- the networks ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: ImageInput | Sequence[ImageInput]) -> DiagonalGaussian:
        """The posterior q(z|x) of each image: `.mean`, `.logvar`, `.std` (N, latent_size), in
        float32 on the model's device, and `.sample(generator)`."""
        items = _as_list(images)
        if not items:
            raise ValueError("encode: expected at least one image, got none")
        return self._posterior(self._batches(items))

    def encode_pixels(self, pixels: np.ndarray) -> DiagonalGaussian:
        """Like `encode`, for uint8 (N, image_size, image_size, 3) pixels that are preprocessed
        already, as the training cache holds them (`ImageData.train.images`): no crop or resize."""
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected pixels of shape (N, {self.image_size}, {self.image_size}, 3), "
                             f"got {pixels.shape}")
        if not len(pixels):
            raise ValueError("encode_pixels: expected at least one image, got none")
        return self._posterior(self._normalized(pixels[start : start + BATCH_SIZE])
                               for start in range(0, len(pixels), BATCH_SIZE))

    @torch.no_grad()
    def _posterior(self, batches: Iterator[Tensor]) -> DiagonalGaussian:
        means, logvars = [], []
        for x in batches:
            posterior = self.model.encoder(x)
            means.append(posterior.mean)
            logvars.append(posterior.logvar)
        # The batches' logvars are clamped to the model's own bounds already; the joined posterior
        # must keep them, not clamp again to DiagonalGaussian's defaults.
        model = self.config.model
        return DiagonalGaussian(torch.cat(means), torch.cat(logvars), model.logvar_min, model.logvar_max)

    @torch.no_grad()
    def decode(self, z: Tensor | np.ndarray, as_tensor: bool = False) -> list[Image.Image] | Tensor:
        """Latent vectors (N, latent_size) -> images: RGB Pillow images, or with `as_tensor` a float32
        tensor (N, 3, image_size, image_size) in [0, 1] on the CPU."""
        z = torch.as_tensor(z)
        if z.ndim == 1:
            z = z.unsqueeze(0)
        if z.ndim != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"expected latent vectors of shape (N, {self.latent_size}), got {tuple(z.shape)}")
        parts = [self.normalize.to_unit(self.model.decoder(chunk.to(self.device, self.dtype))).cpu()
                 for chunk in z.split(BATCH_SIZE)]
        images = torch.cat(parts)
        return images if as_tensor else to_pil(images)

    def reconstruct(self, images: ImageInput | Sequence[ImageInput], as_tensor: bool = False
                    ) -> list[Image.Image] | Tensor:
        """Encode, then decode the posterior mean (deterministic), as `vae reconstruct` does."""
        return self.decode(self.encode(images).mean, as_tensor)

    def sample_latents(self, n: int, temperature: float = 1.0, seed: int | None = None, sampler: str = "prior"
                       ) -> Tensor:
        """n latent vectors, drawn on the CPU (the same seed gives the same vectors on every device,
        and the same images as `vae sample --seed`): from the prior N(0, temperature^2 I), or with
        sampler="gmm" from the Gaussian mixture fitted to the training images' latents (Ghosh et
        al. 2020), each component's spread scaled by `temperature`."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"n: expected a whole number of images, got {n!r}")
        if n < 1:
            raise ValueError(f"n: expected a number of images >= 1, got {n}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed: expected an integer, got {seed!r}")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed: expected an integer from 0 to 2**64-1, got {seed}")
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
        generator = torch.Generator()
        generator.manual_seed(seed) if seed is not None else generator.seed()
        if sampler == "prior":
            return torch.randn(n, self.latent_size, generator=generator) * temperature
        if self.mixture is None:
            raise ValueError(f"sampler 'gmm': no latent mixture fitted to these weights ({self.source}); "
                             "`vae sample RUN_DIR --sampler gmm` fits and saves one")
        return self.mixture.sample(n, generator, temperature)

    def sample(self, n: int, temperature: float = 1.0, seed: int | None = None, as_tensor: bool = False,
               sampler: str = "prior") -> list[Image.Image] | Tensor:
        """n images decoded from latent vectors of the prior (or with sampler="gmm" of the latent
        mixture, see `sample_latents`)."""
        return self.decode(self.sample_latents(n, temperature, seed, sampler), as_tensor)

    def interpolate(self, a: ImageInput | Tensor, b: ImageInput | Tensor, steps: int = 8, as_tensor: bool = False
                    ) -> list[Image.Image] | Tensor:
        """`steps` images along the straight line between the posterior means of images a and b
        (or between two latent vectors), both ends included."""
        if steps < 2:
            raise ValueError(f"steps: expected at least 2, got {steps}")
        ends = [end.to(self.device).float().view(1, -1) if isinstance(end, Tensor) else self.encode([end]).mean
                for end in (a, b)]
        weights = torch.linspace(0, 1, steps, device=self.device).view(steps, 1)
        return self.decode(ends[0] * (1 - weights) + ends[1] * weights, as_tensor)


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, str | Path | Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> RGB Pillow images, rounded as torchvision's save_image rounds."""
    pixels = images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(image) for image in pixels]
