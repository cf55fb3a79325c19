"""Validation metrics during training, best.pt, report.md, pictures, and the evaluate / sample /
reconstruct commands, on one tiny trained run."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY
from fixtures import photo, save_jpeg
from helpers.disks import full_disk, read_only
from image_autoencoding.cli import main
from image_autoencoding.runs import report as run_report
from image_autoencoding.runs.checkpoint import load_checkpoint
from image_autoencoding.visualization import plots


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    assert main(["train", "data.dataset=digits", *TINY, f"train.output_dir={out}", "train.epochs=3",
                 "train.checkpoint_every=1", "train.keep_checkpoints=1", "data.image_size=24",
                 "train.tsne_points=300"]) == 0
    (run_dir,) = (out / "results" / "vae").iterdir()
    return run_dir


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_validation_metrics_every_epoch_and_best_checkpoint(run):
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for row in rows:
        for key in ("valid_ssim", "valid_pcc", "valid_mse", "valid_psnr", "valid_recon", "valid_kl"):
            assert np.isfinite(float(row[key])), key
    ssims = [float(r["valid_ssim"]) for r in rows]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best.epoch == int(np.argmax(ssims)) + 1
    assert best.monitor["name"] == "valid_ssim" and best.monitor["best"] == pytest.approx(max(ssims), rel=1e-4)
    # keep_checkpoints=1 pruned older epoch files; best.pt survives as its own name.
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*.pt")) == ["epoch_3.pt"]


def test_report_and_metrics_json_at_the_end_of_training(run):
    document = json.loads((run / "metrics.json").read_text())
    assert document["split"] == "valid" and document["images"] == 359  # the whole digits validation split
    for name in ("ssim", "pcc", "mse", "psnr"):
        summary = document["metrics"][name]
        assert summary["ci95_low"] <= summary["mean"] <= summary["ci95_high"] and summary["n"] == 359
    report = (run / "report.md").read_text()
    assert "| SSIM |" in report and "95% CI" in report and "first batch" in report
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert len(links) >= 8
    for link in links:
        assert (run / link).is_file(), link


def test_the_report_shows_the_pictures_of_the_epoch_it_scores(run, tmp_path):
    """report.md's metrics are best.pt's: its reconstructions and samples must be that epoch's, not
    the last epoch's."""
    import shutil

    from image_autoencoding.runs.checkpoint import save_checkpoint

    copy = shutil.copytree(run, tmp_path / "run")
    state = load_checkpoint(copy / "checkpoints" / "best.pt")
    state.epoch = 2  # best.pt now says it is epoch 2's weights; the last epoch is 3
    save_checkpoint(state, copy / "checkpoints" / "best.pt")
    assert main(["evaluate", str(copy)]) == 0
    report = (copy / "report.md").read_text()
    assert "reconstruction_epoch_002.png" in report and "samples_epoch_002.png" in report
    assert "epoch_003.png" not in report


def test_the_training_latents_are_drawn_too_as_the_original_did(run):
    assert (run / "images/latent/latent_mu_dims_0_1_train.png").is_file()
    assert "images/latent/latent_mu_dims_0_1_train.png" in (run / "report.md").read_text()


@pytest.mark.parametrize("name", [
    "images/latent/latent_mu_dims_0_1.png", "images/latent/latent_mu_dims_0_1_train.png",
    "images/latent/latent_pca.png", "images/latent/latent_tsne.png",
    "images/latent/interpolation.png", "images/latent/kl_per_dimension.png", "images/training_curves.png",
])
def test_every_picture_is_a_png_of_sensible_size(run, name):
    with Image.open(run / name) as image:
        assert image.format == "PNG" and image.width >= 200 and image.height >= 100


def test_interpolation_rows_go_from_one_image_to_another(run):
    with Image.open(run / "images/latent/interpolation.png") as image:
        # 6 pairs x 10 steps of 24 px images enlarged to 72 px, 2 px padding.
        assert image.size == (10 * 74 + 2, 6 * 74 + 2)


def test_latent_plot_has_one_colour_per_class(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    mu = torch.randn(300, 8)
    labels = np.arange(300) % 7
    plots.save_latent_projection(mu, labels, [f"class {i}" for i in range(7)], tmp_path / "x.png")
    (ax,) = figures[0].axes
    colours = {tuple(np.round(c.get_facecolor()[0], 3)) for c in ax.collections}
    assert len(ax.collections) == 7 and len(colours) == 7
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"class {i}" for i in range(7)]


def test_unlabelled_data_still_plots(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.save_latent_dims(torch.randn(50, 4), np.full(50, -1), [], tmp_path / "x.png")
    (ax,) = figures[0].axes
    assert len(ax.collections) == 1 and ax.get_legend() is None


def test_evaluate_command(run, capsys):
    assert main(["evaluate", str(run), "--checkpoint", "last", "--split", "train", "--limit", "100"]) == 0
    out = capsys.readouterr().out
    assert "train split, 100 images, last.pt (epoch 3)" in out and "| SSIM |" in out
    document = json.loads((run / "metrics_train_last_limit_100.json").read_text())
    assert document["images"] == 100 and document["epoch"] == 3 and document["split"] == "train"
    assert (run / "images/latent/latent_pca_train_last_limit_100.png").is_file()


@pytest.mark.parametrize(("argv", "named"), [
    (["evaluate", "{run}", "--checkpoint", "epoch_99"], "epoch_99.pt"),
    (["evaluate", "/nonexistent/run"], "/nonexistent/run"),
    (["reconstruct", "{run}", "/nonexistent/cat.jpg"], "cat.jpg"),
    (["sample", "{run}", "-n", "0"], "-n"),
    (["evaluate", "{run}", "--limit", "0"], "--limit"),
])
def test_command_errors_are_one_line_exit_2(run, capsys, argv, named):
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err


def test_sample_command_writes_grid_and_single_images(run, tmp_path):
    for out, extra in (("a", []), ("b", []), ("c", ["--temperature", "0.1"])):
        assert main(["sample", str(run), "-n", "5", "--seed", "7", *extra, "--out", str(tmp_path / out)]) == 0
    singles = sorted((tmp_path / "a").glob("sample_*.png"))
    assert len(singles) == 5 and (tmp_path / "a/samples_grid.png").is_file()
    with Image.open(singles[0]) as image:
        assert image.size == (24, 24)
    same = [np.asarray(Image.open(p)) for p in (tmp_path / "a/sample_0000.png", tmp_path / "b/sample_0000.png")]
    assert np.array_equal(*same)  # seeded
    assert not np.array_equal(same[0], np.asarray(Image.open(tmp_path / "c/sample_0000.png")))


def test_reconstruct_command_on_user_images(run, tmp_path, capsys):
    first = save_jpeg(photo(0, 300, 200), tmp_path / "holiday.jpg")
    second = tmp_path / "scan.png"
    photo(1).convert("L").save(second)
    assert main(["reconstruct", str(run), str(first), str(second), "--out", str(tmp_path / "out")]) == 0
    for name in ("holiday_reconstruction.png", "scan_reconstruction.png"):
        with Image.open(tmp_path / "out" / name) as image:
            # input above its reconstruction, 24 px enlarged 11x to 264 px (at least 256: a picture to look at)
            assert image.size == (264 + 4, 2 * 266 + 2)


# -- evaluate never replaces the run's own figures ------------------------------------------------------


def test_partial_or_other_checkpoint_evaluation_keeps_the_runs_own_figures(run, capsys):
    own = ["metrics.json", "report.md", "images/latent/latent_pca.png", "images/latent/kl_per_dimension.png",
           "images/latent/interpolation.png"]
    before = {name: (run / name).read_bytes() for name in own}
    assert main(["evaluate", str(run), "--limit", "3"]) == 0
    assert main(["evaluate", str(run), "--checkpoint", "epoch_3", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert {name: (run / name).read_bytes() for name in own} == before

    limited = json.loads((run / "metrics_limit_3.json").read_text())
    assert limited["limit"] == 3 and limited["images"] == 3 and Path(limited["checkpoint"]).name == "best.pt"
    assert "3 images (the first 3: --limit 3), checkpoint `best.pt`" in (run / "report_limit_3.md").read_text()
    other = json.loads((run / "metrics_epoch_3_limit_5.json").read_text())
    assert other["limit"] == 5 and Path(other["checkpoint"]).name == "epoch_3.pt"
    report = (run / "report_epoch_3_limit_5.md").read_text()
    assert "checkpoint `epoch_3.pt`" in report and "latent_pca_epoch_3_limit_5.png" in report
    for name in ("metrics_limit_3.json", "report_limit_3.md", "images/latent/latent_pca_limit_3.png",
                 "metrics_epoch_3_limit_5.json", "report_epoch_3_limit_5.md"):
        assert (run / name).is_file() and str(run / name) in out.splitlines(), name


# -- sample -----------------------------------------------------------------------------------------------


def test_many_samples_are_decoded_in_batches_into_files_and_a_capped_grid(run, tmp_path):
    from torch.nn.modules.module import register_module_forward_hook

    from image_autoencoding.models.vae import Decoder

    batches = []
    hook = register_module_forward_hook(
        lambda module, inputs, output: batches.append(len(inputs[0])) if isinstance(module, Decoder) else None
    )
    try:
        assert main(["sample", str(run), "-n", "300", "--out", str(tmp_path)]) == 0
    finally:
        hook.remove()
    assert sum(batches) == 300 and len(batches) > 1 and max(batches) <= 32  # the run's train.batch_size
    assert len(list(tmp_path.glob("sample_*.png"))) == 300
    with Image.open(tmp_path / "samples_grid.png") as grid:
        assert grid.size == (16 * 74 + 2, 16 * 74 + 2)  # the first 256 samples: 16 x 16 tiles of 72 px


def test_batched_samples_are_the_images_one_whole_batch_gives(run, tmp_path):
    from image_autoencoding.data.batches import Normalizer
    from image_autoencoding.runs.loading import load_from_run

    assert main(["sample", str(run), "-n", "40", "--seed", "3", "--temperature", "0.8", "--out", str(tmp_path)]) == 0
    trained = load_from_run(run)
    config, model = trained.config, trained.model
    whole = model.sample(40, torch.Generator().manual_seed(3), 0.8)  # all at once, as sample used to decode
    whole = Normalizer(config.data, torch.device("cpu")).to_unit(whole)
    for i in (0, 9, 39):  # 39 is in the second batch of 32
        expected = whole[i].mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
        with Image.open(tmp_path / f"sample_{i:04d}.png") as image:
            assert np.array_equal(np.asarray(image), expected), i


@pytest.mark.parametrize("temperature", ["nan", "inf", "-inf", "0", "-1"])
def test_sample_refuses_a_temperature_that_is_not_finite_and_positive(run, tmp_path, capsys, temperature):
    assert main(["sample", str(run), f"--temperature={temperature}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--temperature" in err and temperature in err
    assert not (tmp_path / "out").exists()


# -- reconstruct ------------------------------------------------------------------------------------------


def test_reconstruct_gives_inputs_with_one_name_outputs_of_their_own(run, tmp_path, capsys):
    for folder, index in (("a", 0), ("b", 3)):
        (tmp_path / folder).mkdir()
        photo(index).save(tmp_path / folder / "x.png")
    inputs = [str(tmp_path / "a/x.png"), str(tmp_path / "b/x.png")]
    assert main(["reconstruct", str(run), *inputs, "--out", str(tmp_path / "out")]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == ["x_reconstruction.png", "x_2_reconstruction.png"]
    first, second = (np.asarray(Image.open(p)) for p in written)
    assert not np.array_equal(first, second)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("size", "limit"), [
    ((10000, 9000), None),  # just over the default data.max_image_pixels (89478485), under Pillow's own refusal
    ((1200, 1000), 1_000_000),  # over a lowered data.max_image_pixels
    ((3000, 3000), 1_000_000),  # over twice the limit
])
def test_reconstruct_refuses_images_over_max_image_pixels(run, tmp_path, capsys, recwarn, size, limit):
    import shutil

    if limit is not None:
        run = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("samples", "metrics_*", "report_*"))
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["data"]["max_image_pixels"] = limit
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    Image.new("1", size).save(tmp_path / "huge.png")  # one colour: a few kB on disk
    assert main(["reconstruct", str(run), str(tmp_path / "huge.png"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    pixels = size[0] * size[1]
    assert err.count("\n") == 1 and "huge.png" in err and f"{pixels} pixels" in err
    assert f"data.max_image_pixels ({limit or 89_478_485})" in err
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert not (tmp_path / "out").exists()


# -- help and confidence intervals -------------------------------------------------------------------------


def test_help_shows_percent_signs_and_the_sample_grid_cap(capsys):
    for command in ("evaluate", "sample"):
        with pytest.raises(SystemExit) as exit_status:
            main([command, "--help"])
        assert exit_status.value.code == 0
    out = capsys.readouterr().out
    assert "95% CI" in out and "%%" not in out
    assert "first 256" in out


def test_confidence_interval_of_a_skewed_non_negative_metric_stays_non_negative():
    from image_autoencoding.evaluation.evaluate import SplitEvaluation

    # A few images far out in the right tail: mean - 1.96 sd / sqrt(n) is about -0.9.
    kl = torch.tensor([0.01] * 9 + [10.0], dtype=torch.float64)
    ssim = torch.tensor([0.999, 0.98, 0.999, 0.7, 0.999], dtype=torch.float64)  # symmetric interval passes 1
    evaluation = SplitEvaluation(per_image={"kl": kl, "mse": kl / 100, "ssim": ssim}, mu=torch.zeros(10, 2),
                                 kl_per_dim=torch.zeros(2), original_batch_pcc=0.0)
    summaries = evaluation.summaries()
    for name in ("kl", "mse"):
        s = summaries[name]
        assert 0 <= s.ci95_low < s.mean < s.ci95_high, name
        normal_half = 1.959964 * s.std / math.sqrt(s.n)
        assert s.mean - normal_half < 0  # the case the symmetric interval gets wrong
    s = summaries["ssim"]
    assert s.ci95_low < s.mean < s.ci95_high <= 1


# -- disks that say no, out-of-range options, odd names, --device ----------------------------------------


@pytest.mark.parametrize(("first", "name"), [(1, "metrics_train_limit_3.json"), (2, "report_train_limit_3.md")])
def test_a_full_disk_keeps_the_previous_metrics_and_report_whole(run, monkeypatch, capsys, first, name):
    monkeypatch.setattr(run_report, "write_pictures", lambda *args, **kwargs: {})  # seconds, and not in question
    argv = ["evaluate", str(run), "--split", "train", "--limit", "3"]
    assert main(argv) == 0
    before = {path: (run / path).read_bytes() for path in ("metrics_train_limit_3.json", "report_train_limit_3.md")}
    full_disk(monkeypatch, first)  # the first / second file evaluate writes (metrics, then the report)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err and "No space left on device" in err, err
    assert {path: (run / path).read_bytes() for path in before} == before
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("argv", [["sample", "-n", "2"], ["reconstruct", "{image}"], ["evaluate", "--limit", "3"]])
def test_a_read_only_run_folder_is_one_line_naming_the_folder(run, tmp_path, monkeypatch, capsys, argv):
    image = save_jpeg(photo(0), tmp_path / "p.jpg")
    decoded = []
    monkeypatch.setattr(torch.nn.Module, "__call__", _counting(decoded))
    read_only(monkeypatch, run)
    assert main([argv[0], str(run), *(arg.format(image=image) for arg in argv[1:])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(run) in err and "Read-only file system" in err, err
    assert decoded == []  # refused before any network ran


def _counting(calls: list):
    call = torch.nn.Module.__call__

    def counted(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return call(module, *args, **kwargs)

    return counted


@pytest.mark.parametrize("argv", [["sample", "-n", "2"], ["reconstruct", "{image}"]])
def test_out_naming_a_file_is_one_line_and_the_file_is_kept(run, tmp_path, capsys, argv):
    image = save_jpeg(photo(0), tmp_path / "p.jpg")
    taken = tmp_path / "taken"
    taken.write_text("mine")
    assert main([argv[0], str(run), *(arg.format(image=image) for arg in argv[1:]), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{taken}' is a file, not a folder" in err, err
    assert taken.read_text() == "mine"


@pytest.mark.parametrize(("option", "value"), [("--seed", str(10**23)), ("--seed", str(2**64)),
                                               ("-n", "3000000000")])
def test_sample_refuses_a_seed_or_a_count_out_of_range_in_one_line(run, tmp_path, capsys, option, value):
    assert main(["sample", str(run), option, value, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{option}: expected" in err and value in err, err
    assert not (tmp_path / "out").exists()


def test_sample_takes_the_largest_seed_torch_does(run, tmp_path):
    assert main(["sample", str(run), "-n", "1", "--seed", str(2**64 - 1), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sample_0000.png").is_file()


def test_reconstruct_shortens_an_output_name_longer_than_the_file_system_allows(run, tmp_path, capsys):
    # Legal names (248 bytes); with "_reconstruction.png" added they would be 267, over NAME_MAX (255).
    names = [tmp_path / ("x" * 244 + ".png"), tmp_path / ("x" * 243 + "y.png")]
    for index, name in enumerate(names):
        photo(index).save(name)
    assert main(["reconstruct", str(run), *map(str, names), "--out", str(tmp_path / "out")]) == 0
    written = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert len(set(written)) == 2 and all(path.is_file() for path in written)
    assert all(len(path.name.encode()) <= os.pathconf(tmp_path, "PC_NAME_MAX") for path in written)
    assert all(path.name.startswith("x" * 200) and path.name.endswith("_reconstruction.png") for path in written)


def test_a_file_name_with_a_newline_stays_on_the_one_line_of_the_error(run, tmp_path, capsys):
    bad = tmp_path / "bad\nname.jpg"
    bad.write_text("<!DOCTYPE html><html></html>")
    assert main(["reconstruct", str(run), str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad\\nname.jpg" in err, err


@pytest.mark.parametrize("argv", [["evaluate", "--split", "train", "--limit", "3"],
                                  ["sample", "-n", "2", "--out", "{out}"],
                                  ["reconstruct", "{image}", "--out", "{out}"],
                                  ["encode", "{image}", "-o", "{out}/latents.npz"]])
def test_every_command_that_runs_a_network_takes_device_and_blames_it_for_a_missing_gpu(
        run, tmp_path, monkeypatch, capsys, argv):
    image = save_jpeg(photo(0), tmp_path / "p.jpg")
    args = [argv[0], str(run), *(arg.format(image=image, out=tmp_path / "out") for arg in argv[1:])]
    assert main([*args, "--device", "cpu"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device: 'cuda' requested but no CUDA device" in err and "train." not in err
