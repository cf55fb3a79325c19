"""Files of tensors (.pt checkpoints, .pth weights) read with `torch.load(weights_only=True)`: plain
tensors and Python values only, so a file crafted to run code on load runs nothing. A refusal or a
damaged file is explained in one line that never repeats torch's advice to load the file with
weights_only=False, which a user must never be told to do with a file they did not make."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from image_autoencoding.errors import UserError, quoted

# torch's refusal names the global as "GLOBAL module.name"; the rest of its message is advice to
# load the file unpickling anything.
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*([^\n]*)")


def load_plain(path: str | Path, what: str, error: type[UserError] = UserError,
               map_location: str | torch.device = "cpu") -> Any:
    """The file's contents, or `error` with `unreadable_message`. `what` names the kind of file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, refused global: all mean "not ours"
        raise error(unreadable_message(Path(path), exc, what)) from None


def unreadable_message(path: Path, exc: Exception, what: str) -> str:
    """One line on why `torch.load(path, weights_only=True)` raised `exc`, naming the file as a `what`
    ("checkpoint", "weights file")."""
    text = str(exc).strip()
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        return (f"{what} {quoted(path)} is not a plain-tensor {what}: it needs the Python object "
                f"{refused.group(1)}, which is not loaded because unpickling it could run code")
    detail = _UNPICKLER_REASON.search(text)
    if detail:
        return f"{what} {quoted(path)} is not a plain-tensor {what}: {_first_sentence(detail.group(1))}"
    reason = _first_sentence(text)
    if not isinstance(exc, RuntimeError):  # torch's readers raise RuntimeError; anything else is a stray pickle
        reason = f"not a PyTorch {what} ({type(exc).__name__}: {reason})"
    return f"{what} {quoted(path)} cannot be read safely: {reason}"


def _first_sentence(text: str) -> str:
    """What went wrong, without the advice torch appends (which may suggest an unsafe load)."""
    sentence = (text.strip().splitlines() or [""])[0].split(". ")[0].strip()
    return sentence[:200] if sentence and "weights_only" not in sentence else "unreadable"
