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

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VECTORS_DIR = "vectors"


@dataclass
class FieldRows:
    """Rows of one field: vectors, the image id owning each row, and extra per-row arrays."""

    vectors: np.ndarray
    owners: np.ndarray
    attrs: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # float16 stays float16 (compact multi-vector fields such as local features); anything else is float32
        dtype = np.float16 if np.asarray(self.vectors).dtype == np.float16 else np.float32
        self.vectors = np.ascontiguousarray(self.vectors, dtype=dtype)
        self.owners = np.ascontiguousarray(self.owners, dtype=np.int64)
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.owners):
            raise ValueError(f"vectors {self.vectors.shape} and owners {self.owners.shape} do not match")
        for name, arr in self.attrs.items():
            if len(arr) != len(self.owners):
                raise ValueError(f"attribute {name!r} has {len(arr)} rows, expected {len(self.owners)}")

    def __len__(self) -> int:
        return len(self.owners)

    def select(self, keep: np.ndarray) -> "FieldRows":
        return FieldRows(self.vectors[keep], self.owners[keep], {k: v[keep] for k, v in self.attrs.items()})

    @staticmethod
    def concat(parts: list["FieldRows"], dim: int) -> "FieldRows":
        if not parts:
            return FieldRows(np.zeros((0, dim), np.float32), np.zeros(0, np.int64))
        names = set(parts[0].attrs)
        return FieldRows(
            np.concatenate([p.vectors for p in parts]),
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


def write_chunk(root: Path, fieldname: str, name: str, rows: FieldRows) -> None:
    """Write a chunk's files atomically (temp file, fsync, rename)."""
    if not fieldname.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"bad field name {fieldname!r}")
    files = _chunk_files(root, fieldname, name, sorted(rows.attrs))
    files["vectors"].parent.mkdir(parents=True, exist_ok=True)
    arrays = {"vectors": rows.vectors, "owner": rows.owners, **rows.attrs}
    for key, path in files.items():
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    _fsync_dir(files["vectors"].parent)


def read_chunk(root: Path, fieldname: str, name: str) -> FieldRows:
    """Memory-map a committed chunk (no pickle: ``allow_pickle=False``)."""
    base = root / VECTORS_DIR / fieldname
    vectors = np.load(base / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    owners = np.load(base / f"{name}.owner.npy", allow_pickle=False)
    attrs = {}
    for path in base.glob(f"{name}.*.npy"):
        attr = path.name[len(name) + 1:-4]
        if attr != "owner":
            attrs[attr] = np.load(path, allow_pickle=False)
    return FieldRows(vectors, owners, attrs)


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
