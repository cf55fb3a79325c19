"""Validation metrics during training, best.pt, report.md, pictures, and the evaluate / sample /
reconstruct commands, on one tiny trained run."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY
from fixtures import photo, save_jpeg
from image_autoencoding.cli import main
from image_autoencoding.training.checkpoint import load_checkpoint
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
    assert best["epoch"] == int(np.argmax(ssims)) + 1
    assert best["best_ssim"] == pytest.approx(max(ssims), rel=1e-4)
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


@pytest.mark.parametrize("name", [
    "images/latent/latent_mu_dims_0_1.png", "images/latent/latent_pca.png", "images/latent/latent_tsne.png",
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
    document = json.loads((run / "metrics_train.json").read_text())
    assert document["images"] == 100 and document["epoch"] == 3
    assert (run / "images/latent/latent_pca_train.png").is_file()


def test_evaluate_reads_runs_from_earlier_versions(run, tmp_path, capsys):
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    config["train"]["a_key_this_version_dropped"] = 1
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["evaluate", str(old), "--limit", "40"]) == 0


@pytest.mark.parametrize(("argv", "named"), [
    (["evaluate", "{run}", "--checkpoint", "epoch_99"], "epoch_99.pt"),
    (["evaluate", "/nonexistent/run"], "/nonexistent/run"),
    (["reconstruct", "{run}", "/nonexistent/cat.jpg"], "cat.jpg"),
    (["sample", "{run}", "-n", "0"], "-n"),
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
            assert image.size == (72 + 4, 2 * 74 + 2)  # input above its reconstruction, enlarged to 72 px
