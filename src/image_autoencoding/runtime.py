"""Device, precision and CPU memory settings, shared by the CPU and GPU paths so CPU tests cover both."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Callable

import torch

from image_autoencoding.config import ConfigError


def resolve_device(name: str, source: str = "config key 'train.device'") -> torch.device:
    """`name` (auto, cpu, cuda, cuda:N) as a device of this machine; `source` says in an error where
    the name came from (an option such as --device, or a config key)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{source}: expected auto, cpu, cuda or cuda:N (got {name!r})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{source}: {name!r} requested but no CUDA device is available")
    return device


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Without native bf16 instructions autocast emulates it and runs slower than fp32.
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on a CPU with native bf16, else fp32. Not bf16 on GPUs: at this model's size a GPU
    step is bound by kernel launches, and autocast's casts only add to them (H200, batch 64: fp32
    11,138 img/s, bf16 9,850; validation SSIM after 300 steps 0.470 against 0.451)."""
    if precision == "auto":
        return "bf16" if device.type == "cpu" and bf16_supported(device) else "fp32"
    return precision


def autocast_factory(device: torch.device, precision: str, cache: bool = True
                     ) -> Callable[[], contextlib.AbstractContextManager]:
    """Weights and optimizer state stay fp32; only the forward pass runs in bf16. `cache`: autocast
    keeps the low-precision copy of a weight used twice in one region; off for CUDA graphs."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return lambda: torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)
    return contextlib.nullcontext


# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

TRIM_THRESHOLD_BYTES = 2**30  # freed memory kept at the top of the heap; above it, returned to the kernel


def keep_freed_memory() -> bool:
    """Let a CPU training process keep the memory it frees, so the next step does not fault it in
    again. True when it did (False on other C libraries and systems, where nothing changes); only
    allocations made afterwards are affected.

    glibc's malloc serves large blocks with mmap and returns freed memory at the top of the heap to
    the kernel once more than M_TRIM_THRESHOLD of it is free. A training step frees and re-allocates
    the same large temporaries every time (a batch's activations; the optimizer's temporaries for
    the 16.8 M weights of the encoder's FC layer: a 64 MiB `sqrt` alone), so each step paid for tens
    of thousands of page faults on freshly zeroed pages (tests/test_cpu_memory.py counts them), at
    ~4.4 us a page on these VMs. With mmap off the blocks are reused once the heap settles: bf16
    training on an AVX-512 BF16 machine ~160 -> ~184 img/s, for ~60 MB more peak memory. The trim
    threshold is 1 GiB because the default model's fp32 step at batch 64 (AVX2 machine) leaves more
    than 256 MiB free at the top of the heap now and then: at 256 MiB the kernel time of the
    end-to-end loop's steps averaged 26 ms (4 to 68 over five runs), at 1 GiB 5 ms (3 to 6), with
    the same peak memory. The same cure as LD_PRELOADing tcmalloc (measured equal here; jemalloc was
    slower), from inside the process, so it applies to `vae train` and library use alike."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
    except (OSError, AttributeError):
        return False
    # A failed brk still falls back to mmap inside glibc, so very large blocks remain possible.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def use_tf32(enabled: bool, device: torch.device) -> bool:
    """train.tf32, set once per process for the training device: on CUDA, fp32 matrix products
    (cuBLAS) and convolutions (cuDNN) use TF32 or full fp32 ("ieee"); on other devices nothing is
    changed. Returns whether TF32 is now in use. PyTorch's own defaults differ between the two
    (matmul off, cuDNN on): both are set, so the key means one thing. Through the allow_tf32 flags:
    after them both those and the newer fp32_precision settings read consistently, whereas setting
    fp32_precision makes a later read of allow_tf32 (by a library) raise in torch 2.14."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def use_cuda_graphs(setting: str | bool, device: torch.device, precision: str, world_size: int
                    ) -> tuple[bool, str]:
    """train.cuda_graphs for this run: (on, why). auto: on with a CUDA device, except under torchrun
    (DistributedDataParallel's gradient buckets are built during the first steps and its
    collectives would have to be captured too: not supported here) and with fp16 (GradScaler
    decides a skipped step on the host). true where it cannot work is a one-line ConfigError."""
    key = "config key 'train.cuda_graphs'"
    if device.type != "cuda":
        if setting is True:
            raise ConfigError(f"{key}: true needs a CUDA device (train.device is {device}); use auto or false")
        return False, f"no CUDA device ({device})"
    reasons = [why for why, applies in (("under torchrun", world_size > 1),
                                        ("with fp16 loss scaling", precision == "fp16")) if applies]
    if reasons:
        if setting is True:
            raise ConfigError(f"{key}: true is not supported {reasons[0]}; use auto or false")
        return False, f"not supported {reasons[0]}"
    if setting is False:
        return False, "train.cuda_graphs is false"
    return True, "CUDA device"
