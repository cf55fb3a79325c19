from __future__ import annotations

import pytest
import torch

from image_autoencoding.runs import report as run_report

# The tiny seed network's own keys: a run of another model.arch leaves them out (any_arch), since
# each architecture takes only its own keys.
TINY_SEED_MODEL = [
    "model.encoder_channels=[8,16,16]",
    "model.decoder_channels=[16,16,8,3]",
    "model.fc_dim=32",
]
# A small network and few steps: every end-to-end test trains for real, in seconds.
TINY = [
    "data.image_size=16",
    *TINY_SEED_MODEL,
    "model.latent_dim=8",
    "train.batch_size=32",
    "train.max_steps_per_epoch=3",
    "train.grid_images=4",
    "train.sample_images=9",
    "train.progress=false",
    "train.tsne_points=0",  # t-SNE adds seconds to every run; test_evaluation turns it on
]



def any_arch(overrides: list[str]) -> list[str]:
    """`overrides` without the tiny seed network's own keys, for a run that names its model.arch."""
    return [text for text in overrides if text not in TINY_SEED_MODEL]


@pytest.fixture
def tiny(tmp_path) -> list[str]:
    """Overrides for a tiny digits run writing under tmp_path."""
    return ["data.dataset=digits", *TINY, f"train.output_dir={tmp_path}"]


@pytest.fixture
def one_thread():
    """One torch thread for the test: runs compared bit for bit, in process and in subprocesses,
    sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_final_report(monkeypatch):
    """Runs that only need their checkpoints skip the scoring after the last epoch (seconds each;
    test_evaluation covers it)."""
    monkeypatch.setattr(run_report, "final_report", lambda *args: None)
