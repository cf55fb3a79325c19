"""model.arch=autoencoder-kl: diffusers' AutoencoderKL as the encoder and decoder, started from a
diffusers folder (model.init_from), trained, resumed, loaded, and written back as a diffusers folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import image_autoencoding as ia
from conftest import TINY, any_arch
from helpers.faults import SignalAtStep
from image_autoencoding.cli import main
from image_autoencoding.config import load_config
from image_autoencoding.errors import UserError
from image_autoencoding.models.factory import build_model
from image_autoencoding.models.shapes import expected_shapes

diffusers = pytest.importorskip("diffusers")

# 16 px, two levels: a 2 x 8 x 8 latent.
TINY_KL = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 2}


def _overrides(keys: dict) -> list[str]:
    return [f"model.{key}={json.dumps(value).replace(' ', '')}" for key, value in keys.items()]


KL = ["model.arch=autoencoder-kl", *_overrides(TINY_KL)]
# TINY without the seed network's keys (latent_dim included: the latent is latent_channels x side x side).
TINY_RUN = [text for text in any_arch(TINY) if not text.startswith("model.")]


def _diffusers_folder(path, keys: dict = TINY_KL):
    """A tiny AutoencoderKL with random weights, saved by diffusers itself."""
    torch.manual_seed(0)
    levels = len(keys["block_out_channels"])
    model = diffusers.AutoencoderKL(**keys, down_block_types=["DownEncoderBlock2D"] * levels,
                                    up_block_types=["UpDecoderBlock2D"] * levels, sample_size=16)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def saved_kl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kl") / "tiny_vae"
    return folder, _diffusers_folder(folder)


def test_a_model_started_from_a_diffusers_folder_encodes_and_decodes_as_diffusers_does(saved_kl):
    folder, reference = saved_kl
    cfg = load_config(None, ["data.image_size=16", *KL, f"model.init_from={folder}"])
    model = build_model(cfg.model, 16).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = model.encoder(x)
        expected = reference.encode(x).latent_dist
        assert posterior.mean.shape == (2, 2 * 8 * 8) == (2, model.latent_size)
        torch.testing.assert_close(posterior.mean, expected.mean.flatten(1), atol=1e-6, rtol=0)
        torch.testing.assert_close(posterior.logvar, expected.logvar.flatten(1), atol=1e-6, rtol=0)
        z = torch.randn(2, 2, 8, 8)
        torch.testing.assert_close(model.decoder(z.flatten(1)), reference.decode(z).sample, atol=1e-6, rtol=0)
    assert model.decoder.last_layer is model.decoder.decoder.conv_out.weight
    # The shapes loaders check files against, on the meta device: the folder is not read for them.
    assert expected_shapes(cfg.model, 16) == {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_a_folder_holding_another_autoencoder_is_refused_naming_the_keys_that_would_fit(saved_kl, tiny, capsys):
    folder, _ = saved_kl
    overrides = [*tiny[:1], *TINY_RUN, tiny[-1], *KL, "model.latent_channels=4", f"model.init_from={folder}"]
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.latent_channels=2" in err and str(folder) in err
    assert not (Path(tiny[-1].partition("=")[2]) / "results").exists()  # refused before any run folder
    assert main(["train", *overrides[:-2], f"model.init_from={folder.parent / 'nowhere'}"]) == 2
    assert "no config.json there" in capsys.readouterr().err


def test_the_architecture_takes_images_in_minus_one_to_one_and_trains_with_adam(capsys):
    assert load_config(None, ["data.image_size=16", *KL]).train.optimizer == "adam"
    assert main(["config", "data.image_size=16", *KL, "data.mean=[0.4,0.5,0.5]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.mean and data.std" in err


def test_without_diffusers_one_line_names_the_extra(tiny, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    assert main(["train", *tiny[:1], *TINY_RUN, tiny[-1], *KL]) == 2
    err = capsys.readouterr().err
    assert err == ("vae: error: model.arch autoencoder-kl needs diffusers: "
                   "pip install 'image-autoencoding[diffusers]'\n")


# Three levels for the runs: a 2 x 4 x 4 latent, so that the final report's latent mixture (full
# covariances) takes a second, not the half minute of 128 floats.
RUN_KL = {**TINY_KL, "block_out_channels": [8, 8, 16]}


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    """A run started from a diffusers folder, stopped by SIGTERM inside its first epoch, its folder
    moved away."""
    root = tmp_path_factory.mktemp("kl_run")
    start = root / "start"
    _diffusers_folder(start, RUN_KL)
    assert main(["train", "--quiet", "data.dataset=digits", *TINY_RUN, "model.arch=autoencoder-kl", *_overrides(RUN_KL),
                 "train.device=cpu", "train.eval_images=50", "train.epochs=2", f"model.init_from={start}",
                 f"train.output_dir={root}"], callbacks=[SignalAtStep("SIGTERM@2")]) != 0
    (run,) = (root / "results" / "vae").iterdir()
    start.rename(root / "moved")
    return run


def test_a_run_stopped_resumes_after_its_start_folder_moved_and_loads(kl_run, tmp_path, capsys):
    from image_autoencoding.runs.checkpoint import load_checkpoint

    assert load_checkpoint(kl_run / "checkpoints" / "last.pt").step == 2
    # The folder the run started from has moved: a resume reads its checkpoint, not the folder.
    assert main(["train", "--quiet", "--resume", str(kl_run)]) == 0
    assert load_checkpoint(kl_run / "checkpoints" / "last.pt").step == 6
    assert "spatial latent 2x4x4" in (kl_run / "report.md").read_text()

    vae = ia.load(kl_run, device="cpu")
    pixels = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8).numpy()
    images = vae.reconstruct(list(pixels), as_tensor=True)
    assert images.shape == (2, 3, 16, 16) and vae.latent_size == 32
    assert main(["export", str(kl_run), "--out", str(tmp_path / "export")]) == 0
    assert torch.equal(ia.load(tmp_path / "export", device="cpu").reconstruct(list(pixels), as_tensor=True), images)
    assert main(["encode", str(kl_run), "--split", "valid", "-o", str(tmp_path / "z.npz")]) == 0
    assert np.load(tmp_path / "z.npz")["mean"].shape[1] == 32


def test_a_run_exports_to_a_folder_plain_diffusers_opens_with_unit_variance_latents(kl_run, tmp_path, capsys):
    out = tmp_path / "diffusers_vae"
    assert main(["export", str(kl_run), "--checkpoint", "last", "--diffusers", str(out)]) == 0
    exported = diffusers.AutoencoderKL.from_pretrained(out).eval()
    vae = ia.load(kl_run, "last", device="cpu")
    z = torch.randn(3, vae.latent_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.decode(z.view(3, 2, 4, 4)).sample, vae.model.decoder(z), atol=1e-5, rtol=0)
    # What a diffusion model trained on the training images' latents sees: (z - shift) * scale.
    from image_autoencoding.data.image_data import load_image_data

    images = load_image_data(vae.config.data, progress=False).train.images
    seen = (vae.encode_pixels(images).sample(torch.Generator().manual_seed(1)) - exported.config.shift_factor)
    seen = seen * exported.config.scaling_factor
    assert abs(seen.mean().item()) < 0.02 and abs(seen.std().item() - 1) < 0.02
    provenance = json.loads((out / "image_autoencoding_export.json").read_text())
    assert provenance["latent_statistics"]["images"] == len(images)
    # Again into the same folder: an earlier export is replaced; any other folder is not.
    assert main(["export", str(kl_run), "--checkpoint", "last", "--diffusers", str(out)]) == 0
    assert main(["export", str(kl_run), "--diffusers", str(tmp_path)]) == 2
    assert "choose another folder" in capsys.readouterr().err


def _onnx_runs_as_torch(folder: Path, model) -> None:
    """encoder.onnx and decoder.onnx in onnxruntime give the model's outputs, within the export's own check."""
    import onnxruntime

    from image_autoencoding.export_onnx import TOLERANCE

    sessions = [onnxruntime.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
                for name in ("encoder", "decoder")]
    assert [session.get_inputs()[0].shape[0] for session in sessions] == ["batch", "batch"]
    generator = torch.Generator().manual_seed(0)
    # 64: diffusers' Upsample2D takes another branch from a batch of 64 on (models/upsampling.py).
    for batch in (1, 64):
        x = torch.rand(batch, 3, 16, 16, generator=generator) * 2 - 1
        z = torch.randn(batch, model.latent_size, generator=generator)
        mean, logvar = sessions[0].run(["mean", "logvar"], {"image": x.numpy()})
        (image,) = sessions[1].run(["image"], {"z": z.numpy()})
        with torch.no_grad():
            posterior = model.encoder(x)
            for got, want in ((mean, posterior.mean), (logvar, posterior.logvar), (image, model.decoder(z))):
                np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=TOLERANCE)


def test_a_run_exports_to_onnx_that_onnxruntime_runs_as_torch(kl_run, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="vae export --onnx needs onnxruntime (the onnx extra)")
    pytest.importorskip("onnxscript", reason="vae export --onnx needs onnxscript (the onnx extra)")
    traces = []
    trace = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *args, **kwargs: traces.append(kwargs.get("strict"))
                        or trace(*args, **kwargs))
    out = tmp_path / "export"
    assert main(["export", str(kl_run), "--checkpoint", "last", "--out", str(out), "--onnx"]) == 0
    # Each graph traced once: a batch axis that diffusers' decoder refused would be traced again.
    assert traces == [False, False]
    vae = ia.load(out, device="cpu")
    assert vae.config.model.mid_block_add_attention
    _onnx_runs_as_torch(out, vae.model)


def test_an_autoencoder_kl_without_the_mid_block_attention_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime", reason="vae export --onnx needs onnxruntime (the onnx extra)")
    pytest.importorskip("onnxscript", reason="vae export --onnx needs onnxscript (the onnx extra)")
    from image_autoencoding.export_onnx import export_onnx

    # One level, the smallest autoencoder-kl: each graph's export costs seconds whatever its weights.
    config = load_config(None, ["data.image_size=16", "model.arch=autoencoder-kl", "model.block_out_channels=[8]",
                                "model.layers_per_block=1", "model.norm_num_groups=4", "model.latent_channels=2",
                                "model.mid_block_add_attention=false"])
    model = build_model(config.model, 16).eval()
    assert export_onnx(model, 16, tmp_path) == [tmp_path / "encoder.onnx", tmp_path / "decoder.onnx"]
    _onnx_runs_as_torch(tmp_path, model)


def test_only_autoencoder_kl_runs_export_to_diffusers(tmp_path, capsys):
    from image_autoencoding.export_diffusers import export_diffusers
    from image_autoencoding.models.pretrained import TrainedModel

    config = load_config(None, ["data.image_size=16", *any_arch(TINY)])
    trained = TrainedModel(config, build_model(config.model, 16), tmp_path, 0, 0)
    with pytest.raises(UserError, match="only model.arch autoencoder-kl exports to diffusers"):
        export_diffusers(trained, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_evaluate_scores_a_diffusers_folder_on_a_dataset_as_it_scores_a_run(saved_kl, tmp_path, monkeypatch):
    folder, reference = saved_kl
    out = tmp_path / "scores"
    assert main(["evaluate", "--model", str(folder), "data.dataset=digits", "data.image_size=16",
                 "train.tsne_points=0", "train.precision=fp32", "--limit", "20", "--out", str(out),
                 "--device", "cpu"]) == 0
    document = json.loads((out / "metrics_tiny_vae_limit_20.json").read_text())
    assert document["images"] == 20 and "started from" in (out / "report_tiny_vae_limit_20.md").read_text()
    # The scores are those of diffusers' own reconstructions (the posterior mean) of those images.
    from image_autoencoding.data.image_data import load_image_data

    config = load_config(None, ["data.dataset=digits", "data.image_size=16"])
    pixels = torch.from_numpy(load_image_data(config.data, progress=False).valid.images[:20]).permute(0, 3, 1, 2)
    x = pixels.float() / 127.5 - 1
    with torch.no_grad():
        output = reference(x).sample
    mse = ((output.clamp(-1, 1) - x) / 2).square().flatten(1).mean(1)
    assert document["metrics"]["mse"]["mean"] == pytest.approx(mse.mean().item(), abs=1e-6)
    # Without a folder to write into, a new one in the current directory.
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--model", str(folder), "data.dataset=digits", "data.image_size=16",
                 "train.tsne_points=0", "--limit", "12", "--device", "cpu"]) == 0
    (made,) = tmp_path.glob("evaluation_tiny_vae_*")
    assert (made / "report_tiny_vae_limit_12.md").is_file()


def test_evaluate_model_refuses_model_keys_and_a_folder_that_is_not_diffusers(saved_kl, tmp_path, capsys):
    folder, _ = saved_kl
    assert main(["evaluate", "--model", str(folder), "model.latent_channels=4", "--out", str(tmp_path)]) == 2
    assert "with --model the model is the folder's" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and "no config.json there" in err
    assert main(["evaluate", str(tmp_path), "data.image_size=16"]) == 2
    assert "go with --model DIR" in capsys.readouterr().err


def _same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_kl_small_with_the_discriminator_on_resumes_bit_identically(tmp_path):
    """configs/kl_small.yaml's recipe (autoencoder-kl, the ldm loss, the weight average) shrunk:
    stopped inside epoch 2 after the discriminator started, then resumed, it ends as an uninterrupted
    run does, to the bit (weights, the average, the discriminator, every optimizer, the logvar)."""
    from image_autoencoding.runs.checkpoint import load_checkpoint

    common = ["--config", "configs/kl_small.yaml", "data.dataset=digits", *TINY_RUN, *_overrides(TINY_KL),
              "model.patch_discriminator_width=8", "model.patch_discriminator_layers=1",
              "train.perceptual_weight=0", "train.disc_start=2", "train.ema_decay=0.9", "train.epochs=2",
              "train.max_steps_per_epoch=3", "train.eval_images=32", "train.device=cpu", "train.precision=fp32"]
    repo = Path(__file__).resolve().parents[1]
    common[1] = str(repo / common[1])
    assert main(["train", "--quiet", *common, f"train.output_dir={tmp_path / 'whole'}"]) == 0
    assert main(["train", "--quiet", *common, f"train.output_dir={tmp_path / 'stopped'}"],
                callbacks=[SignalAtStep("SIGTERM@4")]) != 0
    (stopped,) = (tmp_path / "stopped" / "results" / "vae").iterdir()
    assert main(["train", "--quiet", "--resume", str(stopped)]) == 0
    (whole,) = (tmp_path / "whole" / "results" / "vae").iterdir()
    resumed, uninterrupted = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (stopped, whole))
    assert resumed.step == 6 and {"discriminator", "ema", "ldm_loss"} <= resumed.networks.keys()
    assert resumed.optimizers["discriminator"]["state"]  # it has stepped
    for state in (resumed, uninterrupted):
        state.config["train"].pop("output_dir")
    _same(resumed.to_dict(), uninterrupted.to_dict())
    # The weight average is the run's model in its exports: the one ia.load reads, and the diffusers
    # folder that `vae evaluate --model` scores.
    average = resumed.networks["ema"]
    assert any(not torch.equal(average[key], value) for key, value in resumed.model.items())
    assert main(["export", str(stopped), "--checkpoint", "last", "--out", str(tmp_path / "export")]) == 0
    _same(ia.load(tmp_path / "export", device="cpu").model.state_dict(), average)
    assert main(["export", str(stopped), "--checkpoint", "last", "--diffusers", str(tmp_path / "diffusers")]) == 0
    exported = diffusers.AutoencoderKL.from_pretrained(tmp_path / "diffusers").state_dict()
    _same(exported, {key.partition(".")[2]: value for key, value in average.items()})
