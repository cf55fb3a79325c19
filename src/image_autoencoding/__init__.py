"""Variational autoencoders for images. `import image_autoencoding as ia; vae = ia.load(RUN_DIR)`:
see `image_autoencoding.api`. Importing the package loads nothing heavy: torch is imported on
first use of the API, so the `vae` command starts fast."""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from image_autoencoding.api import DiagonalGaussian, ImageInput, TrainedVAE, load

__all__ = ["DiagonalGaussian", "ImageInput", "TrainedVAE", "__version__", "load"]

try:
    __version__ = metadata.version("image-autoencoding")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from image_autoencoding import api

        return getattr(api, name)
    raise AttributeError(f"module 'image_autoencoding' has no attribute {name!r}")
