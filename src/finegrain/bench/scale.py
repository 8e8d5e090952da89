"""``finegrain bench scale``: how latency, agreement with exact search, memory and disk grow with the collection.

Synthetic indexes of 10^4 .. 10^6 images are written through the real
writer (the same chunk files and catalog as ``finegrain index``), with
vectors drawn from a *source* index of real photos: each synthetic image
copies one source image's vectors (its global vector and every segment
vector, with the segment levels, boxes and areas) and adds independent
Gaussian noise to each vector before re-normalising. ``noise`` is the
noise's norm relative to the unit vector, so a copy has cosine about
``1 / sqrt(1 + noise**2)`` to its source (0.89 at the default 0.5). Local
descriptors are moved instead by one random near-identity map per image,
with the same cosine, so that a copy keeps its source's near-duplicate
descriptors (``_warped``; independent noise tripled the indexed rows). Score
distributions therefore look like real ones, but copies of one source
stay closer to one another than different real photos would: the docs
say so next to every table.

Each mode of each size is measured in a fresh process (so its RSS is its own): text
queries (captions of the source split) one at a time through
``Index.search``, as users send them (query encoding included; rows also
give ``search_p50_ms``, the same calls less the query's decomposition and
encoding as the retrievers time them, for comparisons with engines that
take query vectors), and the top-10 of each mode compared with the exact reference of its family:
``global`` against brute-force inner products over the stored vectors,
the multi-vector modes against ``exhaustive`` (every segment of every
image scored).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..store.catalog import NewImage
from ..store.vectors import FieldRows

#: The exact reference each mode's top-10 is compared with (None: the mode is its own reference).
#: Multi-vector modes are compared with ``exhaustive`` over every image (no candidate stage).
EXACT_MULTIVECTOR = "exhaustive:candidates=0"
REFERENCE = {"global": "global-exact", "single": None, "exhaustive": EXACT_MULTIVECTOR,
             "hierarchical": EXACT_MULTIVECTOR,
             # one row per image, scanned whole: each its own reference; objects-max's candidate stage against
             # scoring every image's objects
             "objects": None, "objects-refined": None, "objects-max": "objects-max:candidates=0",
             # image queries (no exact Chamfer search over every image exists to compare with)
             "instance": None, "global+local": None, "local": None, "l2g": None}
#: The field family each mode needs (``global`` modes need none).
NEEDS = {"single": "segments", "exhaustive": "segments", "hierarchical": "segments", "objects": "objects",
         "objects-refined": "objects", "objects-max": "objects", "instance": "local", "global+local": "local",
         "local": "local", "l2g": "local"}


def parse_mode(label: str) -> tuple[str, dict[str, Any]]:
    """``"hierarchical:candidates=2000,T=0.5"`` -> (``"hierarchical"``, options); numbers parsed as numbers."""
    mode, _, spec = label.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"bad mode option {item!r} in {label!r}: expected name=value")
        try:
            options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            options[key.strip()] = value.strip()
    return mode.strip(), options
DEFAULT_MODES = ("global", "hierarchical", "exhaustive")
BUILD_BATCH = 2_000


#: Field families a synthetic index can copy besides ``global`` (``fields``), and the stored fields of each
#: (those the source index holds are copied; ``objects_refined`` exists only with Stage B refinement).
FAMILIES: dict[str, tuple[str, ...]] = {"segments": ("segments",),
                                        "objects": ("objects", "objects_mean", "objects_refined"),
                                        "local": ("local", "instance")}


@dataclass
class Source:
    """Real vectors that synthetic images are drawn from (one entry per source image)."""

    encoder: str
    segments: Any  # SegmentConfig | None
    globals: np.ndarray  # (n, d) float32
    sizes: np.ndarray  # (n, 2) width, height
    rows: dict[str, list[FieldRows]] = field(default_factory=dict)  # per stored field: each image's rows (owners 0)
    objects: Any = None  # ObjectConfig | None
    local: Any = None  # LocalConfig | None
    local_state: bytes | None = None  # the source's fitted local-feature whitening (queries need the same)

    @property
    def seg_rows(self) -> list[FieldRows] | None:
        return self.rows.get("segments")

    def families(self) -> list[str]:
        """The field families (:data:`FAMILIES`) this source holds."""
        return [f for f, names in FAMILIES.items() if names[0] in self.rows]

    def with_local_features(self, n: int) -> Source:
        """This source with at most ``n`` local descriptors per image, the strongest (as an index built with
        ``--local-features n`` stores; queries still extract the source's number, which its whitening file fixes)."""
        if n < 1:
            raise ValueError(f"--local-features must be positive, not {n}")
        if "local" not in self.rows:
            raise ValueError("--local-features: the source index has no local features")
        kept = []
        for rows in self.rows["local"]:
            strength = rows.attrs.get("strength")
            order = np.arange(len(rows)) if strength is None else np.argsort(-np.asarray(strength), kind="stable")
            kept.append(rows.select(np.sort(order[:n])))
        return dataclasses.replace(self, rows={**self.rows, "local": kept})

    @classmethod
    def from_index(cls, path: str | os.PathLike) -> Source:
        from ..index import Index
        from ..local.store import STATE_FILE

        with Index.open(path) as index:
            snap = index.snapshot
            g = snap.field("global")
            ids = np.asarray(g.owners)
            if len(ids) == 0:
                raise ValueError(f"the source index at {path} holds no images")
            order = np.argsort(ids, kind="stable")
            ids = ids[order]
            globals_ = np.asarray(g.vectors[order], dtype=np.float32)
            sizes = np.array([(snap.records[int(i)].width or 0, snap.records[int(i)].height or 0) for i in ids])
            rows = {name: _per_image(snap.field(name), ids) for names in FAMILIES.values() for name in names
                    if snap.has_field(name)}
            state = Path(path) / STATE_FILE
            return cls(snap.encoder_name, snap.segment_config, globals_, sizes, rows, snap.object_config,
                       snap.local_config, state.read_bytes() if state.exists() else None)


def _per_image(rows: FieldRows, ids: np.ndarray) -> list[FieldRows]:
    """``rows`` split by owner, one entry per id of ``ids`` (owners set to 0), float32."""
    owners = np.asarray(rows.owners)
    by_owner = np.argsort(owners, kind="stable")
    starts = np.searchsorted(owners[by_owner], ids, side="left")
    ends = np.searchsorted(owners[by_owner], ids, side="right")
    out = []
    for a, b in zip(starts, ends):
        sel = by_owner[a:b]
        out.append(FieldRows(np.asarray(rows.vectors[sel], dtype=np.float32), np.zeros(len(sel), np.int64),
                             {k: np.asarray(v[sel]) for k, v in rows.attrs.items()}))
    return out


#: Images written as float32 before the compact storage of ``storage``'s fields is fitted on them.
STORAGE_FIT_IMAGES = 20_000


@dataclass(frozen=True)
class FieldStorage:
    """Compact storage of one field of a synthetic index: ``METHOD:DIM:QUANTIZE``, e.g. ``pca:64:int8``.

    The first :data:`STORAGE_FIT_IMAGES` images are written as float32, the field is compressed with
    ``drop_originals`` (as ``finegrain compress --field segments --drop-originals`` would), and the
    writer stores every later image's rows compact only: a million images never need their
    160 GB of float32 segments on disk.
    """

    method: str = "none"
    dim: int | None = None
    quantize: str = "none"

    @classmethod
    def parse(cls, text: str) -> FieldStorage:
        from ..compress.storage import METHODS, QUANTIZE

        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"--segment-storage is METHOD:DIM:QUANTIZE (e.g. pca:64:int8, none::float16), "
                             f"not {text!r}")
        method, dim, quantize = parts
        if method not in METHODS or quantize not in QUANTIZE:
            raise ValueError(f"--segment-storage {text!r}: method is one of {', '.join(METHODS)}, "
                             f"quantize one of {', '.join(QUANTIZE)}")
        if (method == "none") != (dim == ""):
            raise ValueError(f"--segment-storage {text!r}: a projection needs a dimension, 'none' takes none")
        if method == "none" and quantize == "none":
            raise ValueError("--segment-storage none::none is the float32 default; leave the option out")
        if dim and (not dim.isdigit() or int(dim) < 1):
            raise ValueError(f"--segment-storage {text!r}: the dimension must be a positive integer")
        return cls(method, int(dim) if dim else None, quantize)

    def label(self) -> str:
        return f"{self.method}:{self.dim or ''}:{self.quantize}"

    @classmethod
    def parse_fields(cls, text: str) -> dict[str, FieldStorage]:
        """``FIELD=METHOD:DIM:QUANTIZE`` pairs, comma-separated, e.g. ``segments=pca:64:int8,local=none::int8``."""
        out = {}
        known = [n for names in FAMILIES.values() for n in names]
        for part in (p.strip() for p in text.split(",") if p.strip()):
            name, eq, spec = part.partition("=")
            if not eq or name.strip() not in known:
                raise ValueError(f"--storage takes FIELD=METHOD:DIM:QUANTIZE pairs with FIELD one of "
                                 f"{', '.join(known)}, not {part!r}")
            out[name.strip()] = cls.parse(spec.strip())
        return out


def _noisy(rng: np.random.Generator, vectors: np.ndarray, noise: float) -> np.ndarray:
    """Unit vectors plus Gaussian noise of norm about ``noise``, re-normalised."""
    d = vectors.shape[1]
    out = rng.standard_normal(vectors.shape, dtype=np.float32)  # in place from here: no temporaries of the batch
    out *= np.float32(noise / math.sqrt(d))
    out += vectors
    # row norms by einsum: np.linalg.norm squares into a temporary and was half of a 100k every-field build
    out /= np.maximum(np.sqrt(np.einsum("ij,ij->i", out, out)), np.float32(1e-12))[:, None]
    return out


def build_synthetic(path: Path, source: Source, size: int, noise: float = 0.5, seed: int = 0, ann: str = "auto",
                    fields: Sequence[str] = ("segments",), progress: Callable[[int], None] | None = None,
                    storage: Mapping[str, FieldStorage] | None = None) -> float:
    """Write a ``size``-image synthetic index at ``path`` through the writer; returns the build seconds.

    ``fields``: the field families (:data:`FAMILIES`) copied besides ``global``, each with its source's
    settings (an index with local features also gets the source's fitted whitening, which queries need).
    ``storage``: fields stored compact (see :class:`FieldStorage`).
    """
    from ..index import Index
    from ..local.store import STATE_FILE

    missing = [f for f in fields if f not in source.families()]
    if missing:
        raise ValueError(f"the source index has no {', '.join(missing)} (it has: global"
                         f"{''.join(', ' + f for f in source.families())})")
    names = [n for f in fields for n in FAMILIES[f] if n in source.rows]
    storage = dict(storage or {})
    stray = sorted(set(storage) - set(names))
    if stray:
        raise ValueError(f"--storage names {', '.join(stray)}, which this synthetic index does not store "
                         f"(it stores global{''.join(', ' + n for n in names)})")
    t0 = time.perf_counter()
    index = Index.create(path, encoder=source.encoder, ann=ann,
                         segments=source.segments if "segments" in fields else None,
                         objects=source.objects if "objects" in fields else None,
                         local=source.local if "local" in fields else None)
    if "local" in fields and source.local_state is not None:
        (path / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
        (path / STATE_FILE).write_bytes(source.local_state)
    rng = np.random.default_rng(seed)
    compact_at = min(size, STORAGE_FIT_IMAGES) if storage else None
    try:
        start = 0
        while start < size:
            stop = compact_at if compact_at is not None and start < compact_at else size
            with index.writer() as w:
                for first in range(start, stop, BUILD_BATCH):
                    n = min(BUILD_BATCH, stop - first)
                    w.commit(*_synthetic_batch(rng, source, size, first, n, noise, names), [], [], [])
                    if progress is not None:
                        progress(n)
            if stop == compact_at:
                for name, spec in storage.items():
                    index.compress(spec.method, spec.dim, field=name, quantize=spec.quantize, drop_originals=True)
            start = stop
    finally:
        index.close()
    return time.perf_counter() - t0


def append_synthetic(path: Path, source: Source, n: int, noise: float = 0.5, seed: int = 1,
                     fields: Sequence[str] = ("local",)) -> float:
    """Append ``n`` synthetic images (drawn as :func:`build_synthetic` draws them) to the index at ``path``, in
    one commit per :data:`BUILD_BATCH`, as a growing collection receives them; returns the seconds taken.
    Fields the index stores compact are encoded with its own codecs by the writer."""
    from ..index import Index

    names = [name for f in fields for name in FAMILIES[f] if name in source.rows]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with Index.open(path) as index:
        first = len(index)
        with index.writer() as w:
            for start in range(0, n, BUILD_BATCH):
                images, rows = _synthetic_batch(rng, source, first, first + start, min(BUILD_BATCH, n - start),
                                                noise, names)
                w.commit(images, rows, [], [], [])
    return time.perf_counter() - t0


def _synthetic_batch(rng: np.random.Generator, source: Source, size: int, first: int, n: int, noise: float,
                     names: Sequence[str]) -> tuple[list[NewImage], dict[str, FieldRows]]:
    """Images ``first .. first + n - 1`` of a ``size``-image synthetic index: catalog rows and field rows."""
    pick = rng.integers(0, len(source.globals), n)
    images = [NewImage(path=f"/synthetic/{size}/{first + j:07d}.jpg",
                       sha256=hashlib.sha256(f"{size}/{first + j}".encode()).hexdigest(), size=0,
                       mtime_ns=0, width=int(source.sizes[s][0]), height=int(source.sizes[s][1]))
              for j, s in enumerate(pick)]
    fields = {"global": FieldRows(_noisy(rng, source.globals[pick], noise), np.arange(n))}
    for name in names:  # in a fixed order: the random stream of a build depends only on its fields
        parts = [source.rows[name][s] for s in pick]
        rows = FieldRows.concat([FieldRows(p.vectors, np.full(len(p), j, np.int64), p.attrs)
                                 for j, p in enumerate(parts)], parts[0].vectors.shape[1])
        noisy = _warped(rng, rows.vectors, rows.owners, noise) if name == "local" else \
            _noisy(rng, rows.vectors, noise)
        fields[name] = FieldRows(noisy, rows.owners, rows.attrs)
    return images, fields


def _warped(rng: np.random.Generator, vectors: np.ndarray, owners: np.ndarray, noise: float) -> np.ndarray:
    """Each image's unit rows through its own random near-identity map ``x + x E`` (E Gaussian, entries of
    variance noise^2 / d, so ``|x E|`` is about ``noise``), re-normalised.

    For local descriptors: a copy keeps its source's cosine of about ``1 / sqrt(1 + noise**2)``, as
    :func:`_noisy` gives, and also keeps which of its descriptors are near-duplicates of one another (one
    map moves them alike). Independent noise per descriptor broke those clumps: the near-duplicate
    reduction kept 61% of a synthetic image's 970 descriptors against 21% of a real photo's, which tripled
    the local search structure of a synthetic index over what the same number of photos gives.
    """
    d = vectors.shape[1]
    out = np.empty(vectors.shape, np.float32)
    bounds = np.flatnonzero(np.diff(owners)) + 1  # rows come grouped by image
    for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(owners)]])):
        x = np.asarray(vectors[a:b], np.float32)
        warp = rng.standard_normal((d, d), dtype=np.float32)
        warp *= np.float32(noise / math.sqrt(d))
        out[a:b] = x + x @ warp
    out /= np.maximum(np.sqrt(np.einsum("ij,ij->i", out, out)), np.float32(1e-12))[:, None]
    return out


def warm_global_search(path: Path) -> float:
    """Open the index and search its global field once, so the ANN structure (HNSW at 200,000 images and
    above) is built and cached next to the catalog; returns the seconds it took."""
    from ..index import Index
    from ..retrieval.dense import global_ann

    t0 = time.perf_counter()
    index = Index.open(path)
    try:
        global_ann(index.snapshot)  # builds the structure (or loads its cached file)
    finally:
        index.close()
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _rss_mb(key: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or peak resident set (``VmHWM``) in MiB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _takes_text(mode: str, snapshot: Any) -> bool:
    """Whether ``mode`` is measured with the text queries (else with the example images), as the index of
    ``snapshot`` allows (its retriever's :meth:`~finegrain.retrieval.Retriever.accepts_on`)."""
    from .. import retrieval

    base = parse_mode(mode)[0]
    return base == "global-exact" or retrieval.TEXT in retrieval.get(base).accepts_on(snapshot, base)


def measure_mode(path: str, mode: str, queries: Sequence[str], k: int = 10, images: Sequence[str] = ()
                 ) -> tuple[dict[str, Any], list[list[int]]]:
    """One mode on one index: its row (latency, RSS of this process) and each query's top-``k`` image ids.

    Text modes run the text ``queries``; image-only modes (the local-feature ones) the example ``images``.
    """
    from ..index import Index

    rss_base = _rss_mb()
    index = Index.open(path)
    try:
        text = _takes_text(mode, index.snapshot)
        if not text and not images:
            raise ValueError(f"mode {mode!r} takes example images as queries on this index; none were given")
        asked: list[dict[str, Any]] = [{"text": q} for q in queries] if text else [{"image": p} for p in images]
        index.embed_query(**asked[0])  # loads the model: RSS after this is the baseline the index adds to
        rss_model = _rss_mb()
        row: dict[str, Any] = {"mode": mode, "query_kind": "text" if text else "image"}
        if mode == "global-exact":
            ranked = _exact_global(index, queries, k)
        else:
            base, options = parse_mode(mode)
            index.search(**asked[0], k=k, mode=base, **options)  # warm-up: builds ANN, segment table
            latencies, encoding, ranked, sim_ops = [], [], [], []
            for q in asked:
                t0 = time.perf_counter()
                hits = index.search(**q, k=k, mode=base, **options)
                latencies.append((time.perf_counter() - t0) * 1000)
                encoding.append(hits.timings.get("encode_ms", 0.0))
                ranked.append([h.id for h in hits])
                sim_ops.append(hits.stats.sim_ops)
            searching = np.subtract(latencies, encoding)  # search alone: less the decomposition and encoding
            row.update({"p50_ms": float(np.percentile(latencies, 50)),
                        "p95_ms": float(np.percentile(latencies, 95)),
                        "encode_ms_p50": float(np.percentile(encoding, 50)),
                        "search_p50_ms": float(np.percentile(searching, 50)),
                        "search_p95_ms": float(np.percentile(searching, 95)),
                        "sim_ops_per_query": float(np.mean(sim_ops))})
        # peak resident set, and at the end its anonymous part (heap) apart from mapped index files (page cache)
        row.update(rss_mb=_rss_mb("VmHWM"), rss_anon_mb=_rss_mb("RssAnon"), rss_file_mb=_rss_mb("RssFile"),
                   rss_model_mb=rss_model, rss_base_mb=rss_base)
    finally:
        index.close()
    return row, ranked


def measure(path: str, modes: Sequence[str], queries: Sequence[str], k: int = 10, isolate: bool = True,
            images: Sequence[str] = (), timeout: float | None = None) -> list[dict]:
    """Latency, RSS and top-``k`` agreement of each mode on one index.

    ``isolate``: each mode (and each exact reference) runs in its own fresh process, so a row's ``rss_mb``
    is that mode's own peak: the exact ``exhaustive`` reference reads every segment row, which a
    ``hierarchical`` search never does. Without it (quicker, for tests) every mode runs here.
    ``images``: example-image queries of the image-only modes. ``timeout`` (seconds, with ``isolate``): a mode
    still running past it is stopped. A mode that fails or is stopped gives a row with ``skipped`` (why) and
    null figures; the other modes are still measured.
    """
    from .peers import in_child

    top: dict[str, list[list[int]]] = {}
    rows: list[dict[str, Any]] = []
    for mode in _with_references(modes):
        try:
            row, top[mode] = in_child(measure_mode, path, mode, list(queries), k, list(images), timeout=timeout) \
                if isolate else measure_mode(path, mode, queries, k, images)
        except (RuntimeError, TimeoutError) as exc:  # the child's error, or the time limit
            row = {"mode": mode, "skipped": str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc),
                   **dict.fromkeys(("p50_ms", "p95_ms", "search_p50_ms", "rss_mb"))}
        if mode in modes:
            rows.append(row)
    for row in rows:
        ref = REFERENCE.get(parse_mode(row["mode"])[0])
        if ref == row["mode"]:
            ref = None
        row["reference"] = ref or row["mode"]
        row["agreement_at_10"] = (None if ref is None or row["mode"] not in top or ref not in top else
                                  float(np.mean([len(set(a[:k]) & set(b[:k])) / max(1, min(k, len(b)))
                                                 for a, b in zip(top[row["mode"]], top[ref])])))
    rows.sort(key=lambda r: list(modes).index(r["mode"]))  # as asked, not as run
    return rows


def _with_references(modes: Sequence[str]) -> list[str]:
    """The modes to run: their exact references first."""
    refs = [REFERENCE[parse_mode(m)[0]] for m in modes if REFERENCE.get(parse_mode(m)[0])]
    return list(dict.fromkeys([r for r in refs if r is not None] + list(modes)))


def _exact_global(index: Any, queries: Sequence[str], k: int) -> list[list[int]]:
    """Brute-force top-``k`` image ids over the stored global rows."""
    from ..retrieval.dense import exact_ids

    q = np.stack([index.embed_query(text=t) for t in queries]).astype(np.float32)
    return exact_ids(index.snapshot, q, k).tolist()


def run_scale(source_index: str | os.PathLike, sizes: Sequence[int], cache_dir: str | os.PathLike,
              queries: Sequence[str], modes: Sequence[str] = DEFAULT_MODES, noise: float = 0.5, seed: int = 0,
              ann: str = "auto", k: int = 10, rebuild: bool = False, show_progress: bool = True,
              log: Callable[[str], None] = print, isolate: bool = True, peers: Sequence[str] = (),
              create_envs: bool = True, storage: Mapping[str, FieldStorage] | None = None,
              build_only: bool = False, fields: Sequence[str] | None = None, images: Sequence[str] = (),
              local_features: int | None = None, mode_timeout: float | None = None) -> list[dict]:
    """Build (or reuse) one synthetic index per size and measure it; one row per (size, mode).

    ``isolate`` measures each mode of each size in a fresh process, so that ``rss_mb`` is that mode's own
    peak; without it (quicker, for tests) RSS figures include everything this process holds.
    ``peers`` (:mod:`finegrain.bench.peers`): other engines on the same vectors, one row each per size
    (a peer that cannot run gives a row with ``skipped``); ``create_envs``: fast-plaid may make its virtualenv.
    ``fields``: the field families copied besides ``global`` (:data:`FAMILIES`; default: what the modes and
    peers need, or every family of the source with ``("all",)``). ``storage``: fields stored compact
    (:class:`FieldStorage`); every mode, the exact references included, then scores the compact rows, and
    rows gain ``storage`` (and ``segment_storage``). ``images``: example-image queries of the image-only modes.
    ``local_features``: keep at most that many local descriptors per synthetic image (the strongest).
    ``mode_timeout``: seconds a mode's process may run (warm-up and first-use structures included) before it
    is stopped and its row says so.
    ``build_only``: build (or reuse) each size and its global ANN structure, measure nothing, return no rows:
    the hours of a million-image build can run beside other work, the measuring run alone later.
    """
    from ..progress import progress_bar
    from .peers import MULTIVECTOR_PEERS

    unknown = [m for m in modes if parse_mode(m)[0] not in REFERENCE]
    if unknown:
        raise ValueError(f"bench scale does not know mode(s) {', '.join(unknown)}; choose from {', '.join(REFERENCE)}")
    if not queries:
        raise ValueError("bench scale needs at least one query")
    source = Source.from_index(source_index)
    if local_features is not None:
        source = source.with_local_features(local_features)
    needed = {NEEDS[parse_mode(m)[0]] for m in modes if parse_mode(m)[0] in NEEDS}
    if any(p in MULTIVECTOR_PEERS for p in peers):
        needed.add("segments")  # multi-vector peers need the segments too
    if fields is not None and "all" in fields:
        fields = source.families()
    strange = sorted(set(fields or ()) - set(FAMILIES))
    if strange:
        raise ValueError(f"unknown field family {', '.join(map(repr, strange))}; "
                         f"choose from all, {', '.join(FAMILIES)}")
    wanted = sorted(needed | set(fields or ()), key=list(FAMILIES).index)
    for family in wanted:
        if family not in source.families():
            users = [m for m in modes if NEEDS.get(parse_mode(m)[0]) == family]
            raise ValueError(f"the source index at {source_index} has no {family}"
                             + (f"; the modes {', '.join(users)} need them" if users else ""))
    storage = dict(storage or {})
    if storage.get("segments") is not None and peers:
        raise ValueError("--segment-storage applies to finegrain's multi-vector modes; peers read float32 "
                         "segments, which a compact synthetic index does not keep: run them without it")
    from ..index import Index

    with Index.open(source_index) as opened:  # a synthetic index has its source's settings: the same query kinds
        image_only = [m for m in modes if not _takes_text(m, opened.snapshot)]
    if image_only and not images:
        raise ValueError("the image-only modes (instance, global+local, local, l2g; the object modes of an index "
                         "of raw object descriptors) need example images as queries")
    identity: list[Any] = [str(Path(source_index).resolve()), noise, seed, ann, "segments" in wanted,
                           len(source.globals)]
    if set(storage) == {"segments"}:  # older cache keys stay valid for float32 and compact-segment builds
        identity.append(storage["segments"].label())
    elif storage:
        identity.append({name: spec.label() for name, spec in sorted(storage.items())})
    if set(wanted) - {"segments"}:
        identity.append(wanted)
    if local_features is not None and "local" in wanted:
        identity.append(f"local_features={local_features}")
    if "local" in wanted:  # local copies are warped per image since stop 37 (_warped): not the older builds
        identity.append("local=warped")
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:10]
    labels: dict[str, Any] = {"storage": {n: spec.label() for n, spec in storage.items()}} if storage else {}
    if "segments" in storage:
        labels["segment_storage"] = storage["segments"].label()
    results = []
    for size in sizes:
        if size < 1:
            raise ValueError(f"sizes must be positive, not {size}")
        path = Path(cache_dir) / f"scale-{size}-{key}"
        done = path / "BUILD.json"
        if rebuild or not done.exists():
            if path.exists():
                from ..index import remove_index

                remove_index(path)
            with progress_bar(size, f"building {size:,} synthetic images", enabled=show_progress) as bar:
                build_s = build_synthetic(path, source, size, noise, seed, ann, wanted, bar.advance, storage)
            done.write_text(json.dumps({"build_s": build_s, "images": size}))
        build_s = json.loads(done.read_text())["build_s"]
        disk = dir_bytes(path)
        if build_only:
            log(f"{size:,} images: built in {build_s:.0f} s, {disk / size / 1024:.1f} KiB per image; "
                f"global search structure ready in {warm_global_search(path):.0f} s")
            continue
        log(f"{size:,} images: built in {build_s:.0f} s, {disk / size / 1024:.1f} KiB per image; measuring")
        measured = measure(str(path), modes, queries, k, isolate, images, mode_timeout)
        for row in measured:
            results.append({"images": size, "system": "finegrain", **row, "disk_bytes_per_image": disk / size,
                            "build_s": build_s,
                            "queries": len(queries if row.get("query_kind", "text") == "text" else images),
                            "noise": noise, "fields": wanted,
                            **({"local_features": local_features} if local_features and "local" in wanted else {}),
                            **labels})
        if peers:
            from .peers import run_peers

            for row in run_peers(path, peers, queries, k, isolate=isolate, cache_dir=Path(cache_dir),
                                 create_envs=create_envs, disk_bytes=disk, log=log, modes=modes, build_s=build_s):
                results.append({**row, "noise": noise})
    return results


def growth(rows: Sequence[dict]) -> list[dict]:
    """Per mode: how p50 grows from the smallest to the largest size (ratio of images vs ratio of p50)."""
    out = []
    for system, mode in dict.fromkeys((r["system"], r["mode"]) for r in rows):
        mine = sorted((r for r in rows if r["system"] == system and r["mode"] == mode and r["p50_ms"] is not None),
                      key=lambda r: r["images"])
        if len(mine) < 2:
            continue
        a, b = mine[0], mine[-1]
        out.append({"system": system, "mode": mode, "from": a["images"], "to": b["images"],
                    "images_x": b["images"] / a["images"], "p50_x": b["p50_ms"] / max(a["p50_ms"], 1e-9),
                    "exponent": math.log(b["p50_ms"] / max(a["p50_ms"], 1e-9)) / math.log(b["images"] / a["images"])})
    return out


def plot_growth(rows: Sequence[dict], path: Path) -> Path:
    """Log-log plot of p50 latency against images, one line per (system, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=110)
    for system, mode in dict.fromkeys((r["system"], r["mode"]) for r in rows):
        mine = sorted((r for r in rows if r["system"] == system and r["mode"] == mode and r["p50_ms"] is not None),
                      key=lambda r: r["images"])
        if not mine:
            continue
        label = mode if system == "finegrain" else f"{system} {mode}"
        ax.plot([r["images"] for r in mine], [r["p50_ms"] for r in mine], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images")
    ax.set_ylabel("p50 latency (ms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path



def flickr8k_queries(data: str | Path, split: str = "dev", n_queries: int = 50, seed: int = 0) -> list[str]:
    """``n_queries`` captions of a Flickr8k ``split``, drawn with ``seed`` (the bench's text queries)."""
    from ..datasets import load_flickr8k

    captions = load_flickr8k(data, split).captions
    picked = np.random.default_rng(seed).choice(len(captions), size=min(n_queries, len(captions)), replace=False)
    return [captions[int(i)] for i in picked]


def flickr8k_image_queries(data: str | Path, split: str = "dev", n_queries: int = 50, seed: int = 0) -> list[str]:
    """``n_queries`` image files of a Flickr8k ``split``, drawn with ``seed`` (the image-only modes' queries;
    a synthetic index holds noisy copies of its source's vectors, so these have near-copies in it)."""
    from ..datasets import load_flickr8k

    paths = [str(p) for p in load_flickr8k(data, split).image_paths()]
    picked = np.random.default_rng(seed + 1).choice(len(paths), size=min(n_queries, len(paths)), replace=False)
    return [paths[int(i)] for i in picked]


def flickr8k_source(data: str | Path, split: str = "dev", encoder: str = "effnet-minilm",
                    cache_dir: str | os.PathLike | None = None, segments: Any = None,
                    show_progress: bool = True) -> Path:
    """The segmented Flickr8k bench index of ``split`` (the one ``bench flickr8k`` builds and reuses)."""
    from ..datasets import load_flickr8k
    from ..decompose.segments import SegmentConfig
    from .common import bench_index, flickr8k_index_name

    segments = segments or SegmentConfig()
    cache = Path(cache_dir or Path.home() / ".cache" / "finegrain" / "bench")
    name = flickr8k_index_name(split, encoder, segments)
    index, _ = bench_index(load_flickr8k(data, split).image_paths(), encoder, cache / name, show_progress, segments)
    index.close()
    return cache / name
