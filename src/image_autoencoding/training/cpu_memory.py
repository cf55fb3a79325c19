"""Let a CPU training process keep the memory it frees, so the next step does not fault it in again.

glibc's malloc serves large blocks with mmap and returns freed memory at the top of the heap to the
kernel once more than M_TRIM_THRESHOLD of it is free. A training step frees and re-allocates the same
large temporaries every time (activations of a batch; the optimizer's temporaries for the 16.8 M
weights of the encoder's FC layer: a 64 MiB `sqrt` alone), so each step paid for tens of thousands of
page faults on freshly zeroed pages (tests/test_cpu_memory.py counts them). With mmap off and a
1 GiB trim threshold the heap settles after a few steps and the blocks are reused: on an AVX-512
BF16 machine, bf16 training went from ~160 to ~184 img/s, for ~60 MB more peak memory. The trim
threshold is 1 GiB because the default model's fp32 step at batch 64 (AVX2 machine) leaves more than
256 MiB free at the top of the heap now and then: with a 256 MiB threshold the kernel time of the
end-to-end loop's steps averaged 26 ms (4 to 68 over five runs) against 5 ms (3 to 6) at 1 GiB, with
the same peak memory; a fault costs ~4.4 us a page on these VMs. It is the same cure as LD_PRELOADing tcmalloc
(measured equal here; jemalloc was slower), done from inside the process, so it applies to
`vae train` and to library use alike, with nothing to install.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

TRIM_THRESHOLD_BYTES = 2**30  # freed memory kept at the top of the heap; above it, returned to the kernel


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for this process; True when it did (False on other C libraries and
    systems, where nothing changes). Only allocations made afterwards are affected."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
    except (OSError, AttributeError):
        return False
    # A failed brk still falls back to mmap inside glibc, so very large blocks remain possible.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
