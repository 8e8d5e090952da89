"""Handing freed heap memory back to the operating system between commits.

Indexing frees each batch's decoded pixels, feature maps and proposals, but
glibc's allocator keeps most freed blocks mapped for reuse, and with images of
many sizes the heap fragments: on the real 7,000-image Flickr8k run the
process's resident memory grew with every commit although nothing the indexer
keeps grew (docs/benchmarks.md, "Real-data scale check"; at 128 images
``malloc_trim`` took the anonymous memory from 856 MB to 257 MB). Trimming
once per commit bounds resident memory by one commit's working set.

Blocks of a megabyte or more (decoded images, feature maps) are also
allocated with ``mmap`` during indexing, so freeing one returns it at once:
glibc otherwise raises its mmap threshold after the first such free and serves
later big blocks from the heap, where they fragment it. On 288 real images
that lowered the per-commit anonymous-memory peaks from 1.45-1.67 GB to
1.17-1.36 GB and slowed the growth of the trimmed floor (same images, same
run otherwise; docs/benchmarks.md, "Real-data scale check").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

__all__ = ["MMAP_THRESHOLD", "map_large_blocks", "release_free_memory"]

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


@functools.cache
def _libc_function(name: str, *argtypes: Any) -> Any:
    """A glibc function, or None (musl, macOS, Windows: they return memory differently)."""
    lib = ctypes.util.find_library("c")
    if lib is None:
        return None
    try:
        fn = getattr(ctypes.CDLL(lib), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return freed heap pages to the OS where the C library can (glibc); False where it cannot."""
    fn = _libc_function("malloc_trim", ctypes.c_size_t)
    if fn is None:
        return False
    fn(0)
    return True


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Allocate blocks of ``threshold`` bytes or more with mmap from now on (process-wide; glibc only)."""
    fn = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    return fn is not None and bool(fn(_M_MMAP_THRESHOLD, int(threshold)))
