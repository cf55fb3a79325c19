"""The original's deterministic transform, applied once per image: to RGB, centre crop, resize.

Random horizontal flip and normalisation are not here: they happen per training batch on the
device (see `batches.py`), so the cached uint8 pixels stay the same for every epoch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def crop_side(width: int, height: int, image_crop: int) -> int:
    """Side of the centre crop.

    The original's `CenterCrop(375)` pads an image smaller than 375 with black borders that then
    end up in the training data. We crop to the short side instead when the image is smaller than
    the crop, so every output pixel comes from the photograph.
    """
    return min(image_crop, width, height)


def centre_crop_resize(image: Image.Image, image_crop: int, image_size: int) -> np.ndarray:
    """RGB PIL image -> uint8 array (image_size, image_size, 3)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    side = crop_side(image.width, image.height, image_crop)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        # Bilinear with antialiasing on downscale, as torchvision's Resize on PIL images.
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def grey_array_to_rgb(grey: np.ndarray, image_crop: int, image_size: int) -> np.ndarray:
    """A (H, W) uint8 grey image -> (image_size, image_size, 3), grey replicated to RGB."""
    return centre_crop_resize(Image.fromarray(grey, mode="L"), image_crop, image_size)
