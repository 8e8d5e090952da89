"""Export and import embeddings in clip-retrieval's on-disk layout (docs/interop.md).

clip-retrieval's ``inference`` step writes, for partition ``N`` (zero-padded to
as many digits as the partition count has)::

    img_emb/img_emb_N.npy            (n, d) image embeddings (float16 there; any float here)
    metadata/metadata_N.parquet      n rows: image_path (files) or url (web data sets), caption, ...

Row ``i`` of ``img_emb_N.npy`` is row ``i`` of ``metadata_N.parquet``.
:func:`export_index` writes a finegrain index in that layout (float32, plus the
finegrain columns ``finegrain_id``, ``sha256``, ``width``, ``height`` and a
``finegrain_export.json`` naming the encoder); :func:`import_embeddings` builds
a new index from such a folder, whoever wrote it.

An import never leaves a half index behind: the whole folder is validated
first (shapes, dtypes, finite values, row counts, columns, unique paths),
then the index is built under a hidden temporary name through the normal
commit (chunk files, then one catalog transaction per batch) and renamed
into place only when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, encoders
from .progress import progress_bar

EMB_DIR = "img_emb"
META_DIR = "metadata"
INFO_FILE = "finegrain_export.json"
#: Encoder names of imported embeddings finegrain cannot compute itself are stored as ``external:<name>``.
EXTERNAL = "external"
PATH_COLUMNS = ("image_path", "url")  # the first one present identifies each image
_PART = re.compile(r"^img_emb_(\d+)\.npy$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


class ImportFormatError(ValueError):
    """The folder is not a valid clip-retrieval embedding folder; ``str(err)`` says why."""


def _need_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise RuntimeError("export/import need pyarrow: pip install pyarrow") from None
    return pa, pq


# ------------------------------------------------------------------ export
def export_index(index, out: str | os.PathLike, rows_per_file: int = 1_000_000, show_progress: bool = False) -> dict:
    """Write ``index``'s images (global embeddings and catalog metadata) to ``out`` in clip-retrieval's layout.

    The embeddings are the original (unprojected) ``global`` vectors, float32,
    in image-id order. Returns a summary (``images``, ``dim``, ``encoder``, ``files``).
    """
    pa, pq = _need_pyarrow()
    if rows_per_file < 1:
        raise ValueError("rows_per_file must be at least 1")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    records = sorted(index.records.values(), key=lambda r: r.id)
    rows = index.global_rows
    position = {int(owner): i for i, owner in enumerate(rows.owners)}
    order = np.asarray([position[r.id] for r in records], dtype=np.int64)
    dim = int(rows.vectors.shape[1])
    n_parts = max(1, math.ceil(len(records) / rows_per_file))
    digits = int(math.log10(n_parts)) + 1  # clip-retrieval's zero padding
    (out / EMB_DIR).mkdir(parents=True, exist_ok=True)
    (out / META_DIR).mkdir(parents=True, exist_ok=True)
    files = []
    with progress_bar(len(records), "exporting", show_progress) as bar:
        for part in range(n_parts):
            chunk = records[part * rows_per_file:(part + 1) * rows_per_file]
            vectors = np.asarray(rows.vectors[order[part * rows_per_file:(part + 1) * rows_per_file]], np.float32)
            vectors = vectors.reshape(len(chunk), dim)
            suffix = str(part).zfill(digits)
            emb_path = out / EMB_DIR / f"img_emb_{suffix}.npy"
            np.save(emb_path, np.ascontiguousarray(vectors), allow_pickle=False)
            table = pa.table({
                "image_path": pa.array([r.path for r in chunk], pa.string()),
                "finegrain_id": pa.array([r.id for r in chunk], pa.int64()),
                "sha256": pa.array([r.sha256 for r in chunk], pa.string()),
                "width": pa.array([r.width for r in chunk], pa.int64()),
                "height": pa.array([r.height for r in chunk], pa.int64()),
            })
            meta_path = out / META_DIR / f"metadata_{suffix}.parquet"
            pq.write_table(table, meta_path)
            files += [str(emb_path.relative_to(out)), str(meta_path.relative_to(out))]
            bar.advance(len(chunk))
    info = {"format": "clip-retrieval", "encoder": index.catalog.get_meta("encoder"), "dim": dim,
            "images": len(records), "normalized": True, "finegrain_version": __version__, "files": files}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


# ------------------------------------------------------------------ reading
@dataclass
class _Part:
    emb: Path
    meta: Path
    rows: int


@dataclass
class ClipFolder:
    """A validated clip-retrieval embedding folder: its partitions, dimension, rows and identifying column."""

    root: Path
    parts: list[_Part]
    dim: int
    rows: int
    path_column: str
    info: dict


def read_clip_folder(root: str | os.PathLike, batch: int = 65_536) -> ClipFolder:
    """Validate a clip-retrieval folder without loading it whole; :class:`ImportFormatError` says what is wrong."""
    _, pq = _need_pyarrow()
    root = Path(root)
    if not root.is_dir():
        raise ImportFormatError(f"{root} is not a folder")
    emb_dir, meta_dir = root / EMB_DIR, root / META_DIR
    found = sorted((int(m.group(1)), p) for p in (emb_dir.iterdir() if emb_dir.is_dir() else [])
                   if (m := _PART.match(p.name)))
    if not found:
        raise ImportFormatError(f"{root} has no {EMB_DIR}/img_emb_N.npy files (clip-retrieval's layout)")
    parts: list[_Part] = []
    dim = None
    path_column = None
    seen: set[str] = set()
    for _number, emb in found:
        suffix = emb.name[len("img_emb_"):-len(".npy")]
        meta = meta_dir / f"metadata_{suffix}.parquet"
        if not meta.is_file():
            raise ImportFormatError(f"{emb.relative_to(root)} has no matching {META_DIR}/metadata_{suffix}.parquet")
        try:
            arr = np.load(emb, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ImportFormatError(f"{emb.relative_to(root)} is not a readable .npy array: {exc}") from None
        if arr.ndim != 2 or arr.shape[1] < 1:
            raise ImportFormatError(f"{emb.relative_to(root)} has shape {arr.shape}; expected (rows, dim)")
        if arr.dtype.kind != "f":
            raise ImportFormatError(f"{emb.relative_to(root)} holds {arr.dtype}, not floating-point embeddings")
        if dim is None:
            dim = int(arr.shape[1])
        elif arr.shape[1] != dim:
            raise ImportFormatError(f"{emb.relative_to(root)} has dimension {arr.shape[1]}, the first file {dim}")
        for start in range(0, len(arr), batch):
            block = np.asarray(arr[start:start + batch], np.float32)
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                row = start + int(np.flatnonzero(bad)[0])
                raise ImportFormatError(f"{emb.relative_to(root)} row {row} holds NaN or infinite values")
            zero = np.linalg.norm(block, axis=1) == 0
            if zero.any():
                row = start + int(np.flatnonzero(zero)[0])
                raise ImportFormatError(f"{emb.relative_to(root)} row {row} is an all-zero vector")
        try:
            schema = pq.read_schema(meta)
            n_meta = pq.ParquetFile(meta).metadata.num_rows
        except Exception as exc:  # noqa: BLE001 - any parquet reader complaint is a bad file
            raise ImportFormatError(f"{meta.relative_to(root)} is not a readable parquet file: {exc}") from None
        column = next((c for c in PATH_COLUMNS if c in schema.names), None)
        if column is None:
            raise ImportFormatError(f"{meta.relative_to(root)} has none of the columns {', '.join(PATH_COLUMNS)} "
                                    f"(it has: {', '.join(schema.names) or 'none'})")
        if path_column is None:
            path_column = column
        elif column != path_column:
            raise ImportFormatError(f"{meta.relative_to(root)} identifies images by {column!r}, earlier files by "
                                    f"{path_column!r}")
        if n_meta != len(arr):
            raise ImportFormatError(f"{emb.relative_to(root)} has {len(arr)} rows but {meta.relative_to(root)} "
                                    f"has {n_meta}")
        paths = pq.read_table(meta, columns=[column]).column(column).to_pylist()
        for i, p in enumerate(paths):
            if not isinstance(p, str) or not p:
                raise ImportFormatError(f"{meta.relative_to(root)} row {i}: empty {column}")
            if p in seen:
                raise ImportFormatError(f"{meta.relative_to(root)} row {i}: {column} {p!r} appears twice")
            seen.add(p)
        parts.append(_Part(emb, meta, len(arr)))
    info = {}
    if (root / INFO_FILE).is_file():
        try:
            info = json.loads((root / INFO_FILE).read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise ImportFormatError(f"{INFO_FILE} is not valid JSON: {exc}") from None
    assert dim is not None and path_column is not None
    return ClipFolder(root, parts, dim, sum(p.rows for p in parts), path_column, info if isinstance(info, dict) else {})


# ------------------------------------------------------------------ import
def resolve_encoder(name: str | None, folder: ClipFolder) -> str:
    """The encoder name to record: ``name``, else the export's, else ``external``; unknown ones as ``external:NAME``."""
    name = name or folder.info.get("encoder") or EXTERNAL
    if encoders.is_external(name):
        return name
    return name if name.partition(":")[0] in encoders.list_encoders() else f"{EXTERNAL}:{name}"


def _check_encoder(name: str, folder: ClipFolder, samples: list[tuple[str, np.ndarray]]) -> None:
    """A finegrain encoder must load, have the folder's dimension and reproduce its embeddings (when files exist)."""
    try:
        encoder = encoders.create(name)
    except (KeyError, OSError, ValueError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ValueError(f"encoder {name!r} cannot be loaded here ({message}); import with --encoder "
                         f"{EXTERNAL}:{name} to search by vector only") from None
    if encoder.dim != folder.dim:
        raise ValueError(f"encoder {name!r} has dimension {encoder.dim} but the embeddings have {folder.dim}")
    if not samples:
        return
    from .images import ImageLoadError

    try:
        mine = encoder.encode_images([p for p, _ in samples])
    except ImageLoadError:
        return  # unreadable sample files: nothing to compare
    theirs = np.stack([v for _, v in samples])
    agreement = float(np.median(np.sum(mine * theirs, axis=1)))
    if agreement < 0.9:
        raise ValueError(f"the embeddings do not come from encoder {name!r}: median cosine {agreement:.2f} with its "
                         f"own embeddings of {len(samples)} of the images (expected about 1); import with --encoder "
                         f"{EXTERNAL}:NAME to search them by vector only")


def _file_facts(path: str, row: dict) -> tuple[str | None, int | None, int | None, int | None, int | None]:
    """(sha256, size, mtime_ns, width, height) from the metadata columns, else from the file when it exists here."""
    sha = row.get("sha256") if isinstance(row.get("sha256"), str) and _SHA.match(row["sha256"]) else None
    width, height = row.get("width"), row.get("height")
    width = int(width) if isinstance(width, (int, np.integer)) and width > 0 else None
    height = int(height) if isinstance(height, (int, np.integer)) and height > 0 else None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return sha, None, None, width, height
    if not os.path.isfile(path):
        return sha, None, None, width, height
    if sha is None or width is None or height is None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            return sha, None, None, width, height
        sha = sha or hashlib.sha256(data).hexdigest()
        if width is None or height is None:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
            except (UnidentifiedImageError, OSError, ValueError):
                pass
    return sha, st.st_size, st.st_mtime_ns, width, height


def import_embeddings(src: str | os.PathLike, dest: str | os.PathLike, encoder: str | None = None,
                      batch: int = 4096, show_progress: bool = False, ann: str = "auto",
                      log: Callable[[str], None] | None = None) -> dict:
    """Build a new index at ``dest`` from the clip-retrieval folder ``src``; returns a summary.

    ``encoder`` names what computed the embeddings. A finegrain encoder
    (``effnet-minilm``, ``clip:...``) is checked (loads, same dimension, and
    on up to four images whose files exist here, the same embeddings) and
    then text and image queries work; any other name is recorded as
    ``external:NAME`` and the index answers vector queries only
    (:meth:`finegrain.Index.search_vectors`, the service's ``embedding_input``).
    Without ``encoder``, the exporter's (``finegrain_export.json``) is used, else ``external``.
    Embeddings are L2-normalised on the way in (finegrain scores by inner product).
    """
    _, pq = _need_pyarrow()
    from .store.catalog import Catalog, NewImage
    from .store.vectors import FieldRows
    from .store.writer import Writer

    if batch < 1:
        raise ValueError("batch must be at least 1")
    dest = Path(dest)
    if (dest / "finegrain.sqlite").exists():
        raise FileExistsError(f"an index already exists at {dest}; import makes a new index")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not an empty folder")
    folder = read_clip_folder(src)
    name = resolve_encoder(encoder, folder)
    if not encoders.is_external(name):
        samples: list[tuple[str, np.ndarray]] = []
        for part in folder.parts:
            paths = pq.read_table(part.meta, columns=[folder.path_column]).column(folder.path_column).to_pylist()
            arr = np.load(part.emb, mmap_mode="r", allow_pickle=False)
            for i, p in enumerate(paths):
                if len(samples) < 4 and os.path.isfile(p):
                    v = np.asarray(arr[i], np.float32)
                    samples.append((p, v / np.linalg.norm(v)))
            if len(samples) >= 4:
                break
        _check_encoder(name, folder, samples)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.importing-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        catalog = Catalog(tmp, create=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        with Writer.open(tmp, catalog) as writer:  # the index's one mutation path, as for indexing
            with catalog.transaction() as tx:
                for key, value in (("encoder", name), ("dim", folder.dim), ("ann", ann), ("segments", None),
                                   ("local", None), ("objects", None),
                                   ("imported", {"from": str(Path(src).resolve()), "encoder": name,
                                                 "rows": folder.rows, "column": folder.path_column})):
                    tx.set_meta(key, value)
            with progress_bar(folder.rows, "importing", show_progress) as bar:
                for part in folder.parts:
                    table = pq.read_table(part.meta)
                    arr = np.load(part.emb, mmap_mode="r", allow_pickle=False)
                    for start in range(0, part.rows, batch):
                        rows = table.slice(start, batch).to_pylist()
                        vectors = encoders.l2_normalize(np.asarray(arr[start:start + len(rows)], np.float32))
                        images = []
                        for row in rows:
                            path = row[folder.path_column]
                            sha, size, mtime_ns, width, height = _file_facts(path, row)
                            images.append(NewImage(path, sha, size, mtime_ns, width, height))  # type: ignore[arg-type]
                        writer.commit(images, {"global": FieldRows(vectors, np.arange(len(images)))}, [], [], [])
                        bar.advance(len(images))
        catalog.close()
        if dest.exists():
            dest.rmdir()  # checked empty above
        os.replace(tmp, dest)
    except BaseException:
        catalog.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log is not None and encoders.is_external(name):
        log(f"encoder {name!r} is not one finegrain can run: the index answers vector queries only")
    return {"index": str(dest), "images": folder.rows, "dim": folder.dim, "encoder": name,
            "files": len(folder.parts), "column": folder.path_column,
            "text_search": not encoders.is_external(name)}
