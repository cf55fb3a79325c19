"""The once-per-image transform: every Pillow mode to RGB, EXIF orientation, small images, JPEG draft."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fixtures import odd_but_valid_files, photo, save_jpeg
from image_autoencoding.data.preprocess import load_image


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return odd_but_valid_files(tmp_path_factory.mktemp("odd"))


ODD_KINDS = ["grey", "cmyk", "rgba", "palette", "grey16", "exif_rotated", "small", "png_named_jpg"]


@pytest.mark.parametrize("kind", ODD_KINDS)
def test_odd_but_valid_files_are_read(odd, kind):
    pixels = load_image(odd[kind], 375, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 5  # a picture, not a blank


def test_grey_is_replicated_to_three_equal_channels(odd):
    pixels = load_image(odd["grey"], 375, 32).astype(int)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_cmyk_keeps_its_colours(tmp_path):
    red = Image.new("RGB", (80, 80), (220, 30, 30))
    path = save_jpeg(red.convert("CMYK"), tmp_path / "red_cmyk.jpg")
    r, g, b = load_image(path, 375, 16).reshape(-1, 3).mean(axis=0)
    assert r > 180 and g < 70 and b < 70


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # transparent black
    image.paste((10, 200, 10, 255), (0, 0, 20, 40))  # left half: opaque green
    image.save(tmp_path / "half.png")
    pixels = load_image(tmp_path / "half.png", 375, 40).astype(int)
    assert (pixels[:, 25:] == 255).all()
    assert np.abs(pixels[:, :15] - [10, 200, 10]).max() <= 1


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.paste(1, (0, 0, 20, 40))
    image.save(tmp_path / "palette.png", transparency=0)
    pixels = load_image(tmp_path / "palette.png", 375, 40).astype(int)
    assert (pixels[:, 25:] == 255).all() and (pixels[:, :15] == [10, 200, 10]).all()


def test_sixteen_bit_scales_instead_of_clipping(tmp_path):
    values = np.array([[0, 32896, 65535, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    pixels = load_image(tmp_path / "deep.png", 375, 4)[..., 0]
    assert pixels[0, 0] == 0 and pixels[0, 1] == 128 and pixels[0, 3] == 255


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.new("RGB", (60, 60), (255, 255, 255))
    upright.paste((0, 0, 0), (0, 0, 60, 20))  # black band at the top when viewed upright
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees anticlockwise; viewers rotate it back clockwise
    path = save_jpeg(upright.transpose(Image.Transpose.ROTATE_90), tmp_path / "phone.jpg", exif=exif.tobytes())
    pixels = load_image(path, 375, 60).mean(axis=2)
    assert pixels[:15].mean() < 40 and pixels[30:].mean() > 215


def test_image_smaller_than_crop_is_cropped_to_its_short_side_without_black_borders(tmp_path):
    path = save_jpeg(Image.new("RGB", (100, 80), (200, 180, 40)), tmp_path / "small.jpg")
    pixels = load_image(path, 375, 64)
    assert pixels.min() > 20  # the original's CenterCrop(375) would pad with black


def test_centre_crop_of_a_larger_image(tmp_path):
    image = Image.new("RGB", (500, 400), (0, 0, 0))
    image.paste((250, 250, 250), (100, 50, 400, 350))  # a 300 px white square in the middle
    image.save(tmp_path / "square.png")
    assert load_image(tmp_path / "square.png", 300, 30).min() > 240  # crop 300 sees only the square
    assert load_image(tmp_path / "square.png", 400, 40)[0, 0].max() < 10  # crop 400 reaches the black


def test_jpeg_draft_decoding_matches_a_full_decode(tmp_path):
    big = photo(0, 2000, 1500)
    path = save_jpeg(big, tmp_path / "big.jpg")
    with Image.open(path) as decoded:
        decoded.save(tmp_path / "big.png")  # the same pixels, decoded in full
    reference = load_image(tmp_path / "big.png", 375, 64)
    fast = load_image(path, 375, 64)  # decoded at 1/4 scale in the DCT domain
    assert np.abs(fast.astype(int) - reference.astype(int)).mean() < 3
