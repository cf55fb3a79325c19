"""Writes tests/fixtures_data/export_v2/: a `vae export` of a tiny digits run (one epoch, 16 x 16
images, the test suite's TINY model), the export format version 2 as the package wrote it before
`models/pretrained.py` took over writing and reading exports. tests/test_pretrained.py checks that
such a folder still loads and that saving its model again writes the same bytes.

Run with the package to test against on the path, from a scratch folder (training writes a cache
and a run folder into the current folder):

    git archive COMMIT src | tar -x -C /tmp/old && cd "$(mktemp -d)" && \
        PYTHONPATH=/tmp/old/src python REPO/tests/fixtures_data/make_export_v2.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from image_autoencoding.cli import main

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from conftest import TINY  # noqa: E402 -- the tests' tiny model, found beside this folder

OUT = HERE / "export_v2"


def make() -> None:
    work = Path.cwd()
    assert main(["train", "data.dataset=digits", *TINY, "train.epochs=1", f"train.output_dir={work}",
                 f"data.cache_dir={work / 'cache'}"]) == 0
    (run,) = (work / "results" / "vae").iterdir()
    shutil.rmtree(OUT, ignore_errors=True)
    assert main(["export", str(run), "--out", str(OUT)]) == 0


if __name__ == "__main__":
    make()
