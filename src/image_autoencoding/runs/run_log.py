"""train.log in the run folder (and a copy under the original's `-l LOGS` folder), console lines
that do not break the progress bar."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from image_autoencoding.runs.run_paths import RunPaths

FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


@contextlib.contextmanager
def run_logging(run_dir: Path, log_dir: str | None = None, console: bool = True) -> Iterator[logging.Logger]:
    logger = logging.getLogger("image_autoencoding")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handlers: list[logging.Handler] = [logging.FileHandler(RunPaths(run_dir).log, encoding="utf-8")]
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(log_dir) / f"{run_dir.name}.log", encoding="utf-8"))
    if console:
        handlers.append(_TqdmHandler())
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    try:
        yield logger
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
