"""search/trainable.py: what a trial process does besides calling fit."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux")

CHILD = textwrap.dedent("""
    from search.trainable import release_freed_memory

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
    release_freed_memory()
    print(before, anon_mib(), len(kept))
""")


def test_release_freed_memory_returns_freed_heap_to_the_os():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    before, after, _ = map(float, out.split())
    freed = 6000 * 7 / 8 * 64 / 1024  # MiB freed by `del blocks`: about 328
    assert before - after > 0.5 * freed, (before, after)
