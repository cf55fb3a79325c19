"""The original's deterministic transform, applied once per image: open, to RGB, centre crop, resize.

Random horizontal flip and normalisation are not here: they happen per training batch on the
device (see `batches.py`), so the cached uint8 pixels stay the same for every epoch.

Decisions, each one a place where the original's torchvision pipeline did something a user would
not want (or crashed):

- EXIF orientation is applied. A phone photo stored sideways with an orientation tag is shown
  upright by every viewer; torchvision's PIL loader ignores the tag, so the original trained on
  sideways pictures.
- Transparent images (RGBA, LA, palette with transparency) are composited on white, the background
  every image viewer and browser shows them on; dropping alpha instead exposes whatever colour the
  transparent pixels happen to store (often black).
- 16-bit images are scaled to 8 bits (value / 257, so 65535 -> 255); Pillow's own conversion clips
  everything above 255 to white.
- An image smaller than the crop is cropped to its short side (see `crop_side`), never padded.
- JPEGs much larger than needed are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's
  `draft`), never below the resolution the final resize needs, which makes decoding several times
  faster.
"""

from __future__ import annotations

import math
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

TRANSPARENT_BACKGROUND = (255, 255, 255)


def crop_side(width: int, height: int, image_crop: int) -> int:
    """Side of the centre crop.

    The original's `CenterCrop(375)` pads an image smaller than 375 with black borders that then
    end up in the training data. We crop to the short side instead when the image is smaller than
    the crop, so every output pixel comes from the photograph.
    """
    return min(image_crop, width, height)


def centre_crop_resize(image: Image.Image, image_crop: float, image_size: int) -> np.ndarray:
    """RGB PIL image -> uint8 array (image_size, image_size, 3).

    `image_crop` may be fractional: a JPEG decoded at reduced scale crops the same part of the
    picture as a full decode would, so both give (nearly) the same pixels.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    side = min(float(image_crop), image.width, image.height)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    # Crop to whole pixels first, so the resize filter never reads outside the crop (as the
    # original's CenterCrop then Resize), then resize the exact, possibly fractional, square.
    x0, y0 = math.floor(left), math.floor(top)
    image = image.crop((x0, y0, math.ceil(left + side), math.ceil(top + side)))
    box = (left - x0, top - y0, left - x0 + side, top - y0 + side)
    if image.size != (image_size, image_size) or box != (0, 0, image_size, image_size):
        # Bilinear with antialiasing on downscale, as torchvision's Resize on PIL images.
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(image, dtype=np.uint8)


def prepare_image(image: Image.Image, image_crop: float, image_size: int) -> np.ndarray:
    """A decoded Pillow image -> uint8 (image_size, image_size, 3): upright (EXIF), RGB, centre
    crop, resize. What every image file goes through (`load_image`), and an image given in memory."""
    return centre_crop_resize(to_rgb(ImageOps.exif_transpose(image)), image_crop, image_size)


def array_to_image(array: np.ndarray) -> Image.Image:
    """A uint8 image array, (H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA -> a Pillow image."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array (0-255), got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def grey_array_to_rgb(grey: np.ndarray, image_crop: int, image_size: int) -> np.ndarray:
    """A (H, W) uint8 grey image -> (image_size, image_size, 3), grey replicated to RGB."""
    return centre_crop_resize(Image.fromarray(grey, mode="L"), image_crop, image_size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, following the rules in the module docstring."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey (PNG / TIFF). Scale, never clip.
        grey = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # Float images are taken as [0, 1] when they fit, otherwise as 8-bit values.
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, TRANSPARENT_BACKGROUND)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's conversions (CMYK JPEGs from Adobe are inverted on decode).
    return image.convert("RGB")


def _request_draft(image: Image.Image, image_crop: int, image_size: int) -> None:
    """Ask a JPEG to decode at the smallest DCT scale that still leaves >= image_size pixels in the crop."""
    if image.format != "JPEG":
        return
    side = crop_side(image.width, image.height, image_crop)
    shrink = side / image_size
    if shrink < 2:
        return
    image.draft(image.mode, (math.ceil(image.width / shrink), math.ceil(image.height / shrink)))


class ImageTooLarge(Image.DecompressionBombError):
    """More pixels than the limit (`data.max_image_pixels`): refused before any pixel is decoded."""


# Pillow's size check at open reads the module global Image.MAX_IMAGE_PIXELS; the lock keeps two
# threads from interleaving its save and restore.
_PILLOW_LIMIT = threading.Lock()


def _open_within_limit(path: str | Path | BinaryIO, max_pixels: int | None) -> Image.Image:
    """Image.open with our size check in place of Pillow's. Pillow's warns (an exception under
    `python -W error`) between its limit and twice it, and above refuses quoting twice its own limit;
    the limit a user sets and must read in the message is `data.max_image_pixels`."""
    with _PILLOW_LIMIT:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    pixels = image.width * image.height
    if max_pixels is not None and pixels > max_pixels:
        image.close()
        raise ImageTooLarge(
            f"{pixels} pixels ({image.width}x{image.height}), more than data.max_image_pixels ({max_pixels}) allows"
        )
    return image


def load_image(
    path: str | Path | BinaryIO, image_crop: int, image_size: int, max_pixels: int | None = None
) -> np.ndarray:
    """Decode one image file into uint8 (image_size, image_size, 3).

    `max_pixels`: refuse larger pictures (decompression bombs) with `ImageTooLarge` before decoding;
    by default Pillow's Image.MAX_IMAGE_PIXELS, which the cache sets to `data.max_image_pixels`.
    Raises OSError / ValueError / Image.DecompressionBombError for files that cannot be used; the
    caller records the reason and skips the file.
    """
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS
    with _open_within_limit(path, max_pixels) as image, warnings.catch_warnings():
        # A frame or tile past Pillow's limit (multi-frame GIF, tiled TIFF) is refused too, not warned about.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            full_width = image.width
            crop: float = image_crop
            _request_draft(image, image_crop, image_size)
            image.load()
            if image.width != full_width:
                # Decoded at reduced scale: the crop shrinks by the same factor.
                crop = image_crop * image.width / full_width
            return prepare_image(image, crop, image_size)
        except Image.DecompressionBombWarning as exc:
            raise ImageTooLarge(str(exc)) from None
