"""How a loralab training process asks for CPU memory: two allocator settings
that make its steps cheaper to run and to hold (BENCHMARKS.md, "CPU training
changes: what each saved" and "sft peak memory").
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

THP_ENV = "THP_MEM_ALLOC_ENABLE"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
# micro-batches whose hidden states hold this many elements (4 MiB in fp32) or
# more get huge pages. Measured: smollm2-135m sft at 4 x 512 tokens (1.2M
# elements), 0.8 GB lower peak and no slower; minilm at 4 x 128 (0.2M), LoRA
# steps 14 % slower; at 16 x 128 (0.8M) LoRA +4 %, full -8 % (BENCHMARKS.md,
# "sft peak memory")
HUGE_PAGE_ELEMENTS = 1 << 20


def prefer_huge_pages(micro_batch_tokens: int, hidden_size: int | None) -> bool:
    """Have torch back CPU tensors of 2 MiB and more with transparent huge
    pages when a micro-batch's hidden states (tokens x hidden size) hold
    ``HUGE_PAGE_ELEMENTS`` or more.

    torch's CPU allocator reads ``THP_MEM_ALLOC_ENABLE`` once, at its first
    allocation, and then marks such blocks ``MADV_HUGEPAGE``: one page fault
    and one TLB entry cover 512 small pages, and on a long-sequence step the
    peak RSS came down by most of what glibc's kept heap added. On short
    micro-batches the same setting made LoRA steps slower, hence the cut. So
    it must run before torch allocates anything (``run_training`` calls it
    first); set later, it changes nothing. Only on Linux with transparent huge
    pages available ("always" or "madvise"), never over the user's own value.
    Returns True when it set the variable.
    """
    if (not hidden_size or micro_batch_tokens * hidden_size < HUGE_PAGE_ELEMENTS
            or sys.platform != "linux" or THP_ENV in os.environ):
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
