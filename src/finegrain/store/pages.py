"""The index's memory-mapped files, and an optional bound on how much of them stays in the process's RSS.

Vector chunks and gathered rows are memory-mapped (:func:`map_npy`), so a search costs the pages it reads,
not a copy. Linux maps 16 pages around each page a read faults in ("fault-around"; ``MADV_RANDOM`` does not
change it), and a mapped page stays counted in the process's RSS until the mapping goes. After 100
``hierarchical`` searches of a 1M-image index, 6.6 GB of mapped index pages were resident beside 3.9 GB of the
process's own memory (4.5 GB once the global rows came from the HNSW graph's copy; docs/benchmarks.md,
"Mapped pages and RSS at 1M"). Those pages are the page cache's:
clean, shared, and reclaimed by the kernel under memory pressure like any cached file page.

``FINEGRAIN_MAPPED_MB=N`` bounds them for deployments that need a bounded RSS (monitoring, several processes
on one machine). :func:`trim` runs after every search: it reads the process's resident file pages
(``/proc/self/statm``) and, when they grew by more than N MiB since the last trim, unmaps every page of every
index mapping (``MADV_DONTNEED``). Nothing is lost: the pages stay in the page cache while the kernel keeps
them, and the next read maps them again with a minor fault. That refault is the cost: at 1M images with a
1,024 MiB bound, nearly every query maps its pages afresh (about 0.6 GB) and search time doubled
(31.7 -> 61.0 ms p50, peak RSS 10.5 -> 5.6 GB). The default is ``off`` (no bound: the kernel decides).
Where ``/proc`` or ``madvise`` is missing (not Linux), :func:`trim` does nothing.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_BUDGET_MB", "budget_bytes", "is_mapped", "map_npy", "release", "release_array",
           "release_free_heap", "resident_file_bytes", "trim"]

#: Resident mapped index pages (MiB) a process may gain before :func:`trim` unmaps them (None: no bound).
DEFAULT_BUDGET_MB: int | None = None
ENV = "FINEGRAIN_MAPPED_MB"

_MAPS: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()  # every live mapping map_npy made
_LOCK = threading.Lock()
_baseline: int | None = None  # resident file bytes right after the last trim (or at the first check)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def map_npy(path: Path, header_lock: threading.Lock | None = None) -> np.ndarray:
    """A read-only array over a .npy file's data, memory-mapped (``ValueError`` for a bad or short file).

    Like ``np.load(path, mmap_mode="r")``, but the mapping is this module's, so :func:`release` can unmap
    its pages. Object arrays are refused (no pickle). ``header_lock`` serialises the header's parsing
    (see :data:`finegrain.store.vectors.NPY_LOCK`).
    """
    fmt = np.lib.format
    with open(path, "rb") as fh:
        version = fmt.read_magic(fh)
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"{path}: unsupported .npy version {version}")
        if header_lock is None:
            shape, fortran, dtype = read_header(fh)
        else:
            with header_lock:
                shape, fortran, dtype = read_header(fh)
        if dtype.hasobject:
            raise ValueError(f"{path} holds Python objects, which are never loaded (no pickle)")
        offset = fh.tell()
        count = math.prod(shape)
        size = os.fstat(fh.fileno()).st_size
        if size < offset + count * dtype.itemsize:
            raise ValueError(f"{path} is truncated: {size} bytes for {shape} {dtype} rows")
        if count == 0:  # nothing to map (and an empty mapping is refused)
            empty = np.zeros(shape, dtype)
            empty.flags.writeable = False
            return empty
        mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    global _baseline
    with _LOCK:
        if _baseline is None:  # before the first index page is read: what the process had mapped of its own
            _baseline = resident_file_bytes()
        _MAPS.add(mapping)
    arr = np.frombuffer(mapping, dtype, count=count, offset=offset)  # keeps the mapping alive
    return arr.reshape(shape, order="F" if fortran else "C")


def is_mapped(array: object) -> bool:
    """Whether ``array`` is (a view of) a memory-mapped file, not a copy in memory."""
    return _mapping_of(array) is not None


def _mapping_of(array: object) -> mmap.mmap | np.memmap | None:
    while array is not None:
        if isinstance(array, (mmap.mmap, np.memmap)):
            return array
        array = array.obj if isinstance(array, memoryview) else getattr(array, "base", None)
    return None


def release_array(array: object) -> bool:
    """Unmap the resident pages of the mapping ``array`` views (a no-op for arrays in memory); True if released.

    For passes that read a whole field once (the local database's near-duplicate reduction): without it,
    every page they read stays counted in the process's RSS, 12 GB for 100,000 images' local descriptors.
    """
    mapping = _mapping_of(array)
    if not isinstance(mapping, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (ValueError, OSError):  # closed meanwhile, or a kernel that refuses
        return False
    return True


def budget_bytes() -> int | None:
    """The bound in bytes from ``FINEGRAIN_MAPPED_MB`` (None: ``off``, the default); ``ValueError`` for a bad value."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw:
        return None if DEFAULT_BUDGET_MB is None else DEFAULT_BUDGET_MB << 20
    if raw in ("off", "none", "never"):
        return None
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ValueError(f"{ENV} must be a whole number of MiB (0 or more) or 'off', not {raw!r}")
    return mb << 20


def resident_file_bytes() -> int | None:
    """Bytes of file-backed (and shared) pages resident in this process, or None where /proc has no statm."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[2]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def release() -> int:
    """Unmap the resident pages of every index mapping (they stay in the page cache); how many mappings."""
    if not hasattr(mmap.mmap, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    done = 0
    for mapping in list(_MAPS):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
            done += 1
        except (ValueError, OSError):  # closed meanwhile, or a kernel that refuses: nothing to release
            pass
    return done


def trim() -> bool:
    """Unmap index pages when the process's resident file pages grew past the budget since the last trim.

    Cheap when under budget (one read of ``/proc/self/statm``); True when it released.
    """
    global _baseline
    limit = budget_bytes()
    if limit is None or not _MAPS:
        return False
    now = resident_file_bytes()
    if now is None:
        return False
    with _LOCK:
        if _baseline is None or now < _baseline:
            _baseline = now  # libraries mapped since start count here once, not as index pages
            return False
        if now - _baseline <= limit:
            return False
        release()
        after = resident_file_bytes()
        _baseline = now if after is None else after
        return True


def release_free_heap() -> bool:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``); False where there is none.

    Building a snapshot's derived structures frees many temporary arrays of tens of MB. glibc keeps such
    freed memory in the process: after the 1M index's segment table was built, 0.64 GB of anonymous RSS
    was freed memory, which ``malloc_trim(0)`` returned (docs/benchmarks.md, "Mapped pages and RSS at 1M").
    """
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018  (raises AttributeError where libc has no malloc_trim: not glibc)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True


_libc: Any = None

