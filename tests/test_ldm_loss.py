"""model.mode=ldm: latent diffusion's autoencoder loss (training/steps/ldm.py), its PatchGAN and LPIPS
(evaluation/lpips.py), with random VGG16 weights written to a file and read through the same path
as torchvision's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from image_autoencoding.cli import main
from image_autoencoding.config import ConfigError, load_config
from image_autoencoding.data.batches import training_batches
from image_autoencoding.data.image_data import load_image_data
from image_autoencoding.evaluation.evaluate import evaluate_split
from image_autoencoding.evaluation.lpips import lpips_metric, perceptual_distance
from image_autoencoding.runs.checkpoint import load_checkpoint, save_checkpoint
from image_autoencoding.runs.metrics_log import MetricsLog
from image_autoencoding.runs.report_markdown import lpips_note
from image_autoencoding.runs.resume import prepare_resume
from image_autoencoding.runs.run_paths import RunPaths
from image_autoencoding.training import epoch_progress
from image_autoencoding.training.steps.ldm import decoder_last_layer
from image_autoencoding.training.trainer import Trainer

VGG16_CONVS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
TINY_LDM = ["model.mode=ldm", "model.patch_discriminator_width=4", "model.patch_discriminator_layers=2",
            "train.precision=fp32"]


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory) -> str:
    """Random VGG16 conv weights under torchvision's names (features.<index>), as its file has them."""
    state, c_in, index = {}, 3, 0
    for width in VGG16_CONVS:
        if width == "M":
            index += 1
            continue
        conv = nn.Conv2d(c_in, width, 3, padding=1)
        state[f"features.{index}.weight"], state[f"features.{index}.bias"] = conv.weight.detach(), conv.bias.detach()
        c_in, index = width, index + 2
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(state, path)
    return str(path)


def _trainer(tiny, *overrides: str) -> Trainer:
    config = load_config(None, [*tiny, *TINY_LDM, *overrides])
    return Trainer(config, load_image_data(config.data))


def _batches(trainer: Trainer, steps: int, batch_size: int = 8) -> list[torch.Tensor]:
    data = trainer.data.train.images
    return list(training_batches(data, batch_size, 0, 1, trainer.device, trainer.normalize, steps))


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_decoders_last_layer(tiny, vgg_weights):
    trainer = _trainer(tiny, "train.disc_start=0", f"train.lpips_vgg_weights={vgg_weights}",
                       "train.disc_weight=0.5")
    step = trainer.training_step
    x = _batches(trainer, 1)[0]
    alpha = torch.tensor(1e-6)
    last = decoder_last_layer(trainer.model.decoder)
    assert last is trainer.model.decoder.to_image[0].weight
    # By hand: the two losses' gradients at the last layer, their norms' ratio, clamped, x disc_weight.
    torch.manual_seed(0)
    reconstruction, g, *_ = step.objective(x, alpha, True)
    grad_nll = torch.autograd.grad(reconstruction, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last)[0]
    d_weight = 0.5 * min(max(float(grad_nll.norm() / (grad_g.norm() + 1e-4)), 0.0), 1e4)
    assert d_weight > 0
    torch.manual_seed(0)
    step.gradients(x, alpha)
    torch.testing.assert_close(last.grad, grad_nll + d_weight * grad_g)
    # The clamp: a vanishing GAN gradient gives 1e4 x disc_weight, not 5e4.
    assert float(step.adaptive_weight(torch.tensor([3.0, 4.0]), torch.zeros(2))) == 5000.0
    assert float(step.adaptive_weight(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]))) == pytest.approx(
        0.5 * 5 / (2 + 1e-4))


def test_discriminator_waits_for_disc_start_then_trains(tiny):
    trainer = _trainer(tiny, "train.disc_start=2", "train.perceptual_weight=0")
    step = trainer.training_step
    phases = []
    step.objective.register_forward_pre_hook(lambda module, args: phases.append(args[2]))
    discriminator = _weights(step.discriminator)
    decoder = _weights(trainer.model.decoder)
    batches = _batches(trainer, 3)
    for x in batches[:2]:
        assert not trainer.train_step(x).skipped
    # Before disc_start: no adversarial term, and the discriminator (weights, BatchNorm statistics,
    # optimizer) exactly as built.
    assert phases == [False, False]
    assert _equal(discriminator, _weights(step.discriminator))
    assert step.optimizers["discriminator"].state_dict()["state"] == {}
    assert not _equal(decoder, _weights(trainer.model.decoder))
    before = step.take_stats()
    assert before["disc_factor"] == 0 and "g_loss" not in before and before["nll"] > 0
    trainer.train_step(batches[2])
    assert phases == [False, False, True]
    assert not _equal(discriminator, _weights(step.discriminator))
    after = step.take_stats()
    assert after["disc_factor"] == 1 and after["d_weight"] > 0 and after["disc_loss"] > 0


@pytest.mark.parametrize("mode", ["ldm", "vae-gan"])
def test_a_skipped_step_leaves_the_objectives_own_terms_finite_and_uncounted(tiny, mode):
    """A non-finite batch is skipped; the epoch's and the window's terms (metrics.csv, TensorBoard)
    are those of the steps taken, not NaN."""
    trainer = _trainer(tiny, f"model.mode={mode}", "train.disc_start=0", "train.perceptual_weight=0")
    step = trainer.training_step
    good, bad = _batches(trainer, 2)
    assert not trainer.train_step(good).skipped
    assert trainer.train_step(bad * float("nan")).skipped
    for taken in (step.take_stats(), step.take_window_stats()):
        assert taken and all(math.isfinite(value) for value in taken.values()), taken
        if mode == "ldm":
            assert taken["disc_factor"] == 1.0  # one step counted: the one taken


def test_ldm_state_survives_a_checkpoint_and_the_resume_continues_bit_identically(tiny, tmp_path):
    overrides = ("train.disc_start=1", "train.perceptual_weight=0")
    first = _trainer(tiny, *overrides)
    batches = _batches(first, 4)
    for x in batches[:2]:
        first.train_step(x)
    path = tmp_path / "last.pt"
    save_checkpoint(first.state(), path)
    for x in batches[2:]:
        first.train_step(x)

    state = load_checkpoint(path)
    assert set(state.networks) == {"model", "discriminator", "ldm_loss"}
    assert set(state.optimizers) == {"encoder", "decoder", "discriminator"}
    resumed = Trainer(first.config, first.data, resume=state)
    assert resumed.step == 2  # disc_start counts the trainer's steps: the discriminator's phase goes on
    for x in batches[2:]:
        resumed.train_step(x)
    a, b = first.training_step, resumed.training_step
    assert float(a.loss.logvar.detach()) != 0.0  # logvar trains with the decoder
    for key in ("model", "discriminator", "ldm_loss"):
        assert _equal(_weights(a.networks[key]), _weights(b.networks[key])), key
    for name in ("decoder", "discriminator"):
        saved, again = a.optimizers[name].state_dict()["state"], b.optimizers[name].state_dict()["state"]
        assert all(_equal(list(saved[k].values()), list(again[k].values())) for k in saved), name


def test_missing_vgg_weights_stop_before_a_run_folder_in_one_line(tiny, tmp_path, capsys):
    absent = tmp_path / "vgg16.pth"
    assert main(["train", *tiny, *TINY_LDM, f"train.lpips_vgg_weights={absent}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vgg16-397923af.pth" in err and str(absent) in err
    assert "train.lpips_vgg_weights" in err
    assert not (tmp_path / "results").exists()


def test_ldm_with_lpips_needs_images_lpips_can_read():
    with pytest.raises(ConfigError, match="data.image_size 12 must be at least 16"):
        load_config(None, ["model.mode=ldm", "data.image_size=12", "model.encoder_channels=[8,8]",
                           "model.decoder_channels=[8,8,3]"])


def test_ldm_kl_weight_is_train_alpha_with_stable_diffusions_default():
    assert load_config(None, ["model.mode=ldm"]).train.alpha == 1e-6
    assert load_config(None, ["model.mode=ldm", "train.alpha=0.01"]).train.alpha == 0.01
    assert load_config(None).train.alpha == 0.1


def test_lpips_reads_the_weights_files_and_scores_identical_images_zero(vgg_weights):
    lpips = perceptual_distance(vgg_weights)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))
    assert (lpips(x, x.flip(0)) > 0).all()
    assert not any(p.requires_grad for p in lpips.parameters())


def test_vae_train_ldm_end_to_end_then_its_checkpoint_resumes(tiny, vgg_weights, tmp_path):
    args = [*tiny, *TINY_LDM, f"train.lpips_vgg_weights={vgg_weights}", "train.disc_start=1",
            "train.max_steps_per_epoch=2", "train.batch_size=16"]
    assert main(["train", *args, "train.epochs=1"]) == 0
    (run_dir,) = (tmp_path / "results" / "vae").iterdir()
    (row,) = MetricsLog(RunPaths(run_dir).metrics_csv).rows()
    # The discriminator joined at the second of the epoch's two steps.
    assert float(row["disc_factor"]) == 0.5 and float(row["d_weight"]) > 0 and float(row["lpips"]) > 0
    assert float(row["train_recon"]) > 0 and float(row["valid_recon"]) > 0
    assert "LPIPS (VGG16)" in RunPaths(run_dir).report().read_text()
    # The decoder's optimizer steps the logvar too: the resume's check of optimizer shapes knows it.
    resume = prepare_resume(run_dir, None, ["train.epochs=2"])
    assert resume.config.model.mode == "ldm" and resume.config.train.alpha == 1e-6


def test_the_report_scores_lpips_where_the_vgg_weights_are_and_says_why_not_elsewhere(tiny, vgg_weights, tmp_path):
    config = load_config(None, [*tiny, *TINY_LDM, "train.perceptual_weight=0"])
    data = load_image_data(config.data)
    trainer = Trainer(config, data)
    with_weights = evaluate_split(trainer.model, data.valid.images, trainer.normalize, trainer.device, 32,
                                  limit=8, lpips=lpips_metric(16, vgg_weights))
    assert with_weights.per_image["lpips"].shape == (8,) and (with_weights.per_image["lpips"] > 0).all()
    absent = tmp_path / "absent.pth"
    assert "lpips" not in evaluate_split(trainer.model, data.valid.images, trainer.normalize, trainer.device, 32,
                                         limit=8, lpips=lpips_metric(16, absent)).per_image
    document = {"metrics": {}}
    config.train.lpips_vgg_weights = str(absent)
    (note, _) = lpips_note(document, config)
    assert "not computed" in note and str(absent) in note and "vgg16-397923af.pth" in note


def test_ldm_trains_the_resnet_architecture_with_its_spatial_latent(tmp_path):
    config = load_config(None, ["data.dataset=digits", "data.image_size=16", "model.arch=resnet",
                                "model.resnet_channels=[8,16]", "model.latent_channels=2",
                                f"train.output_dir={tmp_path}", *TINY_LDM, "train.perceptual_weight=0",
                                "train.disc_start=1"])
    trainer = Trainer(config, load_image_data(config.data))
    assert decoder_last_layer(trainer.model.decoder) is trainer.model.decoder.features[-2].weight
    discriminator = _weights(trainer.training_step.discriminator)
    for x in _batches(trainer, 2):
        assert not trainer.train_step(x).skipped
    assert not _equal(discriminator, _weights(trainer.training_step.discriminator))
    assert trainer.training_step.take_stats()["d_weight"] > 0


def test_every_ldm_term_is_logged_per_step_window_and_the_epoch_means_stay_those_of_all_its_steps(
        tiny, tmp_path, monkeypatch, no_final_report):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Shown every 2 steps and at each epoch's last: two epochs of 3 steps give windows of steps
    # {1, 2}, {3}, {4, 5}, {6}; the discriminator joins at the second step.
    monkeypatch.setattr(epoch_progress, "REPORT_EVERY", 2)
    assert main(["train", *tiny, *TINY_LDM, "train.perceptual_weight=0", "train.disc_start=1",
                 "train.batch_size=16", "train.epochs=2"]) == 0
    (run_dir,) = (tmp_path / "results" / "vae").iterdir()
    events = EventAccumulator(str(RunPaths(run_dir).tensorboard))
    events.Reload()
    terms = ("pixel", "lpips", "nll", "logvar", "disc_factor", "g_loss", "d_weight", "disc_loss", "logits_real",
             "logits_fake")
    logged = {term: {e.step: e.value for e in events.Scalars(f"train/step_{term}")} for term in terms}
    for term in terms:
        assert sorted(logged[term]) == [2, 3, 5, 6], term
    assert [logged["disc_factor"][step] for step in (2, 3, 5, 6)] == [0.5, 1.0, 1.0, 1.0]
    rows = MetricsLog(RunPaths(run_dir).metrics_csv).rows()
    for row, (pair, last) in zip(rows, ((2, 3), (5, 6)), strict=True):
        # Every term is a mean per image or per step, and every batch is full: a window of two
        # steps weighs twice the last step's. The discriminator's terms are means over the steps
        # it ran: one of the first window's two in epoch 1.
        adversarial = logged["disc_factor"][pair] * 2
        for term in ("pixel", "nll", "disc_factor"):
            expected = (2 * logged[term][pair] + logged[term][last]) / 3
            assert float(row[term]) == pytest.approx(expected, rel=1e-5), term
        for term in ("g_loss", "d_weight", "disc_loss", "logits_real", "logits_fake"):
            expected = (adversarial * logged[term][pair] + logged[term][last]) / (adversarial + 1)
            assert float(row[term]) == pytest.approx(expected, rel=1e-5, abs=1e-6), term
        assert float(row["logvar"]) == pytest.approx(logged["logvar"][last])
