"""Training batches: every image once per epoch, about half of them mirrored, the cache untouched,
and a resumed epoch sees the batches an uninterrupted one would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from image_autoencoding.cli import main
from image_autoencoding.config import ConfigError, load_config
from image_autoencoding.data.batches import Normalizer, training_batches
from image_autoencoding.data.device_split import MappedSplit, ResidentSplit, training_split
from image_autoencoding.runs.checkpoint import load_checkpoint


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


# Where batches are drawn (data.on_device): a copy of the split on the training device gives the batches
# the memory-mapped cache gives, step for step, bit for bit.
CASES = {
    "first epoch, a partial last batch of 8 kept": {},
    "another epoch": {"epoch": 2},
    "resumed inside the epoch": {"start_step": 3},
    "without flips": {"flip": False},
    "max_steps": {"max_steps": 2},
    "a partial last batch of one image, dropped": {"n": 193},
    **{f"rank {r} of {w}": {"rank": r, "world_size": w, "start_step": 1} for w in (2, 3) for r in range(w)},
    "rank 1 of 3, partial global batch dropped, max_steps": {"rank": 1, "world_size": 3, "batch_size": 16,
                                                             "max_steps": 3},
}


@pytest.mark.parametrize("case", CASES)
def test_batches_drawn_on_the_device_are_those_of_the_cache(images, case):
    settings = {"n": 200, "batch_size": 32, "epoch": 1, **CASES[case]}
    n, batch_size, epoch = settings.pop("n"), settings.pop("batch_size"), settings.pop("epoch")
    device = torch.device("cpu")
    normalize = Normalizer(load_config().data, device)
    cached = list(training_batches(images[:n], batch_size, 5, epoch, device, normalize, **settings))
    resident = list(training_split(images[:n], True, device).batches(batch_size, 5, epoch, normalize, **settings))
    assert len(resident) == len(cached) > 0
    assert all(torch.equal(a, b) for a, b in zip(resident, cached, strict=True))


def test_a_step_on_the_device_reads_nothing_from_the_host(images):
    """Per step: no tensor made from host memory (a copy to the device) and no device value read on
    the host (a wait for the device); the epoch's plan is copied once, before the first step."""

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    device = torch.device("cpu")
    normalize = Normalizer(load_config().data, device)
    batches = training_split(images, True, device).batches(16, 5, 1, normalize, rank=1, world_size=2)
    next(batches)
    with Calls() as calls:
        steps = sum(1 for _ in batches)
    assert steps == 5 and "index_select.default" in calls.names
    assert not {"lift_fresh.default", "_local_scalar_dense.default"} & set(calls.names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_on_a_gpu_are_those_of_the_cache_and_never_wait_for_it(images):
    device = torch.device("cuda")
    normalize = Normalizer(load_config().data, device)
    cached = list(training_batches(images, 16, 5, 1, device, normalize, start_step=1, rank=1, world_size=2))
    split = training_split(images, True, device)
    assert isinstance(split, ResidentSplit)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        resident = list(split.batches(16, 5, 1, normalize, start_step=1, rank=1, world_size=2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(resident, cached, strict=True))


def test_auto_keeps_the_cache_memory_mapped_on_the_cpu(images):
    device = torch.device("cpu")
    split = training_split(images, "auto", device)
    assert isinstance(split, MappedSplit) and split.description == "memory-mapped cache (data.on_device=auto on cpu)"
    assert isinstance(training_split(images, False, device), MappedSplit)
    assert isinstance(training_split(images, True, device), ResidentSplit)


def test_a_split_too_large_for_the_gpu_falls_back_or_is_refused_in_one_line(images, monkeypatch):
    """The GPU's memory as torch.cuda.mem_get_info reports it: 60 of 100 bytes free per image."""
    per_image = images[0].nbytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * per_image, 100 * per_image))
    gpu = torch.device("cuda:0")
    # More than a quarter of the device: auto keeps the memory-mapped cache, pinned copies.
    split = training_split(images[:26], "auto", gpu)
    assert isinstance(split, MappedSplit) and split.description.startswith("memory-mapped cache, pinned copies")
    refusal = (r"^data.on_device=true: the training split \(.* GB\) does not fit in cuda:0's free memory "
               r"\(.* GB of .* GB\); set data.on_device=auto or false$")
    with pytest.raises(ConfigError, match=refusal):
        training_split(images[:61], True, gpu)


@pytest.mark.parametrize("value", ["maybe", "1", "null"])
def test_data_on_device_takes_auto_true_or_false(value):
    assert load_config(None, ["data.on_device=true"]).data.on_device is True
    assert load_config().data.on_device == "auto"
    with pytest.raises(ConfigError, match=f"^override 'data.on_device={value}': config key 'data.on_device': "
                                          "expected auto, true or false"):
        load_config(None, [f"data.on_device={value}"])


def test_training_on_the_device_ends_with_the_weights_of_the_cache(tiny, tmp_path, one_thread, no_final_report):
    """Two epochs with the split copied to the device (the CPU here) and two from the memory-mapped
    cache: the same weights, bit for bit; the log says which path each took. A run may resume with
    the other."""
    weights = {}
    for on_device in ("false", "true"):
        out = tmp_path / on_device
        assert main(["train", "--quiet", *tiny, "train.epochs=2", f"data.on_device={on_device}",
                     f"train.output_dir={out}"]) == 0
        (run,) = (out / "results" / "vae").iterdir()
        weights[on_device] = load_checkpoint(run / "checkpoints/last.pt").model
        assert (run / "train.log").read_text().count("training batches: ") == 1
    assert weights["false"].keys() == weights["true"].keys()
    assert all(torch.equal(weights["false"][key], weights["true"][key]) for key in weights["false"])
    log = (run / "train.log").read_text()
    assert "training batches: resident on cpu (" in log
    assert "training batches: memory-mapped cache (data.on_device=false)" in (
        next((tmp_path / "false" / "results" / "vae").iterdir()) / "train.log").read_text()
    assert main(["train", "--quiet", "--resume", str(run), "train.epochs=3", "data.on_device=false"]) == 0
    assert "training batches: memory-mapped cache (data.on_device=false)" in (run / "train.log").read_text()


def test_a_split_the_gpu_cannot_hold_is_refused_before_a_run_folder_is_made(tiny, tmp_path, monkeypatch, capsys):
    """data.on_device=true on a GPU with 1 MB free (the GPU as torch.cuda reports it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**6, 10**9))
    assert main(["train", "--quiet", *tiny, "train.device=cuda:0", "data.on_device=true"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("vae: error: data.on_device=true: the training split (")
    assert line.endswith(" does not fit in cuda:0's free memory (0.001 GB of 1 GB); set data.on_device=auto or false")
    assert list((tmp_path / "results" / "vae").iterdir()) == []  # no run folder
