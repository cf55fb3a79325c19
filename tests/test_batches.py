"""Training batches: every image once per epoch, about half of them mirrored, the cache untouched,
and a resumed epoch sees the batches an uninterrupted one would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from image_autoencoding.config import load_config
from image_autoencoding.data.batches import Normalizer, training_batches


@pytest.fixture
def images(tmp_path) -> np.ndarray:
    """200 distinct 6x6 images in a read-only memory map, like the cache."""
    rng = np.random.default_rng(0)
    path = tmp_path / "pixels.npy"
    pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(200, 6, 6, 3))
    pixels[:] = rng.integers(0, 256, size=pixels.shape, dtype=np.uint8)
    pixels.flush()
    return np.load(path, mmap_mode="r")


def _to_pixels(x: torch.Tensor, normalize: Normalizer) -> np.ndarray:
    return (normalize.to_unit(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_each_image_once_per_epoch_about_half_mirrored(images):
    device = torch.device("cpu")
    normalize = Normalizer(load_config().data, device)
    before = np.array(images)
    seen = np.concatenate([_to_pixels(x, normalize) for x in training_batches(images, 32, 5, 1, device, normalize)])
    assert len(seen) == len(images)
    as_stored = {image.tobytes(): i for i, image in enumerate(images)}
    mirrored = {image[:, ::-1].tobytes(): i for i, image in enumerate(images)}
    which = [as_stored.get(image.tobytes(), mirrored.get(image.tobytes())) for image in seen]
    assert sorted(which) == list(range(len(images)))  # each image once, as stored or mirrored
    flipped = sum(image.tobytes() in mirrored for image in seen)
    assert 70 <= flipped <= 130  # RandomHorizontalFlip(p=0.5): 100 expected, sd 7
    assert np.array_equal(np.asarray(images), before)  # flipped on a copy, never in the cache

    # Another epoch: another order and other flips, each image still once.
    other = np.concatenate([_to_pixels(x, normalize) for x in training_batches(images, 32, 5, 2, device, normalize)])
    assert not np.array_equal(other, seen)


def test_a_resumed_epoch_sees_the_same_batches_and_flips(images):
    device = torch.device("cpu")
    normalize = Normalizer(load_config().data, device)
    whole = list(training_batches(images, 32, 5, 1, device, normalize))
    rest = list(training_batches(images, 32, 5, 1, device, normalize, start_step=3))
    assert len(rest) == len(whole) - 3
    assert all(torch.equal(a, b) for a, b in zip(whole[3:], rest, strict=True))


def test_without_random_flip_every_image_is_seen_as_stored(images):
    device = torch.device("cpu")
    normalize = Normalizer(load_config().data, device)
    seen = np.concatenate([_to_pixels(x, normalize)
                           for x in training_batches(images, 32, 5, 1, device, normalize, flip=False)])
    as_stored = {image.tobytes() for image in images}
    assert len(seen) == len(images) and all(image.tobytes() in as_stored for image in seen)
    # The same order as with flips: switching them off changes nothing else.
    flipped = np.concatenate([_to_pixels(x, normalize) for x in training_batches(images, 32, 5, 1, device, normalize)])
    assert all(np.array_equal(a, b) or np.array_equal(a, b[:, ::-1]) for a, b in zip(seen, flipped, strict=True))


def test_under_torchrun_each_rank_takes_a_shuffled_share_of_the_global_batch():
    """The cache is ordered by class: a share cut from the batch sorted by index would give rank 0
    the lowest-index (first classes') images of every step."""
    images = np.zeros((96, 2, 2, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(96)  # each image says its index
    device = torch.device("cpu")
    normalize = Normalizer(load_config().data, device)

    def indices(x: torch.Tensor) -> list[int]:
        return _to_pixels(x, normalize)[:, 0, 0, 0].tolist()

    one = [indices(x) for x in training_batches(images, 32, 5, 1, device, normalize, flip=False)]
    ranks = [[indices(x) for x in training_batches(images, 16, 5, 1, device, normalize, rank=r, world_size=2,
                                                    flip=False)] for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 3
    for whole, first, second in zip(one, *ranks, strict=True):
        assert sorted(first + second) == whole  # together: the global batch, each image once
        assert first == sorted(first) and second == sorted(second)  # each share read front to back
    assert all(max(first) > min(second) for first, second in zip(*ranks, strict=True))
