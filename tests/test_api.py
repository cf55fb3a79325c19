"""The Python API (`import image_autoencoding as ia`): one loader for a run folder, a checkpoint and
an export folder; inputs preprocessed exactly as the training cache; the CLI's commands through it."""

from __future__ import annotations

import errno
import json
import pickle
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import image_autoencoding as ia
from conftest import TINY
from fixtures import odd_but_valid_files, photo, save_jpeg
from helpers.disks import full_disk
from image_autoencoding.cli import main
from image_autoencoding.config import load_config
from image_autoencoding.data.cache import open_or_build
from image_autoencoding.data.sources import FileSplit
from image_autoencoding.errors import UserError
from image_autoencoding.models import pretrained as pretrained_module
from image_autoencoding.models.factory import build_model
from image_autoencoding.runs.checkpoint import CheckpointError, load_checkpoint
from image_autoencoding.runs.loading import TrainedModel
from image_autoencoding.runs.resume import prepare_resume

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api")
    assert main(["train", "data.dataset=digits", *TINY, f"train.output_dir={out}", "train.epochs=2",
                 "train.checkpoint_every=1", "data.image_size=16"]) == 0
    (run_dir,) = (out / "results" / "vae").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def onnx_exported(run, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime", reason="vae export --onnx needs onnxruntime (the onnx extra)")
    pytest.importorskip("onnxscript", reason="vae export --onnx needs onnxscript (the onnx extra)")
    out = tmp_path_factory.mktemp("onnx") / "export"
    assert main(["export", str(run), "--out", str(out), "--onnx"]) == 0
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    return [save_jpeg(photo(i, 90, 70), folder / f"p{i}.jpg") for i in range(3)]


def test_a_run_folder_a_checkpoint_and_an_export_give_the_same_reconstructions(run, exported, photos):
    results = [ia.load(path, device="cpu").reconstruct(photos, as_tensor=True)
               for path in (run, run / "checkpoints" / "best.pt", exported)]
    assert results[0].shape == (3, 3, 16, 16) and 0 <= results[0].min() and results[0].max() <= 1
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_loading_an_export_unpickles_nothing(exported, monkeypatch, photos):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading an export")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    vae = ia.load(exported, device="cpu")
    assert vae.reconstruct(photos[0]).__len__() == 1


def test_inputs_are_preprocessed_exactly_as_the_training_cache(tmp_path):
    """Odd files (grey, CMYK, alpha, palette, 16-bit, EXIF-rotated, smaller than the crop, a PNG named
    .jpg): the API's pixels equal the cache's rows bit for bit, with a crop and size of the run's own."""
    files = list(odd_but_valid_files(tmp_path / "odd").values())
    config = load_config(None, [*TINY, "data.image_size=24", "data.image_crop=100",
                                f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=1"])
    cached = open_or_build(FileSplit(tmp_path / "odd", files, np.zeros(len(files), dtype=np.int64)), config.data,
                           "train", progress=False)
    assert not cached.bad_files
    vae = ia.TrainedVAE(TrainedModel(config, build_model(config.model, 24), tmp_path, 0, 0), torch.device("cpu"))
    assert np.array_equal(vae.preprocess(files), np.asarray(cached.images))


def test_pil_images_and_uint8_arrays_are_inputs_like_files(run, tmp_path):
    vae = ia.load(run, device="cpu")
    png = tmp_path / "x.png"
    photo(3, 60, 48).save(png)
    pixels = np.asarray(Image.open(png).convert("RGB"))
    from_file = vae.encode(png).mean
    assert torch.equal(vae.encode(Image.open(png)).mean, from_file)
    assert torch.equal(vae.encode(pixels).mean, from_file)
    assert torch.equal(vae.encode(pixels[None]).mean, from_file)  # a 4-D array is a batch
    grey = np.asarray(Image.open(png).convert("L"))
    assert vae.encode([grey, pixels, Image.open(png)]).mean.shape == (3, vae.latent_size)
    with pytest.raises(ValueError, match="uint8"):
        vae.encode(pixels.astype(np.float32))
    with pytest.raises(TypeError, match="image path, a PIL image or a uint8 array"):
        vae.encode([3.5])


def test_many_inputs_go_through_the_network_in_batches_with_the_results_of_one_at_a_time(run):
    vae = ia.load(run, device="cpu")
    images = [np.asarray(photo(i, 20, 20)) for i in range(70)]  # more than one batch of 64
    together = vae.encode(images)
    alone = torch.cat([vae.encode(image).mean for image in images[62:66]])
    assert together.mean.shape == (70, vae.latent_size)
    torch.testing.assert_close(together.mean[62:66], alone, rtol=1e-5, atol=1e-5)
    decoded = vae.decode(together.mean)
    assert len(decoded) == 70 and decoded[0].size == (16, 16) and decoded[0].mode == "RGB"


def test_samples_and_interpolations(run, photos):
    vae = ia.load(run, device="cpu")
    first, again = vae.sample(5, seed=3, as_tensor=True), vae.sample(5, seed=3, as_tensor=True)
    assert torch.equal(first, again) and first.shape == (5, 3, 16, 16)
    assert not torch.equal(first, vae.sample(5, seed=4, as_tensor=True))
    path = vae.interpolate(photos[0], photos[1], steps=6, as_tensor=True)
    assert path.shape == (6, 3, 16, 16)
    ends = vae.reconstruct(photos[:2], as_tensor=True)
    torch.testing.assert_close(path[[0, -1]], ends, rtol=0, atol=1e-6)  # both ends included
    with pytest.raises(ValueError, match="temperature"):
        vae.sample(2, temperature=0)


def test_bfloat16_weights_give_nearly_the_float32_reconstructions(run, photos):
    exact = ia.load(run, device="cpu").reconstruct(photos, as_tensor=True)
    fast = ia.load(run, device="cpu", dtype=torch.bfloat16)
    assert next(fast.model.parameters()).dtype == torch.bfloat16
    approximate = fast.reconstruct(photos, as_tensor=True)
    assert approximate.dtype == torch.float32 and (approximate - exact).abs().max() < 0.1


def test_vae_sample_writes_the_images_of_the_api(run, tmp_path):
    assert main(["sample", str(run), "-n", "3", "--seed", "5", "--out", str(tmp_path)]) == 0
    api = ia.load(run, device="cpu").sample(3, seed=5)
    for i, image in enumerate(api):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"sample_{i:04d}.png").convert("RGB")),
                              np.asarray(image))


def test_vae_reconstruct_writes_the_api_reconstruction_at_a_size_a_person_can_see(run, photos, tmp_path):
    assert main(["reconstruct", str(run), str(photos[0]), "--out", str(tmp_path)]) == 0
    picture = Image.open(tmp_path / "p0_reconstruction.png").convert("RGB")
    assert min(picture.size) >= 256
    scale = 256 // 16  # 16 px images enlarged by a whole factor, nearest neighbour; 2 px padding
    grid = np.asarray(picture)
    output = grid[2 + 16 * scale + 2 :: scale, 2::scale][:16, :16]  # the second tile: the reconstruction
    expected = np.asarray(ia.load(run, device="cpu").reconstruct(photos[0])[0])
    assert np.array_equal(output, expected)


def test_export_defaults_to_best_like_every_other_command(run, tmp_path):
    """best.pt is replaced by epoch 1's checkpoint: the export must be of epoch 1, not of last.pt's 2."""
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(run, copy)
    shutil.copy(copy / "checkpoints" / "epoch_1.pt", copy / "checkpoints" / "best.pt")
    assert main(["export", str(copy)]) == 0
    description = json.loads((copy / "export" / "config.json").read_text())
    assert description["epoch"] == 1 and description["source_checkpoint"].endswith("best.pt")
    assert description["data"]["image_size"] == 16 and "image_crop" in description["data"]


@pytest.mark.parametrize("name", ["last", "last.pt", "epoch_1", "epoch_1.pt", "checkpoints/epoch_1.pt"])
def test_every_command_takes_the_same_checkpoint_names(run, tmp_path, monkeypatch, name):
    """--checkpoint NAME|PATH names the same file for the commands that read a run (ia.load, which
    evaluate, sample, reconstruct and encode go through; export) and for a resume."""
    monkeypatch.chdir(run)  # checkpoints/epoch_1.pt: a path, relative to the working folder
    expected = (run / "checkpoints" / Path(name).name.removesuffix(".pt")).with_suffix(".pt").resolve()
    assert ia.load(run, name, device="cpu").source.resolve() == expected
    assert main(["export", str(run), "--checkpoint", name, "--out", str(tmp_path / "export")]) == 0
    description = json.loads((tmp_path / "export" / "config.json").read_text())
    assert Path(description["source_checkpoint"]).resolve() == expected
    assert prepare_resume(run, name, []).checkpoint.resolve() == expected


def test_best_is_last_for_what_reads_a_run_without_best_pt_but_a_resume_from_best_needs_it(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "checkpoints" / "best.pt").unlink()
    assert ia.load(copy, device="cpu").source == copy / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match=r"best\.pt' not found$"):
        prepare_resume(copy, "best", [])


def test_onnx_export_matches_torch_in_onnxruntime(onnx_exported):
    import onnxruntime

    out = onnx_exported
    vae = ia.load(out, device="cpu")
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 7):  # a dynamic batch axis
        x = torch.randn(batch, 3, 16, 16, generator=generator)
        z = torch.randn(batch, vae.latent_size, generator=generator)
        encoder = onnxruntime.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
        decoder = onnxruntime.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
        mean, logvar = encoder.run(["mean", "logvar"], {"image": x.numpy()})
        (image,) = decoder.run(["image"], {"z": z.numpy()})
        with torch.no_grad():
            posterior = vae.model.encoder(x)
            np.testing.assert_allclose(mean, posterior.mean.numpy(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(logvar, posterior.logvar.numpy(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(image, vae.model.decoder(z).numpy(), rtol=0, atol=1e-4)


def test_vae_encode_writes_the_latents_of_a_split_or_of_files(run, photos, tmp_path):
    assert main(["encode", str(run), "--split", "valid", "-o", str(tmp_path / "valid.npz")]) == 0
    saved = np.load(tmp_path / "valid.npz")
    assert saved["mean"].shape == (359, 8) == saved["logvar"].shape and saved["labels"].shape == (359,)
    assert list(saved["class_names"]) == [str(d) for d in range(10)]
    assert main(["encode", str(run), *map(str, photos), "-o", str(tmp_path / "files.npz")]) == 0
    files = np.load(tmp_path / "files.npz")
    expected = ia.load(run, device="cpu").encode(photos).mean.numpy()
    assert np.array_equal(files["mean"], expected) and list(files["files"]) == list(map(str, photos))


def test_vae_config_prints_the_resolved_configuration_and_version(capsys, tmp_path):
    import yaml

    assert main(["config", "--config", str(REPO / "configs/demo.yaml"), "train.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 3 and printed["data"]["dataset"] == "digits"
    assert printed == load_config(REPO / "configs/demo.yaml", ["train.epochs=3"]).to_dict()
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and re.fullmatch(r"vae \S+\n", capsys.readouterr().out)


def test_loading_something_else_is_one_line(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "encoder.safetensors").write_bytes(b"")
    with pytest.raises(ia.api.UserError, match="not an image-autoencoding export"):
        ia.load(tmp_path)


def test_the_readme_python_example_runs_as_written(run, tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert "ia.load(" in block
    code = re.sub(r"results/vae/vae_\d{8}-\d{6}", str(run), block)
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(("photo.jpg", "other.jpg")):
        save_jpeg(photo(i), tmp_path / name)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert Image.open(tmp_path / "photo_reconstruction.png").size == (16, 16)
    assert len(namespace["samples"]) == 16 and len(namespace["steps"]) == 8


def test_importing_the_package_loads_no_torch():
    code = "import sys, image_autoencoding; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_checkpoint_holds_the_weights_the_api_uses(run):
    vae = ia.load(run, checkpoint="last", device="cpu")
    state = load_checkpoint(run / "checkpoints" / "last.pt").model
    assert all(torch.equal(v, state[k]) for k, v in vae.model.state_dict().items())


def test_vae_reconstruct_does_not_crop_twice_when_the_crop_is_smaller_than_the_size(tmp_path, photos):
    """data.image_crop below data.image_size: the cache crops 12 px and enlarges to 16. The command
    must reconstruct those pixels, not crop the 16 px result again."""
    assert main(["train", "data.dataset=digits", *TINY, f"train.output_dir={tmp_path}", "train.epochs=1",
                 "data.image_size=16", "data.image_crop=12", "train.tsne_points=0"]) == 0
    (run,) = (tmp_path / "results" / "vae").iterdir()
    assert main(["reconstruct", str(run), str(photos[0]), "--out", str(tmp_path / "out")]) == 0
    grid = np.asarray(Image.open(tmp_path / "out" / "p0_reconstruction.png").convert("RGB"))
    scale = 256 // 16
    output = grid[2 + 16 * scale + 2 :: scale, 2::scale][:16, :16]
    assert np.array_equal(output, np.asarray(ia.load(run, device="cpu").reconstruct(photos[0])[0]))


def test_the_api_posterior_keeps_the_logvar_bounds_the_model_was_configured_with(tmp_path):
    """model.logvar_max=60 and an encoder whose log-variance is 40: the API must give the model's own
    posterior (40), not one clamped again to the default bound of 20."""
    config = load_config(None, [*TINY, "model.logvar_min=-60", "model.logvar_max=60"])
    model = build_model(config.model, 16).eval()
    with torch.no_grad():
        model.encoder.to_logvar.weight.zero_()
        model.encoder.to_logvar.bias.fill_(40.0)
    vae = ia.TrainedVAE(TrainedModel(config, model, tmp_path, 0, 0), torch.device("cpu"))
    pixels = np.array(photo(0, 16, 16))[None]
    with torch.no_grad():
        own = model.encoder(vae._normalized(pixels)).logvar
    assert torch.equal(own, torch.full_like(own, 40.0))
    assert torch.equal(vae.encode_pixels(pixels).logvar, own)


def _another_checkpoint(run: Path) -> str:
    """A checkpoint of the run whose weights are not best.pt's (the default export's)."""
    return "epoch_1" if load_checkpoint(run / "checkpoints" / "best.pt").epoch == 2 else "last"


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_an_export_replaces_the_whole_folder_of_an_earlier_one(run, onnx_exported, tmp_path):
    """An export with --onnx and the latent mixture, then another checkpoint's export (no --onnx,
    no mixture) into the same folder: none of the first export's files may stay beside the new weights."""
    out = tmp_path / "export"
    shutil.copytree(onnx_exported, out)
    assert {"encoder.onnx", "decoder.onnx", "latent_gmm.safetensors"} <= set(_files(out))
    assert main(["export", str(run), "--checkpoint", _another_checkpoint(run), "--out", str(out)]) == 0
    assert sorted(_files(out)) == ["config.json", "decoder.safetensors", "encoder.safetensors"]
    vae = ia.load(out, device="cpu")
    assert vae.mixture is None and vae.epoch != load_checkpoint(run / "checkpoints" / "best.pt").epoch
    assert [path.name for path in tmp_path.iterdir()] == ["export"]  # no temporary folder left


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk full", "interrupted"])
def test_an_export_failing_midway_leaves_the_earlier_export_whole(run, exported, tmp_path, monkeypatch, capsys,
                                                                  failure):
    """The new weights are written, then writing config.json fails: the folder must still hold the
    earlier export exactly, not the new weights under the old config.json."""
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    before = _files(out)
    write = pretrained_module.atomic_write

    def fail_at_the_description(path, *args, **kwargs):
        if Path(path).name == "config.json":
            raise failure
        write(path, *args, **kwargs)

    monkeypatch.setattr(pretrained_module, "atomic_write", fail_at_the_description)
    args = ["export", str(run), "--checkpoint", _another_checkpoint(run), "--out", str(out)]
    if isinstance(failure, OSError):
        assert main(args) == 2
        (error,) = capsys.readouterr().err.strip().splitlines()
        assert str(out) in error and "No space left on device" in error
    else:
        assert main(args) == 130
    assert _files(out) == before
    assert [path.name for path in tmp_path.iterdir()] == ["export"]  # no temporary folder left


def test_an_export_never_replaces_a_folder_that_is_not_an_export(run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--out", str(out)]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert str(out) in error and "not an export" in error
    assert _files(out) == {"notes.txt": b"keep me"} and list(tmp_path.iterdir()) == [out]


# Every architecture's keys as the versions before each had its own wrote them in config.yaml, in
# checkpoints and in exports (Config().to_dict()), whatever model.arch was.
EVERY_ARCHS_MODEL_KEYS = {
    "resnet_channels": [32, 64, 128], "resnet_blocks": 1, "latent_channels": None, "kernel_size": 5, "stride": 2,
    "padding": 2, "encoder_channels": [64, 128, 256], "decoder_channels": [256, 128, 32, 3], "fc_dim": 1024,
}


def test_a_run_and_an_export_saved_with_every_architectures_keys_load_and_resume(run, exported, photos, tmp_path):
    """The other architecture's keys never shaped the model: they are dropped, the model is the same."""
    old_run, old_export = tmp_path / "run", tmp_path / "export"
    shutil.copytree(run, old_run)
    shutil.copytree(exported, old_export)
    config = yaml.safe_load((old_run / "config.yaml").read_text())
    (old_run / "config.yaml").write_text(yaml.safe_dump({**config, "model": {**EVERY_ARCHS_MODEL_KEYS,
                                                                             **config["model"]}}))
    for path in (old_run / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        state["config"]["model"] = {**EVERY_ARCHS_MODEL_KEYS, **state["config"]["model"]}
        torch.save(state, path)
    _edit_description(old_export, lambda description: description.update(
        model={**EVERY_ARCHS_MODEL_KEYS, **description["model"]}))
    expected = ia.load(run, device="cpu").reconstruct(photos, as_tensor=True)
    for path in (old_run, old_run / "checkpoints" / "best.pt", old_export):
        assert torch.equal(ia.load(path, device="cpu").reconstruct(photos, as_tensor=True), expected), path
    assert main(["train", "--quiet", "--resume", str(old_run), "train.epochs=3"]) == 0
    assert load_checkpoint(old_run / "checkpoints" / "last.pt").epoch == 3


def _edit_description(out: Path, edit) -> Path:
    path = out / "config.json"
    description = json.loads(path.read_text())
    edit(description)
    path.write_text(json.dumps(description))
    return path


@pytest.mark.parametrize("damage", ["header claiming 4 TB", "truncated", "epoch null", "latent_dim 1e9"])
def test_a_damaged_export_is_one_line_naming_the_file(exported, tmp_path, capsys, damage):
    """Each refused before any tensor is read or any model built: a latent_dim of 1e9 would allocate 1 TB."""
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    encoder, decoder = out / "encoder.safetensors", out / "decoder.safetensors"
    if damage == "header claiming 4 TB":
        encoder.write_bytes(struct.pack("<Q", 4 * 10**12) + encoder.read_bytes()[8:])
        named = encoder
    elif damage == "truncated":
        decoder.write_bytes(decoder.read_bytes()[: decoder.stat().st_size // 2])
        named = decoder
    elif damage == "epoch null":
        named = _edit_description(out, lambda description: description.update(epoch=None))
    else:
        _edit_description(out, lambda description: description["model"].update(latent_dim=1e9))
        named = encoder
    with pytest.raises(UserError) as error:
        ia.load(out, device="cpu")
    assert f"'{named}'" in str(error.value) and len(str(error.value).splitlines()) == 1
    assert main(["sample", str(out), "-n", "1", "--out", str(tmp_path / "samples")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"'{named}'" in line and not (tmp_path / "samples").exists()


def test_encode_of_no_images_and_a_fractional_sample_count_say_what_was_expected(run):
    vae = ia.load(run, device="cpu")
    with pytest.raises(ValueError, match="encode: expected at least one image, got none"):
        vae.encode([])
    with pytest.raises(TypeError, match="n: expected a whole number of images, got 2.5"):
        vae.sample(2.5)
    with pytest.raises(ValueError, match=re.escape("seed: expected an integer from 0 to 2**64-1")):
        vae.sample(1, seed=10**23)


def test_read_only_pixels_such_as_the_memory_mapped_cache_are_encoded_without_a_warning(run):
    vae = ia.load(run, device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    expected = vae.encode_pixels(pixels).mean
    pixels.setflags(write=False)  # as `vae encode --split` reads a cache opened read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(vae.encode_pixels(pixels).mean, expected)


def test_vae_encode_on_a_full_disk_keeps_the_previous_file(run, photos, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lat.npz"
    assert main(["encode", str(run), str(photos[0]), "-o", str(out)]) == 0
    before = out.read_bytes()
    full_disk(monkeypatch)
    assert main(["encode", str(run), *map(str, photos), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lat.npz" in err and "No space left on device" in err, err
    assert out.read_bytes() == before and [path.name for path in tmp_path.iterdir()] == ["lat.npz"]


def test_vae_encode_writes_exactly_the_name_given_and_refuses_a_folder(run, photos, tmp_path, capsys):
    assert main(["encode", str(run), str(photos[0]), "-o", str(tmp_path / "latents")]) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "latents")]
    assert np.load(tmp_path / "latents")["mean"].shape == (1, 8)
    (tmp_path / "folder").mkdir()
    assert main(["encode", str(run), str(photos[0]), "-o", str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{tmp_path / 'folder'}' is a folder" in err, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder", "latents"]


def test_a_device_this_machine_lacks_is_blamed_on_the_device_argument(run, monkeypatch):
    from image_autoencoding.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^device: 'cuda' requested but no CUDA device is available$"):
        ia.load(run, device="cuda")
