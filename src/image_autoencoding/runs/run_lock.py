"""One writer per run folder: `vae train` holds an exclusive lock on `<run>/.lock` while it trains
and writes the report, so a second `vae train --resume` of the same folder is refused in one line
instead of interleaving checkpoints and metrics.csv rows with the first.

The lock is flock(2) on the open file: the kernel releases it when the process ends in any way
(kill -9 and crashes included), so a lock left by a dead process is never mistaken for a live one and
needs no clean-up. The file stays (deleting it would let a third process lock a new file while a
second still holds the old one); it names the holder for the message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from image_autoencoding.errors import UserError
from image_autoencoding.runs.run_paths import RunPaths


class RunFolderInUse(UserError):
    """Another process is writing this run folder."""


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    path = RunPaths(run_dir).lock
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"cannot lock run folder '{run_dir}': {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise RunFolderInUse(f"run folder '{run_dir}' is in use by {holder}: one vae train at a time per run "
                                 "folder; wait for it to end or stop it") from None
        holder = f"vae train (pid {os.getpid()} on {socket.gethostname()})"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only its holder goes unnamed
        yield
    finally:
        os.close(fd)  # releases the lock
