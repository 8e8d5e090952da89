"""Integrity of an index's vector chunks: checksums recorded at commit, cheap checks on open, ``finegrain check``.

Every chunk the writer commits carries a checksum record in the catalog
(``chunks.checksum``, JSON): BLAKE2b-128, dtype and shape of each of its
``.npy`` files, computed while the files are written. A chunk without one
(written by an older finegrain) is *unverified*, not damaged.

Three levels of checking:

* on open (:meth:`Snapshot.check_files`, every ``Index.open``): headers and
  sizes, dtype and shape against the record, and the owner ids of the
  one-row-per-image fields (``global``, ``compressed``): each an id the
  catalog gave, none twice. Other fields' owners are checked when the field
  is first read. No vector is read.
* :func:`check_index` (``finegrain check``): every byte against its
  checksum, every owner against the catalog's images, a NaN/inf scan of
  every float array, the cached ANN structures loadable. Damage it finds is
  recorded in the catalog (``chunks.damaged``), so searches refuse those
  chunks with a clear error until :func:`repair_index` deals with them.
* :func:`repair_index` (``finegrain check --repair``): deletes derived
  caches (``ann/``: rebuilt on the next search), clears marks of chunks that
  pass again, records checksums of unverified chunks that pass every other
  check, and with ``drop_damaged`` removes the images whose vectors are in
  damaged chunks (their rows can only come back from the image files: a
  ``finegrain index`` re-run re-adds them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import Catalog, IndexFormatError
from .vectors import VECTORS_DIR, check_chunk, chunk_file_keys, delete_chunk, file_digest, load_npy

#: Fields holding exactly one row per live image (their owners are checked on every open).
ONE_ROW_FIELDS = ("global", "compressed", "global-compact", "compressed-compact")
ANN_DIR = "ann"

__all__ = ["ONE_ROW_FIELDS", "Problem", "Report", "check_index", "repair_index", "expected_files"]


# ------------------------------------------------------------ cheap checks (used by Snapshot)
def expected_files(checksum: str | None) -> dict[str, dict[str, Any]] | None:
    """The per-file record of a ``chunks.checksum`` value (None: unverified, or a record this version cannot read)."""
    if not checksum:
        return None
    try:
        record = json.loads(checksum)
        files = record["files"] if record.get("v") == 1 else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def read_owners(root: Path, fieldname: str, name: str) -> np.ndarray:
    """A committed chunk's owner ids (FileNotFoundError when compacted away, ValueError when unreadable)."""
    path = Path(root) / VECTORS_DIR / fieldname / f"{name}.owner.npy"
    try:
        return np.asarray(load_npy(path), dtype=np.int64)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"chunk file {path.name} is unreadable: {exc}") from None


def owner_range_problem(fieldname: str, name: str, owners: np.ndarray, max_id: int | None) -> str | None:
    """Owner ids that no image ever had (0, negative, above the largest id given), or None."""
    if max_id is None or len(owners) == 0:
        return None
    bad = owners[(owners <= 0) | (owners > max_id)]
    if len(bad):
        return (f"chunk {name} of field {fieldname} has {len(bad)} row(s) owned by ids no image ever had "
                f"({', '.join(map(str, bad[:5].tolist()))})")
    return None


def duplicate_owners(fieldname: str, owners: list[np.ndarray]) -> str | None:
    """For a one-row-per-image field: ids owning more than one row across its chunks, or None."""
    if not owners:
        return None
    ids = np.concatenate(owners)
    unique, counts = np.unique(ids, return_counts=True)
    dup = unique[counts > 1]
    if len(dup):
        return (f"field {fieldname} has several rows for image id(s) {', '.join(map(str, dup[:5].tolist()))} "
                "(it holds one row per image: an owner file was changed)")
    return None


# ------------------------------------------------------------------------ full check
@dataclass
class Problem:
    """One thing wrong: a damaged chunk (``chunk`` set), a cache, or the catalog."""

    message: str
    chunk: str | None = None
    field: str | None = None
    #: Image ids whose vectors the problem affects (None: cannot be known, the owner file itself is damaged).
    images: list[int] | None = None
    kind: str = "chunk"  # chunk | cache | catalog


@dataclass
class Report:
    """What :func:`check_index` found (``problems`` empty: clean)."""

    path: str
    chunks: int = 0
    verified: int = 0
    unverified: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    caches: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: Chunks marked damaged by an earlier check that pass now (``--repair`` clears the mark).
    cleared: list[str] = field(default_factory=list)
    #: Unverified chunks that pass every other check (``--repair`` records their checksums).
    adoptable: list[str] = field(default_factory=list)
    recorded: bool = False  # the damage was recorded in the catalog (searches refuse those chunks)
    notes: list[str] = field(default_factory=list)

    @property
    def damaged_chunks(self) -> dict[str, str]:
        return {p.chunk: p.message for p in self.problems if p.chunk}

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": not self.problems, "chunks": self.chunks, "verified": self.verified,
                "unverified": len(self.unverified), "files": self.files, "bytes": self.bytes,
                "caches": self.caches, "recorded": self.recorded, "notes": self.notes,
                "problems": [{"kind": p.kind, "field": p.field, "chunk": p.chunk, "images": p.images,
                              "message": p.message} for p in self.problems]}


def _non_finite_rows(path: Path, block: int = 1 << 16) -> np.ndarray:
    """Row indices of a float array file holding NaN or inf (scanned in blocks of the memory map)."""
    arr = load_npy(path, mmap=True)
    if arr.dtype.kind != "f" or arr.size == 0:
        return np.zeros(0, np.int64)
    bad: list[np.ndarray] = []
    flat = arr.reshape(len(arr), -1)
    for s in range(0, len(flat), block):
        part = np.asarray(flat[s:s + block])
        rows = np.flatnonzero(~np.isfinite(part).all(axis=1))
        if len(rows):
            bad.append(rows + s)
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def _names(catalog: Catalog, ids: Iterable[int], limit: int = 5) -> str:
    ids = sorted(ids)
    shown = []
    for i in ids[:limit]:
        rec = catalog.get(i)
        shown.append(f"{i} {rec.path}" if rec else str(i))
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return "; ".join(shown) + more


def _check_chunk_fully(root: Path, catalog: Catalog, fieldname: str, name: str, rows: int,
                       checksum: str | None, known: set[int], report: Report) -> tuple[np.ndarray | None, bool]:
    """Check one chunk; returns (its owners if they can be trusted, whether it is damaged)."""
    expected = expected_files(checksum)
    header = check_chunk(root, fieldname, name, rows, expected)
    if header is not None and header.endswith("is missing"):
        raise FileNotFoundError(header)  # the caller tells a compaction meanwhile from damage
    if header is not None:
        owners = _trusted_owners(root, fieldname, name, expected)
        report.problems.append(Problem(header, name, fieldname, None if owners is None else owners.tolist()))
        return owners, True
    files = chunk_file_keys(root, fieldname, name)
    changed: list[str] = []
    for key, path in files.items():
        report.files += 1
        report.bytes += path.stat().st_size
        if expected is not None and file_digest(path) != expected[key].get("blake2b"):
            changed.append(path.name)
    owner_ok = "owner" not in {k for k, p in files.items() if p.name in changed}
    owners = read_owners(root, fieldname, name)
    damaged = False
    if changed:
        trusted = owners if owner_ok else None
        report.problems.append(Problem(
            f"chunk {name} of field {fieldname}: {', '.join(changed)} changed since commit (checksum mismatch)",
            name, fieldname, None if trusted is None else sorted(set(trusted.tolist()))))
        damaged = True
        if not owner_ok:
            return None, True
    unknown = sorted(set(owners.tolist()) - known)
    if unknown:
        report.problems.append(Problem(
            f"chunk {name} of field {fieldname}: {len(unknown)} owner id(s) are not images of the catalog "
            f"({', '.join(map(str, unknown[:5]))})", name, fieldname, None))
        return None, True
    for key, path in files.items():
        if key == "owner":
            continue
        bad = _non_finite_rows(path)
        if len(bad):
            images = sorted(set(owners[bad].tolist()))
            report.problems.append(Problem(
                f"chunk {name} of field {fieldname}: {len(bad)} row(s) of {path.name} hold NaN or inf "
                f"(images {_names(catalog, images)})", name, fieldname, images))
            damaged = True
    if expected is None:
        report.unverified.append(name)
    elif not damaged:
        report.verified += 1
    return owners, damaged


def _trusted_owners(root: Path, fieldname: str, name: str, expected: dict | None) -> np.ndarray | None:
    """A damaged chunk's owners when its owner file itself is intact (matches its checksum), else None."""
    path = Path(root) / VECTORS_DIR / fieldname / f"{name}.owner.npy"
    if expected is None or "owner" not in expected:
        return None
    try:
        if file_digest(path) != expected["owner"].get("blake2b"):
            return None
        return read_owners(root, fieldname, name)
    except (OSError, ValueError):
        return None


def _check_caches(root: Path, generation: int, report: Report) -> None:
    """Every cached structure of the current generation under ``ann/`` must load (others are swept by writers)."""
    import faiss

    ann = Path(root) / ANN_DIR
    if not ann.is_dir():
        return
    for cache in sorted(ann.iterdir()):
        if cache.name.startswith(".") or not cache.name.split(".")[0].endswith(f"-{generation}"):
            continue
        report.caches += 1
        try:
            if cache.suffix == ".faiss":
                faiss.read_index(str(cache))
            elif cache.suffix in (".npz", ".npy"):
                loaded = np.load(cache, allow_pickle=False)
                if hasattr(loaded, "files"):
                    for key in loaded.files:
                        loaded[key]
        except (RuntimeError, OSError, ValueError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            report.problems.append(Problem(f"cache file {ANN_DIR}/{cache.name} is unreadable ({first[:120]})",
                                           kind="cache"))


def check_index(path: str | Path, record: bool = True) -> Report:
    """Verify every chunk of the index at ``path`` fully (see the module docstring).

    With ``record`` the damage found is written to the catalog (under the writer lock; skipped with a note
    when the index is read-only or another process writes), so that searches refuse those chunks.
    """
    root = Path(path)
    if not root.is_dir():
        raise IndexFormatError(f"no finegrain index at {root}")
    report = Report(str(root))
    with Catalog(root) as catalog:
        try:
            generation, records, chunks, settings = catalog.read_state()
            marks = catalog.chunk_marks()
            known = catalog.known_ids()
        except Exception as exc:  # noqa: BLE001 - a damaged table: one line, like Index.open
            raise IndexFormatError(f"index at {root} is damaged: {type(exc).__name__}: {exc}") from None
        live = set(records)
        report.chunks = len(chunks)
        field_owners: dict[str, list[np.ndarray]] = {}
        intact_owners: dict[str, set[int]] = {}
        damaged_by_field: dict[str, list[Problem]] = {}
        dims: dict[str, set[int]] = {}
        for name, fieldname, rows in chunks:
            checksum, mark = marks.get(name, (None, None))
            before = len(report.problems)
            try:
                owners, damaged = _check_chunk_fully(root, catalog, fieldname, name, rows, checksum, known, report)
            except FileNotFoundError as exc:
                if catalog.generation() != generation:  # compacted away while checking: not damage
                    report.notes.append(f"chunk {name} was replaced while being checked (the index changed): "
                                        "run `finegrain check` again")
                    continue
                report.problems.append(Problem(f"chunk {name} of field {fieldname}: a file is missing ({exc})",
                                               name, fieldname, None))
                owners, damaged = None, True
            except (OSError, ValueError) as exc:
                report.problems.append(Problem(f"chunk {name} of field {fieldname}: {exc}", name, fieldname, None))
                owners, damaged = None, True
            if damaged:
                damaged_by_field.setdefault(fieldname, []).extend(report.problems[before:])
            else:
                if owners is not None:
                    intact_owners.setdefault(fieldname, set()).update(owners.tolist())
                if mark:
                    report.cleared.append(name)
                if not checksum:
                    report.adoptable.append(name)
                try:
                    head = load_npy(root / VECTORS_DIR / fieldname / f"{name}.npy", mmap=True)
                    dims.setdefault(fieldname, set()).add(int(head.shape[1]))
                except (OSError, ValueError):
                    pass
            if owners is not None:
                field_owners.setdefault(fieldname, []).append(owners)
        for fieldname in ONE_ROW_FIELDS:
            if fieldname not in {f for _, f, _ in chunks} and fieldname != "global":
                continue
            problem = duplicate_owners(fieldname, field_owners.get(fieldname, []))
            if problem:
                report.problems.append(Problem(problem, field=fieldname, images=None, kind="catalog"))
            # Images with no row: either a damaged chunk held it (named by the chunk's problem) or it is lost.
            missing = live - intact_owners.get(fieldname, set())
            for p in damaged_by_field.get(fieldname, []):
                if p.images is None:  # the owner file is damaged too: the images are those missing elsewhere
                    p.images = sorted(missing - set().union(*[set(q.images or []) for q in
                                                              damaged_by_field[fieldname]]))
                    p.message += f" (images without another {fieldname} row: {_names(catalog, p.images)})"
                missing -= set(p.images or [])
            if missing and (fieldname == "global" or fieldname in dims):
                report.problems.append(Problem(
                    f"field {fieldname}: {len(missing)} live image(s) have no row ({_names(catalog, missing)})",
                    field=fieldname, images=sorted(missing), kind="catalog"))
        if "global" in dims and settings.get("dim") is not None and dims["global"] != {int(settings["dim"])}:
            report.problems.append(Problem(f"field global has {sorted(dims['global'])} dimensions, the settings "
                                           f"say {settings['dim']}", field="global", kind="catalog"))
        from ..compress.coded import storage_problems  # quantiser/projection files of compact fields

        for fieldname, message in storage_problems(root, settings, dims):
            report.problems.append(Problem(message, field=fieldname, kind="catalog"))
        _check_caches(root, generation, report)
        if record:
            _record(root, catalog, report, marks)
    return report


def _record(root: Path, catalog: Catalog, report: Report, marks: dict[str, tuple[str | None, str | None]]) -> None:
    """Write the damage found to the catalog (a generation bump: servers reload and refuse those chunks)."""
    from .writer import IndexLockedError, IndexReadOnlyError, Writer

    new = {c: m[:300] for c, m in report.damaged_chunks.items() if marks.get(c, (None, None))[1] != m[:300]}
    if not new:
        report.recorded = bool(report.damaged_chunks)
        return
    try:
        with Writer.open(root, catalog) as w, catalog.transaction() as tx:
            del w
            current = {n for n, _, _ in catalog.chunks()}
            for name, message in new.items():
                if name in current:
                    tx.mark_damaged(name, message)
        report.recorded = True
    except (IndexLockedError, IndexReadOnlyError, OSError) as exc:
        report.notes.append(f"the damage could not be recorded in the catalog ({exc}); searches may still read "
                            "those chunks: run `finegrain check` again when nothing else writes to the index")


# ------------------------------------------------------------------------ repair
@dataclass
class RepairResult:
    """What :func:`repair_index` did and what it could not do."""

    done: list[str] = field(default_factory=list)
    cannot: list[str] = field(default_factory=list)
    #: Image ids removed because their vectors were damaged (``finegrain index`` re-adds them).
    removed: list[int] = field(default_factory=list)


def repair_index(path: str | Path, drop_damaged: bool = False) -> tuple[Report, RepairResult]:
    """Rebuild what can be rebuilt, say what cannot (see the module docstring); returns the check that led it."""
    from .writer import Writer

    root = Path(path)
    report = check_index(root, record=True)
    result = RepairResult()
    ann = root / ANN_DIR
    with Catalog(root) as catalog, Writer.open(root, catalog) as writer:
        del writer
        caches = [c for c in ann.iterdir() if c.is_file()] if ann.is_dir() else []
        for cache in caches:
            cache.unlink(missing_ok=True)
        if caches:
            result.done.append(f"deleted {len(caches)} cached search structure(s) under {ANN_DIR}/ "
                               "(rebuilt on the next search)")
        current = {n: f for n, f, _ in catalog.chunks()}
        cleared = [c for c in report.cleared if c in current]
        adopt = [c for c in report.adoptable if c in current and c not in report.damaged_chunks]
        records = {}
        for name in adopt:
            records[name] = _checksum_of_files(root, current[name], name)
        if cleared or records:
            with catalog.transaction() as tx:
                for name in cleared:
                    tx.mark_damaged(name, None)
                for name, rec in records.items():
                    tx.set_checksum(name, rec)
            if cleared:
                result.done.append(f"cleared the damage mark of {len(cleared)} chunk(s) that pass again")
            if records:
                result.done.append(f"recorded checksums of {len(records)} unverified chunk(s) that pass every "
                                   "other check (written by an older finegrain)")
        chunk_problems = [p for p in report.problems if p.kind != "cache"]
        droppable = [p for p in chunk_problems if p.images is not None]
        unknown = [p for p in chunk_problems if p.images is None]
        for p in unknown:
            result.cannot.append(f"{p.message}: the images it affects cannot be named; rebuild the index "
                                 "(`finegrain index` into a new folder) or restore a copy")
        if droppable and not drop_damaged:
            ids = sorted(set().union(*[set(p.images or []) for p in droppable]))
            result.cannot.append(
                f"{len(droppable)} damaged chunk(s) hold vectors of {len(ids)} image(s) ({_names(catalog, ids)}); "
                "vectors come from the image files, so they cannot be rebuilt here: run `finegrain check "
                "--repair --drop-damaged` to remove those images (then `finegrain index` on their folders "
                "re-adds them), or rebuild the index")
        elif droppable and not unknown:
            ids = sorted(set().union(*[set(p.images or []) for p in droppable]))
            chunks = sorted({p.chunk for p in droppable if p.chunk and p.chunk in current})
            with catalog.transaction() as tx:
                tx.remove(ids)
                tx.drop_chunks(chunks)
            for name in chunks:
                delete_chunk(root, current[name], name)
            result.removed = ids
            result.done.append(f"removed {len(ids)} image(s) whose vectors were damaged ({_names(catalog, ids)}) "
                               f"and dropped {len(chunks)} damaged chunk(s); `finegrain index` on their folders "
                               "re-adds them")
        elif droppable:
            result.cannot.append("damaged chunks were not dropped: some damage affects images that cannot be "
                                 "named (see above), so dropping the others would not make the index whole")
    return report, result


def _checksum_of_files(root: Path, fieldname: str, name: str) -> str:
    from .writer import checksum_json

    record = {}
    for key, path in chunk_file_keys(root, fieldname, name).items():
        arr = load_npy(path, mmap=True)
        record[key] = {"blake2b": file_digest(path), "dtype": arr.dtype.str, "shape": list(arr.shape)}
    return checksum_json(record)
