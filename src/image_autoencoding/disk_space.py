"""Room on disk, in the words of one-line messages: how much a write needs and how much is free."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# The errors of a full disk: no block left, or the user's quota used up.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(folder: Path) -> int | None:
    """Bytes free for this user in the file system holding `folder` (None: it cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def free_space(folder: Path) -> str:
    """The room free in `folder`'s file system, as a message says it."""
    free = free_bytes(folder)
    return "an unknown amount" if free is None else human_size(free)


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
