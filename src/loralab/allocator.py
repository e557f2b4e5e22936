"""How a loralab process asks for CPU memory: two allocator settings that
make training steps cheaper to run and to hold (BENCHMARKS.md, "CPU training
changes: what each saved" and "sft peak memory").

Neither imports torch: :func:`prefer_huge_pages` must run before torch makes
its first allocation, so the package runs it on import.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

THP_ENV = "THP_MEM_ALLOC_ENABLE"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def prefer_huge_pages() -> bool:
    """Have torch back CPU tensors of 2 MiB and more with transparent huge pages.

    torch's CPU allocator reads ``THP_MEM_ALLOC_ENABLE`` once, at its first
    allocation: then it aligns such blocks to 2 MiB and marks them
    ``MADV_HUGEPAGE``. A training step's activations, gradients and weights are
    such blocks; one page fault and one TLB entry then cover 512 small pages,
    and the kernel hands back whole huge pages, so a long-sequence step holds
    less (the measured peak and speed: BENCHMARKS.md, "sft peak memory").
    Only on Linux with transparent huge pages available ("always" or
    "madvise"), before torch is imported, and never over the user's own
    setting. Returns True when it set the variable.
    """
    if sys.platform != "linux" or THP_ENV in os.environ or "torch" in sys.modules:
        return False
    try:
        with open(_THP_MODE) as fh:
            if "[never]" in fh.read():
                return False
    except OSError:
        return False
    os.environ[THP_ENV] = "1"
    return True


# mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_heap() -> bool:
    """Let glibc's malloc keep freed memory for reuse during CPU training.

    A training step allocates and frees the same few hundred tensors every
    micro-batch. With glibc's defaults, blocks from about 128 KiB up are mapped
    fresh and handed back to the kernel when freed, and heap tops beyond a few
    MiB are trimmed, so the next micro-batch faults the same pages in and has
    the kernel zero them again. Blocks up to 32 MiB now come from the heap, and
    freed heap is trimmed only beyond 1 GiB. The cost is a higher peak: freed
    blocks of one size are not always reusable for the next, which huge pages
    (:func:`prefer_huge_pages`) mostly take back. Left alone when the user set
    malloc's own environment variables or the C library is not glibc. Returns
    True when applied.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    return mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok
