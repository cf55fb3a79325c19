"""Write a file so that readers only ever see the old complete file or the new complete file.

The bytes go to a temporary file in the destination folder (a rename is only atomic within one
file system), are flushed and fsynced, and the temporary file is renamed over the destination.
Any failure, a full disk included, removes the temporary file and leaves the destination as it was.
Temporary names are ".<destination name>.<random>.tmp", so no checkpoint name or pattern matches
them, and a process killed mid-write leaves a file `leftover_temporaries` recognises.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def temporary_folder_beside(path: str | Path) -> Path:
    """A new empty folder ".<name>.<random>.tmp" beside `path`, in which a folder's new contents are
    built before `replace_folder` swaps them in: on the same file system, so the swap is a rename, and
    named so that nothing takes it for the finished folder (a killed process leaves it recognisable)."""
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp creates it 0700; the finished folder gets the usual mode
    return folder


def replace_folder(new: Path, path: str | Path) -> None:
    """Put the folder `new` (from `temporary_folder_beside(path)`) in place of `path`, whole: the old
    folder is renamed aside, `new` renamed into place, the old one deleted. Readers see the old
    folder's files or the new folder's, never a mix of both. If the second rename fails the old
    folder is put back; between the two renames a crash leaves both complete folders, `new` under
    its temporary name and the old one under ".<name>.<random>.old.tmp"."""
    path = Path(path)
    if not path.exists():
        os.rename(new, path)
        fsync_folder(path.parent)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=f".old{TEMP_SUFFIX}", dir=path.parent))
    aside.rmdir()  # only its unique name is wanted: a folder renames onto an empty one on POSIX, not on Windows
    os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise
    fsync_folder(path.parent)
    aside.unlink() if aside.is_symlink() else shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def folder_written_whole(destination: str | Path, what: str) -> Iterator[Path]:
    """A temporary folder beside `destination` to write `what` into. When the block ends without an
    error it replaces `destination` whole: written into the old folder, an export kept the old
    run's files beside the new ones, and a kill midway left one run's description with another's
    weights. On an error it is removed and `destination` stays as it was; a failed write (full
    disk, no permission) is one line naming `destination`."""
    destination = Path(destination)
    folder = destination
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        folder = temporary_folder_beside(destination)
        yield folder
        replace_folder(folder, destination)
    except OSError as exc:
        raise UserError(f"cannot write {what} to '{destination}': {exc.strerror or exc}") from None
    finally:
        if folder != destination:  # the temporary folder of a write that failed
            shutil.rmtree(folder, ignore_errors=True)


def atomic_write_or_explain(path: str | Path, write: Callable[[IO], None], binary: bool = True) -> None:
    """atomic_write, a failure (a full disk, no permission) raised as the one-line UserError that
    names the file; the previous file is kept."""
    try:
        atomic_write(path, write, binary)
    except OSError as exc:
        raise UserError(f"cannot write {quoted(path)}: {exc.strerror or exc}; the previous file, if any, is kept"
                        ) from None
