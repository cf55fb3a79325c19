"""Disks that say no, simulated inside the test process at the calls that open and write files, so
the tests run the same for every user: root ignores a folder's permission bits (chmod cannot make a
folder read-only for it), and mounting a small full tmpfs needs root.

`read_only(monkeypatch, folder)`: creating or opening for writing any file or folder under `folder`
fails with EROFS, as on a read-only mount; reading still works.

`full_disk(monkeypatch, first=1)`: from the `first`-th file opened for writing (through pathlib,
os.fdopen or zipfile, i.e. io.open) on, each such file takes a few bytes, then its write fails with
ENOSPC, as on a full disk: a file written in place is left truncated.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

FULL_AFTER_BYTES = 16


def _refuse(code: int, path=None):
    raise OSError(code, os.strerror(code), *([os.fspath(path)] if path is not None else []))


def read_only(monkeypatch, folder: Path) -> None:
    folder = Path(folder).resolve()
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def inside(path) -> bool:
        return isinstance(path, str | bytes | os.PathLike) and Path(os.fsdecode(path)).resolve().is_relative_to(folder)

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and inside(file):
            _refuse(errno.EROFS, file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            _refuse(errno.EROFS, path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path) and not Path(path).exists():
            _refuse(errno.EROFS, path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


class _FillsUp:
    """A file handle on a disk that has FULL_AFTER_BYTES left."""

    def __init__(self, handle):
        self._handle, self._room = handle, FULL_AFTER_BYTES

    def write(self, data):
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._handle.flush()
            self._room = 0
            _refuse(errno.ENOSPC)
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.__exit__(*exc_info)

    def __iter__(self):
        return iter(self._handle)


def full_disk(monkeypatch, first: int = 1) -> list[str]:
    """Returns the list of what was opened for writing (names, or file descriptors as text)."""
    real_open = io.open
    opened: list[str] = []

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if not any(flag in mode for flag in "wax+"):
            return handle
        opened.append(str(file))
        return _FillsUp(handle) if len(opened) >= first else handle

    monkeypatch.setattr(io, "open", open_on_a_full_disk)
    return opened
