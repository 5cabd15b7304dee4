"""Freed memory kept for the next batch while backbones run on a CPU.

glibc hands a freed block larger than its mmap threshold (128 kB, rising with use to at most
32 MB) back to the kernel, and the next allocation of that size is page-faulted in again, a
zeroed page at a time. A backbone's forward pass allocates and frees activations of tens of MB
per batch (EfficientNet over 32 images: hundreds of thousands of faults per batch), so the
kernel's page zeroing can take as long as the convolutions (docs/results.md, the served model).
Raising the thresholds keeps those blocks in the heap and reuses them; the cost is a process that
keeps its peak heap until `release_freed_memory`. Where the C library is not glibc, both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEEP_BYTES = 1 << 30
# Where glibc's own adaptive thresholds top out (64-bit): what a process returns to after a pass.
ADAPTIVE_MMAP_MAX = 32 << 20


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") and hasattr(libc, "gnu_get_libc_version")):
            return None
    except OSError:
        return None
    return libc


def keep_freed_memory() -> bool:
    """Blocks up to 1 GB come from the heap and stay in it when freed. True where it took effect.
    A thread other than the main one allocates from heaps (arenas) of at most 64 MB whatever the
    thresholds, so there batches should keep single activations well under that
    (mmsa.features.resident)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))


def trim_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim), thresholds untouched.
    A trial process that Ray reuses for the next trial (reuse_actors) otherwise carries each
    earlier trial's largest batches (search.trainable calls it after every epoch)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_freed_memory() -> None:
    """After a long pass with `keep_freed_memory` (building a cache): hand the heap's free pages back
    to the kernel, and set the thresholds where glibc's adaptation would have taken them (mmap above
    32 MB, trim above 64 MB), so that the rest of the process (a search's driver) keeps no more
    than it would have."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_THRESHOLD, ADAPTIVE_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * ADAPTIVE_MMAP_MAX)
