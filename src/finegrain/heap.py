"""Handing freed heap memory back to the operating system between commits.

Indexing frees each batch's decoded pixels, feature maps and proposals, but
glibc's allocator keeps most freed blocks mapped for reuse, and with images of
many sizes the heap fragments: on the real 7,000-image Flickr8k run the
process's resident memory grew with every commit although nothing the indexer
keeps grew (docs/benchmarks.md, "Real-data scale check"; at 128 images
``malloc_trim`` took the anonymous memory from 856 MB to 257 MB). Trimming
once per commit bounds resident memory by one commit's working set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (musl, macOS, Windows: they return memory differently)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return freed heap pages to the OS where the C library can (glibc); False where it cannot."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
