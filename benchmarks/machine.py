"""One line naming the machine a benchmark ran on: the figures mean little without it.

The same project has been measured on CPUs with and without native bf16 (AVX-512 BF16 / AMX), where
the default precision and the speed differ by about 2x, so the line names the vector extensions.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def vector_extensions() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    present = set(flags.split(":", 1)[1].split())
    names = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in present]
    return "+".join(names) or "no AVX2"


def describe() -> str:
    cuda = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()} ({vector_extensions()}), {torch.get_num_threads()} threads{cuda}, "
            f"torch {torch.__version__}")
