"""Vector chunks on disk: immutable ``.npy`` files, memory-mapped when read.

A *field* is one kind of vector (``global`` today; segments, objects and
local features later). Each field is stored as chunks; a chunk holds rows
for a batch of images:

* ``vectors/<field>/<chunk>.npy``       (n, d) float32 vectors (float16 where the field is stored compact)
* ``vectors/<field>/<chunk>.owner.npy`` (n,) int64 image id of each row
* ``vectors/<field>/<chunk>.<attr>.npy`` optional per-row attributes

Files are written under a temporary name, flushed to disk, then renamed, so a
reader never sees a partial file. A chunk belongs to the index only once the
catalog lists it (see :mod:`finegrain.store.catalog`).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

VECTORS_DIR = "vectors"
#: What a vector file may hold: native float32, or float16/int8 for compact fields (``<f4``/``<f2``/``|i1``).
VECTOR_DTYPES = (np.dtype(np.float32).str, np.dtype(np.float16).str, np.dtype(np.int8).str)
OWNER_DTYPE = np.dtype(np.int64).str
DIGEST_SIZE = 16  # BLAKE2b-128 per file: damage detection, not an authentication code


@dataclass
class FieldRows:
    """Rows of one field: vectors, the image id owning each row, and extra per-row arrays."""

    vectors: np.ndarray
    owners: np.ndarray
    attrs: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # float16 and int8 stay as they are (compact fields, local features); anything else is float32
        given = np.asarray(self.vectors).dtype
        dtype = given if given in (np.float16, np.int8) else np.float32
        self.vectors = np.ascontiguousarray(self.vectors, dtype=dtype)
        self.owners = np.ascontiguousarray(self.owners, dtype=np.int64)
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.owners):
            raise ValueError(f"vectors {self.vectors.shape} and owners {self.owners.shape} do not match")
        for name, arr in self.attrs.items():
            if len(arr) != len(self.owners):
                raise ValueError(f"attribute {name!r} has {len(arr)} rows, expected {len(self.owners)}")

    def __len__(self) -> int:
        return len(self.owners)

    def select(self, keep: np.ndarray) -> FieldRows:
        return FieldRows(self.vectors[keep], self.owners[keep], {k: v[keep] for k, v in self.attrs.items()})

    @staticmethod
    def concat(parts: list[FieldRows], dim: int, vectors: np.ndarray | None = None) -> FieldRows:
        """The parts one after another; ``vectors``: their vectors already concatenated (a mapped file)."""
        if not parts:
            return FieldRows(np.zeros((0, dim), np.float32), np.zeros(0, np.int64))
        names = set(parts[0].attrs)
        return FieldRows(
            np.concatenate([p.vectors for p in parts]) if vectors is None else vectors,
            np.concatenate([p.owners for p in parts]),
            {n: np.concatenate([p.attrs[n] for p in parts]) for n in names},
        )


def new_chunk_name() -> str:
    """Sortable, unique chunk name: creation time plus random suffix."""
    return f"{time.time_ns():020d}-{secrets.token_hex(4)}"


def _chunk_files(root: Path, fieldname: str, name: str, attrs: list[str]) -> dict[str, Path]:
    base = root / VECTORS_DIR / fieldname
    files = {"vectors": base / f"{name}.npy", "owner": base / f"{name}.owner.npy"}
    files.update({a: base / f"{name}.{a}.npy" for a in attrs})
    return files


class _HashingFile:
    """A write-only file object that hashes what passes through it (numpy then writes in blocks, not ``tofile``)."""

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.hash = hashlib.blake2b(digest_size=DIGEST_SIZE)

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.fh.write(data)


def write_chunk(root: Path, fieldname: str, name: str, rows: FieldRows) -> dict[str, dict[str, Any]]:
    """Write a chunk's files atomically (temp file, fsync, rename).

    Returns what each file holds, ``{"vectors" | "owner" | attr: {"blake2b", "dtype", "shape"}}``: the
    checksum record the writer stores in the catalog with the chunk (computed while writing, no re-read).
    """
    if not fieldname.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"bad field name {fieldname!r}")
    files = _chunk_files(root, fieldname, name, sorted(rows.attrs))
    files["vectors"].parent.mkdir(parents=True, exist_ok=True)
    arrays = {"vectors": rows.vectors, "owner": rows.owners, **rows.attrs}
    record: dict[str, dict[str, Any]] = {}
    for key, path in files.items():
        tmp = path.with_name(path.name + ".tmp")
        array = np.ascontiguousarray(arrays[key])
        with open(tmp, "wb") as fh:
            hashing = _HashingFile(fh)
            np.save(hashing, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        record[key] = {"blake2b": hashing.hash.hexdigest(), "dtype": array.dtype.str, "shape": list(array.shape)}
    _fsync_dir(files["vectors"].parent)
    return record


def chunk_file_keys(root: Path, fieldname: str, name: str) -> dict[str, Path]:
    """The files of a committed chunk on disk, keyed like :func:`write_chunk`'s record."""
    base = root / VECTORS_DIR / fieldname
    files = {"vectors": base / f"{name}.npy", "owner": base / f"{name}.owner.npy"}
    for path in sorted(base.glob(f"{name}.*.npy")):
        attr = path.name[len(name) + 1:-4]
        if attr != "owner":
            files[attr] = path
    return files


def file_digest(path: Path) -> str:
    """BLAKE2b of a whole file, read in blocks (what :func:`write_chunk` recorded)."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# numpy parses .npy headers with ast.literal_eval, and CPython 3.11's AST-to-object conversion keeps its
# recursion depth in per-interpreter state: two threads parsing at once can fail with "SystemError: AST
# constructor recursion depth mismatch" (python/cpython gh-106905; seen once in the crash test's reader
# threads). Readers and the service open chunks from several threads, so header parsing is serialised.
NPY_LOCK = threading.Lock()


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """``np.load`` of one .npy file without pickle, memory-mapped (``mmap``; see :mod:`.pages`, which bounds
    how much of the mappings stays resident) or read; header parsed under :data:`NPY_LOCK`."""
    if mmap:
        from .pages import map_npy

        return map_npy(path, NPY_LOCK)
    with NPY_LOCK:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.array(arr)


def read_chunk_vectors(root: Path, fieldname: str, name: str) -> np.ndarray:
    """Memory-map only a committed chunk's vectors (its header is all that is read until rows are used)."""
    return load_npy(root / VECTORS_DIR / fieldname / f"{name}.npy", mmap=True)


def read_chunk(root: Path, fieldname: str, name: str) -> FieldRows:
    """Memory-map a committed chunk, its owners and attributes too (no pickle: ``allow_pickle=False``).

    Mapped rather than read: at 10^6 images the segment owners and attributes are gigabytes that a search
    touches once (to build the segment table) or never (boxes, areas); mapped, they cost page cache, not heap.
    """
    base = root / VECTORS_DIR / fieldname
    vectors = read_chunk_vectors(root, fieldname, name)
    owners = load_npy(base / f"{name}.owner.npy", mmap=True)
    attrs = {}
    for path in base.glob(f"{name}.*.npy"):
        attr = path.name[len(name) + 1:-4]
        if attr != "owner":
            attrs[attr] = load_npy(path, mmap=True)
    return FieldRows(vectors, owners, attrs)


def check_chunk(root: Path, fieldname: str, name: str, rows: int,
                committed: dict[str, dict[str, Any]] | None = None) -> str | None:
    """What is wrong with a committed chunk's files, judged from their headers and sizes only (None: nothing).

    Cheap enough for every open: no vector is read. The vectors must be a 2-D little-endian float32,
    float16 or int8 array and the owners a 1-D int64 array, every other file a 1-D or 2-D array, all with ``rows``
    rows (the catalog's count), each file exactly as long as its header says. With ``committed`` (the
    checksum record stored at commit) the set of files, each dtype and each shape must be the recorded ones.
    """
    base = root / VECTORS_DIR / fieldname
    files = [base / f"{name}.npy", base / f"{name}.owner.npy"]
    files += [p for p in base.glob(f"{name}.*.npy") if p.name != f"{name}.owner.npy"]
    if committed is not None and files[0].exists() and files[1].exists():  # else "is missing" below (maybe stale)
        keys = set(chunk_file_keys(root, fieldname, name))
        if keys != set(committed):
            gone, extra = sorted(set(committed) - keys), sorted(keys - set(committed))
            return (f"chunk {name} of field {fieldname} does not have the files it was committed with "
                    f"(missing: {', '.join(gone) or 'none'}; unexpected: {', '.join(extra) or 'none'})")
    for i, path in enumerate(files):
        try:
            with open(path, "rb") as fh, NPY_LOCK:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(fh)
                offset = fh.tell()
            size = os.path.getsize(path)
        except FileNotFoundError:
            return f"chunk file {path.name} is missing"
        except (OSError, ValueError, SyntaxError) as exc:
            return f"chunk file {path.name} has no valid .npy header ({exc})"
        if dtype.hasobject:
            return f"chunk file {path.name} holds Python objects"
        if i == 0 and (len(shape) != 2 or dtype.str not in VECTOR_DTYPES):
            return f"chunk file {path.name} is not a 2-D float32/float16/int8 array (shape {shape}, dtype {dtype.str})"
        if i == 1 and (len(shape) != 1 or dtype.str != OWNER_DTYPE):
            return f"chunk file {path.name} is not a 1-D int64 owner array (shape {shape}, dtype {dtype.str})"
        if committed is not None:
            key = "vectors" if i == 0 else "owner" if i == 1 else path.name[len(name) + 1:-4]
            want = committed.get(key, {})
            if want.get("dtype") != dtype.str or list(want.get("shape", [])) != list(shape):
                return (f"chunk file {path.name} has dtype {dtype.str} and shape {tuple(shape)}, committed as "
                        f"{want.get('dtype')} {tuple(want.get('shape', []))}")
        if not shape or shape[0] != rows:
            return f"chunk file {path.name} has {shape[0] if shape else 0} rows, the catalog says {rows}"
        expected = offset + int(np.prod(shape)) * dtype.itemsize
        if size != expected:
            return f"chunk file {path.name} is {size} bytes, its header says {expected}"
    return None


def delete_chunk(root: Path, fieldname: str, name: str) -> None:
    for path in (root / VECTORS_DIR / fieldname).glob(f"{name}.*"):
        path.unlink(missing_ok=True)


def sweep_orphans(root: Path, committed: set[tuple[str, str]]) -> int:
    """Delete chunk files no committed chunk owns (left by a crash); returns how many."""
    removed = 0
    vdir = root / VECTORS_DIR
    if not vdir.exists():
        return 0
    for fdir in vdir.iterdir():
        if not fdir.is_dir():
            continue
        for path in fdir.iterdir():
            chunk = path.name.split(".", 1)[0]
            if (fdir.name, chunk) not in committed:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
