"""A model saves and loads itself (models/pretrained.py): save_pretrained -> from_pretrained gives the
same network, `ia.load` reads such a folder without a run folder, and an export written before
save_pretrained existed still loads and saves again byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import image_autoencoding as ia
from conftest import TINY, any_arch
from image_autoencoding.config import load_config
from image_autoencoding.errors import UserError
from image_autoencoding.models.factory import build_model
from image_autoencoding.models.pretrained import from_pretrained, save_pretrained
from image_autoencoding.models.vae import VAE
from image_autoencoding.runs.loading import TrainedModel

# tests/fixtures_data/make_export_v2.py wrote it with the package as it was before save_pretrained.
EXPORT_V2 = Path(__file__).resolve().parent / "fixtures_data" / "export_v2"
ARCHITECTURES = {"seed": [], "resnet": ["model.arch=resnet", "model.resnet_channels=[8,16]"],
                 "resnet spatial": ["model.arch=resnet", "model.resnet_channels=[8,16]", "model.latent_channels=1"]}


def _trained_looking(overrides: list[str]) -> tuple:
    """A model whose every weight and buffer (BatchNorm's running statistics too) is random, so a
    buffer left at its initial value by a load shows up in the decodes."""
    base = TINY if not overrides else any_arch(TINY)
    config = load_config(None, [*base, "data.mean=[0.4,0.5,0.6]", "data.image_crop=200", *overrides])
    model = build_model(config.model, config.data.image_size)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return config, model.eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_pretrained_then_from_pretrained_gives_the_same_decodes(arch, tmp_path):
    config, model = _trained_looking(ARCHITECTURES[arch])
    model.save_pretrained(tmp_path / "vae", config.data, epoch=3, step=12)
    loaded = from_pretrained(tmp_path / "vae")
    z = torch.randn(2, model.latent_size, generator=torch.Generator().manual_seed(1))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.model.decoder(z), model.decoder(z))
        assert torch.equal(loaded.model.encoder(x).logvar, model.encoder(x).logvar)
        assert torch.equal(VAE.from_pretrained(tmp_path / "vae").reconstruct(x), model.reconstruct(x))
    assert loaded.config.model == config.model and (loaded.epoch, loaded.step) == (3, 12)
    assert loaded.config.data.mean == (0.4, 0.5, 0.6) and loaded.config.data.image_crop == 200


def test_ia_load_reads_a_model_saved_without_a_run_folder(tmp_path):
    """As from a notebook: a model built (or trained) in memory, saved, loaded with ia.load."""
    config, model = _trained_looking([])
    saved = save_pretrained(model, tmp_path / "vae", config.data)
    assert sorted(path.name for path in saved.iterdir()) == ["config.json", "decoder.safetensors",
                                                             "encoder.safetensors"]
    vae = ia.load(saved, device="cpu")
    in_memory = ia.TrainedVAE(TrainedModel(config, model, tmp_path, 0, 0), torch.device("cpu"))
    z = torch.randn(3, model.latent_size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(vae.decode(z, as_tensor=True), in_memory.decode(z, as_tensor=True))
    assert vae.config.data.mean == (0.4, 0.5, 0.6) and vae.epoch == 0 and vae.mixture is None


def test_save_pretrained_refuses_a_wrong_data_section_and_a_folder_of_other_files(tmp_path):
    config, model = _trained_looking([])
    other = load_config(None, [*TINY, "data.image_size=32"]).data
    with pytest.raises(ValueError, match="image_size is 32, the model's is 16"):
        model.save_pretrained(tmp_path / "vae", other)
    with pytest.raises(TypeError, match=r"config\.data\), got Config"):
        model.save_pretrained(tmp_path / "vae", config)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an export"):
        model.save_pretrained(tmp_path / "mine", config.data)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine"]
    assert [path.name for path in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_an_export_of_format_version_2_loads_and_saves_again_with_the_same_weights_and_description(tmp_path):
    description = json.loads((EXPORT_V2 / "config.json").read_text())
    loaded = from_pretrained(EXPORT_V2)
    save_pretrained(loaded.model, tmp_path / "again", loaded.config.data, source=description["source_checkpoint"],
                    epoch=loaded.epoch, step=loaded.step)
    for name in ("encoder.safetensors", "decoder.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (EXPORT_V2 / name).read_bytes(), name
    # The same description, but for the keys of the other architecture, which that version wrote
    # into every model section and which never shaped the model, and keys added since (at their
    # defaults).
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    shared = description["model"].keys() & again["model"].keys()
    assert {key: description["model"][key] for key in shared} == {key: again["model"][key] for key in shared}
    assert shared == {key for key in description["model"] if key in again["model"]} and "arch" in shared
    assert {**description, "model": again["model"]} == again
    vae = ia.load(EXPORT_V2, device="cpu")
    assert vae.mixture is not None  # the export's latent sampler, fitted to these weights
    assert vae.sample(2, seed=0, sampler="gmm", as_tensor=True).shape == (2, 3, 16, 16)
