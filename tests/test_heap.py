"""mmsa/features/heap.py: freed memory kept for the next batch, and handed back."""

import subprocess
import sys
import textwrap

import pytest

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux")

CHILD = textwrap.dedent("""
    from mmsa.features.heap import trim_freed_memory

    def anon_mib():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) / 1024

    # 64 KiB blocks live on the heap (under glibc's mmap threshold); keeping every 8th one alive
    # pins the heap's top, so freeing the rest does not shrink it on its own.
    blocks = [bytearray(64 * 1024) for _ in range(6000)]
    kept = blocks[::8]
    del blocks
    before = anon_mib()
    trim_freed_memory()
    print(before, anon_mib(), len(kept))
""")


@linux_only
def test_trimming_returns_freed_heap_to_the_os():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    before, after, _ = map(float, out.split())
    freed = 6000 * 7 / 8 * 64 / 1024  # MiB freed by `del blocks`: about 328
    assert before - after > 0.5 * freed, (before, after)


def test_keeping_freed_memory_takes_effect_here():
    """On glibc (this project's Linux images and CI) the heap settings are accepted."""
    import platform

    from mmsa.features.heap import keep_freed_memory, release_freed_memory
    if platform.libc_ver()[0] != "glibc":
        pytest.skip(f"the C library is {platform.libc_ver()[0] or 'unknown'}, not glibc")
    assert keep_freed_memory()
    release_freed_memory()
