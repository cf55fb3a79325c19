"""Write a file so that readers only ever see the old complete file or the new complete file.

The bytes go to a temporary file in the destination folder (a rename is only atomic within one
file system), are flushed and fsynced, and the temporary file is renamed over the destination.
Any failure, a full disk included, removes the temporary file and leaves the destination as it was.
Temporary names are ".<destination name>.<random>.tmp", so no checkpoint name or pattern matches
them, and a process killed mid-write leaves a file `leftover_temporaries` recognises.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from image_autoencoding.errors import UserError, quoted

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    # mkstemp creates files 0600; the finished file should get the usual umask-based mode.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = True) -> None:
    """Call write(handle) on a temporary file, then rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        text_options = {} if binary else {"newline": "", "encoding": "utf-8"}
        with os.fdopen(fd, "wb" if binary else "w", **text_options) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def leftover_temporaries(folder: Path, names: str) -> list[Path]:
    """Temporary files of atomic_write for destinations matching the glob `names` (e.g. "*.pt") in
    `folder`: what a process killed mid-write left behind. Only a folder's writer may remove them,
    and only while no write is under way."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f".{names}.*{TEMP_SUFFIX}") if p.is_file())


def fsync_folder(folder: Path) -> None:
    """Make a rename durable: on POSIX the folder entry must reach the disk too. Not every platform
    lets a folder be opened; a missed fsync costs durability after a power cut, not correctness."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_or_explain(path: str | Path, write: Callable[[IO], None], binary: bool = True) -> None:
    """atomic_write, a failure (a full disk, no permission) raised as the one-line UserError that
    names the file; the previous file is kept."""
    try:
        atomic_write(path, write, binary)
    except OSError as exc:
        raise UserError(f"cannot write {quoted(path)}: {exc.strerror or exc}; the previous file, if any, is kept"
                        ) from None
