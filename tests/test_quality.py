"""The original recipe as a config, KL warm-up, free bits, VAE-GAN mode, sharpness."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from image_autoencoding.cli import main
from image_autoencoding.config import load_config
from image_autoencoding.data.batches import training_batches
from image_autoencoding.data.image_data import ImageData, Split, load_image_data
from image_autoencoding.evaluation.diversity import relative_diversity
from image_autoencoding.evaluation.sharpness import laplacian_variance, relative_sharpness
from image_autoencoding.models.vae import DiagonalGaussian, kl_for_objective
from image_autoencoding.runs.checkpoint import load_checkpoint, save_checkpoint
from image_autoencoding.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY_DISCRIMINATOR = "model.discriminator_channels=[8,16,16,16,32]"


def _trainer(tiny, tmp_path, *overrides: str) -> Trainer:
    config = load_config(None, [*tiny, *overrides])
    return Trainer(config, load_image_data(config.data))


def _batches(trainer: Trainer, steps: int) -> list[torch.Tensor]:
    data = trainer.data.train.images
    return list(training_batches(data, 32, 0, 1, trainer.device, trainer.normalize, steps))


def test_seed_config_is_the_original_recipe():
    config = load_config(REPO / "configs/seed.yaml")
    train = config.train
    assert (train.optimizer, train.lr, train.decay_lr, train.alpha, train.batch_size, train.weight_decay) == (
        "rmsprop", 1e-3, 0.75, 1.0, 64, 1e-7)
    assert (train.kl_warmup_steps, train.free_bits, train.precision) == (0, 0.0, "fp32")
    assert config.model.mode == "vae"
    assert config.model.encoder_channels == [64, 128, 256] and config.model.latent_dim == 128
    assert (config.data.dataset, config.data.image_crop, config.data.image_size) == ("coco", 375, 64)


def test_kl_warmup_ramps_alpha_linearly_from_zero(tiny, tmp_path):
    cfg = load_config(None, ["train.alpha=2.0", "train.kl_warmup_steps=4"]).train
    assert [cfg.kl_weight(step=step) for step in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert load_config(None, ["train.alpha=2.0"]).train.kl_weight(step=0) == 2.0  # off by default

    seen = []
    trainer = _trainer(tiny, tmp_path, "train.alpha=1.0", "train.kl_warmup_steps=2")
    # The KL weight each step hands the module that computes its loss (the one DDP wraps).
    trainer.training_step.objective.register_forward_pre_hook(lambda module, args: seen.append(float(args[1])))
    for x in _batches(trainer, 3):
        trainer.train_step(x)
    assert seen == [0.0, 0.5, 1.0]


def test_free_bits_floor_each_unit_in_the_objective_only():
    mean = torch.tensor([[2.0, 0.0], [0.0, 0.0]], requires_grad=True)
    posterior = DiagonalGaussian(mean, torch.zeros(2, 2))
    true_kl = posterior.kl()  # unit 0: 2.0 and 0.0 nats (mean 1.0), unit 1: 0 nats
    assert torch.equal(kl_for_objective(posterior, 0.0), true_kl)
    floored = kl_for_objective(posterior, 0.5)
    assert floored.tolist() == [1.5, 1.5]  # max(0.5, 1.0) + max(0.5, 0.0) for each image
    floored.sum().backward()
    assert mean.grad[:, 1].abs().sum() == 0  # a unit under the floor is not pushed to the prior
    assert mean.grad[0, 0] == pytest.approx(2.0)  # one above it gets the true KL's gradient


def test_free_bits_change_the_step_but_not_the_reported_kl(tiny, tmp_path):
    plain = _trainer(tiny, tmp_path / "plain")
    free = _trainer(tiny, tmp_path / "free", "train.free_bits=2.0")
    x = _batches(plain, 1)[0]
    torch.manual_seed(0)  # the same reparametrisation noise for both
    plain_sums = plain.train_step(x).sums
    torch.manual_seed(0)
    free_sums = free.train_step(x).sums
    # Same weights and batch: the same true KL and reconstruction are reported ...
    assert torch.allclose(plain_sums, free_sums)
    # ... but the objectives differ, so the encoders moved differently.
    moved = [not torch.equal(a, b) for a, b in zip(plain.model.encoder.parameters(), free.model.encoder.parameters(),
                                                   strict=True)]
    assert any(moved)


def test_vae_gan_steps_move_all_three_networks(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, "model.mode=vae-gan", TINY_DISCRIMINATOR)
    networks = {"encoder": trainer.model.encoder, "decoder": trainer.model.decoder,
                "discriminator": trainer.training_step.discriminator}
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in networks.items()}
    for x in _batches(trainer, 3):
        result = trainer.train_step(x)
        assert not result.skipped and torch.isfinite(result.sums).all()
    for name, net in networks.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters(), strict=True)), name
    stats = trainer.training_step.take_stats()
    assert 0 < stats["d_real"] < 1 and 0 < stats["d_recon"] < 1
    # The per-step log's window counts the same steps apart from the epoch's, which was just taken.
    assert trainer.training_step.take_window_stats() == stats
    assert trainer.training_step.take_window_stats() == {"d_real": 0.0, "d_recon": 0.0}


def test_vae_gan_without_prior_samples_decodes_and_discriminates_reconstructions_only(tiny, tmp_path, monkeypatch):
    trainer = _trainer(tiny, tmp_path, "model.mode=vae-gan", TINY_DISCRIMINATOR, "train.gan_prior_samples=false")
    x = _batches(trainer, 1)[0]
    decoded, judged = [], []
    trainer.model.decoder.register_forward_hook(lambda m, i, out: decoded.append(len(out)))
    trainer.training_step.discriminator.register_forward_hook(lambda m, i, out: judged.append(len(out[0])))
    assert not trainer.train_step(x).skipped
    assert decoded == [len(x)] and judged == [2 * len(x)]  # real + reconstructed, no prior samples
    with_prior = _trainer(tiny, tmp_path / "prior", "model.mode=vae-gan", TINY_DISCRIMINATOR,
                          "train.gan_prior_samples=true")
    with_prior.model.decoder.register_forward_hook(lambda m, i, out: decoded.append(len(out)))
    with_prior.train_step(x)
    assert decoded[-1] == 2 * len(x)  # Larsen et al.'s algorithm: posterior and prior samples
    assert load_config(None, ["model.mode=vae-gan"]).train.gan_prior_samples is False  # off by default


def test_vae_gan_skips_a_non_finite_step_leaving_the_discriminator_unchanged(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, "model.mode=vae-gan", TINY_DISCRIMINATOR)
    x = _batches(trainer, 1)[0]
    trainer.train_step(x)
    before = {k: v.clone() for k, v in trainer.training_step.discriminator.state_dict().items()}
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    assert trainer.train_step(x).skipped
    after = trainer.training_step.discriminator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included


def test_vae_gan_checkpoints_hold_the_discriminator_and_resume_exactly(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, "model.mode=vae-gan", TINY_DISCRIMINATOR)
    first, second = _batches(trainer, 2)
    trainer.train_step(first)
    trainer.epoch = 1
    save_checkpoint(trainer.state(), tmp_path / "epoch_1.pt")
    state = load_checkpoint(tmp_path / "epoch_1.pt")
    assert "discriminator" in state.networks
    assert state.optimizers["discriminator"]["state"]  # it has stepped

    resumed = Trainer(trainer.config, trainer.data, resume=state)
    saved = state.networks["discriminator"]
    assert all(torch.equal(v, saved[k]) for k, v in resumed.training_step.discriminator.state_dict().items())
    # Resuming sets the RNG to the checkpoint's: the next step of both trainers must agree exactly.
    rng = torch.get_rng_state()
    trainer.train_step(second)
    torch.set_rng_state(rng)
    resumed.train_step(second)
    a, b = trainer.training_step.discriminator.state_dict(), resumed.training_step.discriminator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = trainer.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (step.training_step.optimizers["discriminator"].state_dict()["state"] for step in (trainer, resumed))
    assert all(torch.equal(a[i]["square_avg"], b[i]["square_avg"]) for i in a)


def test_vae_gan_trains_end_to_end_from_the_command_line(tiny, tmp_path):
    overrides = [*tiny, "model.mode=vae-gan", TINY_DISCRIMINATOR, "train.max_steps_per_epoch=2", "train.epochs=1"]
    assert main(["train", "--config", str(REPO / "configs/demo.yaml"), *overrides]) == 0
    (run,) = (tmp_path / "results" / "vae").iterdir()
    assert "discriminator" in load_checkpoint(run / "checkpoints" / "last.pt").networks


def test_sharpness_ranks_a_blurred_image_below_the_original():
    from skimage import data

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].double() / 255
    photo = F.interpolate(photo, size=(64, 64), mode="area")
    blurred = F.avg_pool2d(F.pad(photo, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert laplacian_variance(blurred).item() < 0.5 * laplacian_variance(photo).item()
    assert relative_sharpness(photo, photo) == pytest.approx(1.0)
    assert relative_sharpness(blurred, photo) < 0.5
    assert laplacian_variance(torch.full((1, 3, 8, 8), 0.3)).item() == 0.0


def test_diversity_is_one_for_real_images_and_zero_for_a_collapsed_generator():
    from skimage import data

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].double() / 255
    crops = torch.cat([photo[..., i : i + 64, j : j + 64] for i in range(0, 448, 64) for j in range(0, 448, 64)])
    assert relative_diversity(crops, crops) == pytest.approx(1.0)
    collapsed = crops[:1].repeat(len(crops), 1, 1, 1) + 0.001 * torch.randn_like(crops)
    assert relative_diversity(collapsed, crops) < 0.05
    assert relative_diversity(crops * 0.25 + 0.4, crops) == pytest.approx(0.25)  # greyed-out samples vary less


def test_quality_benchmark_variants_add_rows_with_their_overrides(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights
    import quality

    calls = []
    tiny = SimpleNamespace(train=SimpleNamespace(images=[0] * 8), valid=SimpleNamespace(images=[0] * 2))
    monkeypatch.setattr(quality, "dataset", lambda name, args, work: (tiny, []))
    monkeypatch.setattr(quality, "train_recipe", lambda recipe, data, data_overrides, args, work, extra=(), seed=1:
                        calls.append((recipe, list(extra))) or (None, {"images_seen": 64}))
    monkeypatch.setattr(quality, "score", lambda trainer, data, prefix, networks: {"ssim": 0.5})
    monkeypatch.setattr(quality, "cost", lambda trainer, data: {})
    assert quality.main(["--datasets", "photos", "--recipes", "seed", "--variant", "gan-a1", "vae-gan",
                         "train.alpha=1", "--json", str(tmp_path / "q.json")]) == 0
    assert calls == [("seed", []), ("vae-gan", ["train.alpha=1"])]
    import json

    rows = json.loads((tmp_path / "q.json").read_text())["results"]
    assert [r["recipe"] for r in rows] == ["seed", "gan-a1"]
    with pytest.raises(SystemExit):
        quality.main(["--variant", "x", "nonsense"])


def test_quality_benchmark_recipes_read_the_configs(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality

    assert quality.recipe_overrides("seed", 0.25, 100) == (str(REPO / "configs/seed.yaml"), [])
    path, overrides = quality.recipe_overrides(
        "vae-gan", 0.25, 100, ["train.optimizer=adam", "train.kl_warmup_steps=2000"])
    # The candidate's warm-up is rescaled to a quarter of the (reduced) run; the last override wins.
    assert path is None and overrides[-2:] == ["train.kl_warmup_steps=25", "model.mode=vae-gan"]
    config = load_config(None, overrides)
    assert (config.train.optimizer, config.train.kl_warmup_steps, config.model.mode) == ("adam", 25, "vae-gan")


def test_quality_benchmark_judges_reconstructions_prior_and_mixture_samples(monkeypatch, tiny, tmp_path):
    """The benchmark's sample columns: each image set against the real validation images, in a
    classifier's feature space, with a latent mixture fitted to the model's training latents; the
    same model's reconstruction metrics are unchanged by it."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality
    from domain_classifier import train_domain_classifier

    trainer = _trainer(tiny, tmp_path)
    data = trainer.data
    trainer.train_epoch(1, max_steps=3)
    network, info = train_domain_classifier(data.train.images, data.train.labels, data.valid.images,
                                            data.valid.labels, epochs=1, batch_size=64)
    assert 0 <= info["test_accuracy"] <= 1 and info["features"] == 128
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    row = quality.score(trainer, data, tmp_path / "digits", {"domain": network})
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert set(row["sets"]) == {"reconstructions", "prior", "mixture"}
    assert 1 <= row["mixture"]["components"] <= 20
    for scores in row["sets"].values():
        expected = {"domain_fid", "domain_kid", "domain_precision", "domain_recall", "sharpness", "diversity"}
        assert expected <= set(scores)
        assert 0 <= scores["domain_precision"] <= 1 and scores["domain_fid"] >= 0
    assert {p.name for p in tmp_path.glob("digits_*.png")} == {
        "digits_reconstructions.png", "digits_samples.png", "digits_samples_gmm.png"}
    assert "| digits | x | mixture |" in quality.set_table([{"dataset": "digits", "recipe": "x", **row}])


def test_domain_classifier_learns_the_classes(monkeypatch, tmp_path):
    """The domain features come from a classifier that separates the classes: on the 8x8 digits
    scaled to 16 px it is far above chance (10%) after a few epochs."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from domain_classifier import train_domain_classifier

    config = load_config(None, ["data.dataset=digits", "data.image_size=16", f"data.cache_dir={tmp_path}"])
    data = load_image_data(config.data)
    _, info = train_domain_classifier(data.train.images, data.train.labels, data.valid.images, data.valid.labels,
                                      epochs=5, batch_size=32)
    assert info["test_accuracy"] > 0.8


def test_quality_benchmark_trains_every_row_at_every_seed_and_pairs_them(monkeypatch, tmp_path):
    """--seeds trains each row from each seed, seeds outermost, and the JSON holds each row's mean
    over seeds and its difference from the baseline paired by seed."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import quality

    calls = []
    tiny = SimpleNamespace(train=SimpleNamespace(images=[0] * 8), valid=SimpleNamespace(images=[0] * 2))
    monkeypatch.setattr(quality, "dataset", lambda name, args, work: (tiny, []))

    def train(recipe, data, data_overrides, args, work, extra=(), seed=1):
        calls.append((recipe, seed))
        return SimpleNamespace(recipe=recipe, seed=seed), {"images_seen": 64}

    # Seed noise far larger than the recipes' difference, which is the same at every seed.
    monkeypatch.setattr(quality, "train_recipe", train)
    monkeypatch.setattr(quality, "cost", lambda trainer, data: {})
    monkeypatch.setattr(quality, "score", lambda trainer, data, prefix, networks: {
        "ssim": 0.1 * trainer.seed + (0.01 if trainer.recipe == "default" else 0.0)})
    assert quality.main(["--datasets", "photos", "--recipes", "seed", "default", "--seeds", "1", "2", "3",
                         "--json", str(tmp_path / "q.json")]) == 0
    assert calls == [("seed", 1), ("default", 1), ("seed", 2), ("default", 2), ("seed", 3), ("default", 3)]
    import json

    document = json.loads((tmp_path / "q.json").read_text())
    summary = {s["recipe"]: s["ssim"] for s in document["summary"]}
    assert summary["seed"]["mean"] == pytest.approx(0.2)
    # Alone, each row's interval holds the other's mean ...
    assert summary["seed"]["low"] < summary["default"]["mean"] < summary["seed"]["high"]
    # ... paired by seed, the difference is certain.
    (difference,) = document["paired"]
    assert difference["baseline"] == "seed" and difference["ssim"]["verdict"] == "higher"
    assert difference["ssim"]["mean"] == pytest.approx(0.01)
    with pytest.raises(SystemExit):
        quality.main(["--recipes", "seed", "--baseline", "default"])


def test_seed_intervals_are_student_t_and_say_when_no_difference_is_measurable(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from seed_statistics import mean_interval, paired

    # Three values with standard deviation 1: the half-width is t(0.975, 2) / sqrt(3) = 4.303 / 1.732.
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval["mean"] == 2.0 and interval["high"] - 2.0 == pytest.approx(2.4841, abs=1e-4)
    assert mean_interval([5.0])["low"] is None
    ssim = {"a": (0.50, 0.60, 0.55), "b": (0.52, 0.58, 0.56)}
    rows = [{"dataset": "d", "recipe": r, "seed": s, "ssim": v}
            for r, values in ssim.items() for s, v in zip((1, 2, 3), values, strict=True)]
    rows.append({"dataset": "d", "recipe": "b", "seed": 4, "ssim": 0.9})  # no pair: left out
    (difference,) = paired(rows, "a", ["ssim"])
    assert difference["seeds"] == [1, 2, 3]
    assert difference["ssim"]["verdict"] == "no measurable difference"


def test_quality_benchmark_rows_at_the_same_wall_time_take_the_steps_that_fit_it(monkeypatch):
    """--train-seconds: each row's steps come from timing a throwaway trainer of its config; a
    network twice as slow gets half the steps."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import time

    import quality

    def probe(seconds_per_step):
        trainer = SimpleNamespace(train_epoch=lambda epoch, max_steps: time.sleep(seconds_per_step * max_steps))
        return lambda *args: (trainer, None, [])

    monkeypatch.setattr(quality, "make_trainer", probe(0.02))
    fast = quality.steps_in(1.0, "default", None, [], None, None, [], 1)
    monkeypatch.setattr(quality, "make_trainer", probe(0.04))
    slow = quality.steps_in(1.0, "default", None, [], None, None, [], 1)
    assert 35 <= fast <= 50 and 17 <= slow <= 25


def test_quality_benchmark_rows_at_the_same_wall_time_train_for_that_time_when_the_probe_misjudged(monkeypatch):
    """A row whose real pace is half what the probe measured still trains for about the budget: the
    rest of the run is re-planned from its own pace at each epoch's end, and the cosine horizon
    (Trainer.plan) follows."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality

    trainer = SimpleNamespace(step=0, planned=[])
    trainer.plan = trainer.planned.append
    epochs = quality.EpochRows()
    budget = quality.WallTimeBudget(1.0, epochs)
    planned = 100  # the probe's guess: 100 steps in 1 s; the real pace is 0.02 s a step, 10 steps an epoch
    while trainer.step < planned:
        trainer.step += min(10, planned - trainer.step)
        for callback in (epochs, budget):
            callback.on_epoch_end(trainer, len(epochs.rows) + 1, {"seconds": 0.2, "valid_ssim": 0.5})
        planned = trainer.planned[-1]
    assert 40 <= trainer.step <= 60 and 0.8 <= epochs.train_seconds <= 1.3


def test_quality_benchmark_rows_train_at_their_own_batch_size(monkeypatch, tiny, tmp_path):
    """A --variant that sets train.batch_size sees --images-seen images in steps of its own batch
    (the rows of different batch sizes are compared at the same images seen)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality

    images = np.random.default_rng(0).integers(0, 256, (72, 16, 16, 3), dtype=np.uint8)
    data = ImageData(Split(images[:64], np.zeros(64, dtype=np.int64)), Split(images[64:], np.zeros(8, dtype=np.int64)),
                     [])
    data_overrides = ["data.image_size=16"]
    args = SimpleNamespace(images_seen=64, train_seconds=None, warmup_fraction=0.25, default_overrides=None,
                           curve=False)
    model = [o for o in tiny if o.startswith("model.")]
    extra = [*model, "train.batch_size=16"]
    trainer, info = quality.train_recipe("default", data, data_overrides, args, tmp_path, extra)
    assert (trainer.step, info["images_seen"]) == (4, 64)  # 4 steps of 16, not 1 counted as 64 images
    assert info["batch_size"] == 16


def test_batch_size_rows_scale_the_learning_rate_by_the_square_root_with_warm_up_over_the_same_images(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from batch_size import batch_variants, scaled

    train = load_config(REPO / "configs/coco.yaml").train
    assert (train.lr, train.warmup_steps) == (1e-3, 100)  # what the rows below are scaled from
    assert batch_variants([64, 256, 1024], "sqrt") == {
        "batch64": ["train.batch_size=64", "train.lr=0.001", "train.warmup_steps=100"],
        "batch256": ["train.batch_size=256", "train.lr=0.002", "train.warmup_steps=25"],
        "batch1024": ["train.batch_size=1024", "train.lr=0.004", "train.warmup_steps=6"],
    }
    assert scaled(1e-3, 100, 1024, 64, "linear") == (0.016, 6)
    assert scaled(1e-3, 0, 1024, 64, "sqrt") == (0.004, 0)  # no warm-up stays none


def test_batch_size_choice_is_the_largest_batch_within_the_seed_noise_of_the_smallest(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from batch_size import batch_choice, choice_table

    ssim = {64: (0.60, 0.62, 0.64), 256: (0.59, 0.61, 0.63), 1024: (0.50, 0.52, 0.54)}
    rows = [{"batch_size": batch, "seed": seed, "ssim": value, "train_img_s": batch * 10.0,
             "overrides": ["train.lr=0.001", f"train.lr={batch / 64000}"], "steps": 10}
            for batch, values in ssim.items() for seed, value in zip((1, 2, 3), values, strict=True)]
    choice = batch_choice({"results": rows})
    # Batch 64's interval over 3 seeds: 0.62 +- t(0.975, 2) x 0.02 / sqrt(3) = 0.62 +- 0.0497.
    assert choice["seed_noise"] == pytest.approx(0.0497, abs=1e-4)
    assert [choice["rows"][b]["within_seed_noise"] for b in (64, 256, 1024)] == [True, True, False]
    assert choice["largest_within_noise"] == 256
    assert choice["rows"][256]["paired_difference"]["mean"] == pytest.approx(-0.01)
    assert choice["rows"][1024]["lr"] == "0.016"  # the last override of the key
    assert "largest batch within it: 256" in choice_table(choice)
    one_seed = batch_choice({"results": [row for row in rows if row["seed"] == 1]})
    assert one_seed["largest_within_noise"] is None and "one seed" in one_seed["why_none"]
    assert batch_choice({"results": []})["why_none"] == "no row finished"


def test_throughput_rows_whose_settings_are_refused_are_skipped_and_failing_rows_dropped(monkeypatch, tmp_path):
    """--settings: a row whose key the config does not know is skipped with the config's one-line
    reason; a row that fails when made or while timed is recorded with its error; the others run."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import train_throughput as t

    class Row:
        def __init__(self, fail: bool = False):
            self.fail = fail

        def run(self, steps, round_index):
            if self.fail:
                raise RuntimeError("CUDA graph capture failed")
            return steps * 2, 1.0

    def broken():
        raise RuntimeError("out of memory")

    rows, skipped, failed = t.build_rows({
        "fine": Row, "unknown key": lambda: t.build_config(tmp_path, "train.no_such_key=true") and Row(),
        "broken": broken, "fails later": lambda: Row(fail=True)})
    assert list(rows) == ["fine", "fails later"]
    assert skipped == {"unknown key": "override 'train.no_such_key=true': unknown config key 'train.no_such_key'"}
    assert failed == {"broken": "RuntimeError('out of memory')"}
    timed, failed_timed = t.interleaved_rounds(rows, 2, 3, may_fail=frozenset(rows))
    assert timed["fine"]["img_s"] == 6.0
    assert failed_timed == {"fails later": "RuntimeError('CUDA graph capture failed')"}
    with pytest.raises(RuntimeError):  # a row the figures cannot do without still stops the run
        t.interleaved_rounds(rows, 1, 3)


@pytest.mark.parametrize("arguments, named", [(["--device", "tpu"], "--device 'tpu'"), (["--fast"], "'--fast'"),
                                              (["--seeds", "1 x"], "--seeds '1 x'")])
def test_gpu_benchmarks_script_refuses_bad_options_before_running_anything(arguments, named, tmp_path):
    import subprocess

    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu_benchmarks.sh"), *arguments], capture_output=True,
                          text=True, env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and named in done.stderr and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_throughput_host_waits_are_counted_per_step_by_place_and_tf32_switches_put_back(monkeypatch):
    """count_host_waits reads CUDA's sync debug mode warnings (emitted here by hand: no GPU in CI)
    and turns the mode off again; a row's TF32 switches come back after another row changed them."""
    import warnings

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import train_throughput as t

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def steps():
        for _ in range(4):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # every step, this line
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # once, at the end
        warnings.warn("an unrelated warning", stacklevel=1)
        return 4

    waits = t.count_host_waits(steps)
    assert modes == ["warn", 0] and waits["per_step"] == 1.25 and len(waits["where"]) == 2
    assert waits["every_step"] == [next(place for place, n in waits["where"].items() if n == 4)]

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        row = t.Tf32Switches()
        matmul.fp32_precision = "tf32"  # another row's Trainer
        row.restore()
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before
