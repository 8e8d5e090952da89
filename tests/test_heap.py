"""release_free_memory gives a fragmented heap's freed pages back (what keeps a long index run's RSS flat)."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from finegrain.heap import release_free_memory

PROBE = """
import numpy as np
from finegrain.heap import release_free_memory

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024

# 100 KB blocks sit under glibc's mmap threshold, so they come from the heap; keeping every 20th one
# pins the heap so that it cannot simply shrink from the top: the freed middle stays resident.
blocks = [np.ones(100_000 // 8) for _ in range(3000)]
kept = blocks[::20]
del blocks
before = anon_mb()
ok = release_free_memory()
print(ok, before, anon_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="malloc_trim is glibc's (Linux)")
def test_release_returns_freed_heap_pages():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    ok, before, after = out[0] == "True", float(out[1]), float(out[2])
    assert ok
    assert before - after > 100, (before, after)  # about 285 MB were freed in the middle of the heap


def test_release_is_safe_to_call_repeatedly():
    assert release_free_memory() in (True, False)
    assert release_free_memory() in (True, False)


LARGE = """
import sys
import numpy as np
from finegrain.heap import map_large_blocks

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "mapped":
    assert map_large_blocks()
first = np.ones(2_000_000 // 8)
del first  # one big block freed: glibc now serves blocks this big from the heap
blocks = [np.ones(2_000_000 // 8) for _ in range(150)]
kept = blocks[::20]
del blocks
print(anon_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="mallopt is glibc's (Linux)")
def test_large_blocks_go_back_at_once_when_mapped():
    def resident(variant: str) -> float:
        return float(subprocess.run([sys.executable, "-c", LARGE, variant], capture_output=True, text=True,
                                    check=True).stdout)

    heap, mapped = resident("heap"), resident("mapped")
    assert heap - mapped > 150, (heap, mapped)  # about 270 MB of freed 2 MB blocks stay resident on the heap
