"""One line naming the machine a benchmark ran on: the figures mean little without it.

The same project has been measured on CPUs with and without native bf16 (AVX-512 BF16 / AMX), where
the default precision and the speed differ by about 2x, so the line names the vector extensions.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line of /proc/cpuinfo (every core repeats them), or None."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), None)


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def vector_extensions() -> str:
    flags = _cpuinfo_field("flags")
    if flags is None:
        return "unknown"
    present = set(flags.split())
    names = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in present]
    return "+".join(names) or "no AVX2"


def describe() -> str:
    cuda = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()} ({vector_extensions()}), {torch.get_num_threads()} threads{cuda}, "
            f"torch {torch.__version__}")
