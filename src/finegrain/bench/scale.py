"""``finegrain bench scale``: how latency, agreement with exact search, memory and disk grow with the collection.

Synthetic indexes of 10^4 .. 10^6 images are written through the real
writer (the same chunk files and catalog as ``finegrain index``), with
vectors drawn from a *source* index of real photos: each synthetic image
copies one source image's vectors (its global vector and every segment
vector, with the segment levels, boxes and areas) and adds independent
Gaussian noise to each vector before re-normalising. ``noise`` is the
noise's norm relative to the unit vector, so a copy has cosine about
``1 / sqrt(1 + noise**2)`` to its source (0.89 at the default 0.5). Score
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

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..store.catalog import NewImage
from ..store.vectors import FieldRows

#: The exact reference each mode's top-10 is compared with (None: the mode is its own reference).
#: Multi-vector modes are compared with ``exhaustive`` over every image (no candidate stage).
EXACT_MULTIVECTOR = "exhaustive:candidates=0"
REFERENCE = {"global": "global-exact", "single": None, "exhaustive": EXACT_MULTIVECTOR,
             "hierarchical": EXACT_MULTIVECTOR}


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


@dataclass
class Source:
    """Real vectors that synthetic images are drawn from (one entry per source image)."""

    encoder: str
    segments: Any  # SegmentConfig | None
    globals: np.ndarray  # (n, d) float32
    sizes: np.ndarray  # (n, 2) width, height
    seg_rows: list[FieldRows] | None  # per source image, its segment rows (owners 0)

    @classmethod
    def from_index(cls, path: str | os.PathLike) -> Source:
        from ..index import Index

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
            seg_rows = None
            if snap.has_field("segments"):
                s = snap.field("segments")
                owners = np.asarray(s.owners)
                by_owner = np.argsort(owners, kind="stable")
                starts = np.searchsorted(owners[by_owner], ids, side="left")
                ends = np.searchsorted(owners[by_owner], ids, side="right")
                seg_rows = []
                for a, b in zip(starts, ends):
                    sel = by_owner[a:b]
                    rows = FieldRows(np.asarray(s.vectors[sel], dtype=np.float32), np.zeros(len(sel), np.int64),
                                     {k: np.asarray(v[sel]) for k, v in s.attrs.items()})
                    seg_rows.append(rows)
            return cls(snap.encoder_name, snap.segment_config, globals_, sizes, seg_rows)


#: Images written as float32 before a compact segment storage is fitted on them (``segment_storage``).
STORAGE_FIT_IMAGES = 20_000


@dataclass(frozen=True)
class SegmentStorage:
    """Compact segment storage of a synthetic index: ``METHOD:DIM:QUANTIZE``, e.g. ``pca:64:int8``.

    The first :data:`STORAGE_FIT_IMAGES` images are written as float32, the field is compressed with
    ``drop_originals`` (as ``finegrain compress --field segments --drop-originals`` would), and the
    writer stores every later image's segments compact only: a million images never need their
    160 GB of float32 segments on disk.
    """

    method: str = "none"
    dim: int | None = None
    quantize: str = "none"

    @classmethod
    def parse(cls, text: str) -> SegmentStorage:
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


def _noisy(rng: np.random.Generator, vectors: np.ndarray, noise: float) -> np.ndarray:
    """Unit vectors plus Gaussian noise of norm about ``noise``, re-normalised."""
    d = vectors.shape[1]
    out = vectors + rng.standard_normal(vectors.shape, dtype=np.float32) * np.float32(noise / math.sqrt(d))
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32, copy=False)


def build_synthetic(path: Path, source: Source, size: int, noise: float = 0.5, seed: int = 0, ann: str = "auto",
                    with_segments: bool = True, progress: Callable[[int], None] | None = None,
                    segment_storage: SegmentStorage | None = None) -> float:
    """Write a ``size``-image synthetic index at ``path`` through the writer; returns the build seconds.

    ``segment_storage``: store the segments compact (see :class:`SegmentStorage`).
    """
    from ..index import Index

    t0 = time.perf_counter()
    segments = source.segments if with_segments and source.seg_rows is not None else None
    index = Index.create(path, encoder=source.encoder, ann=ann, segments=segments)
    rng = np.random.default_rng(seed)
    compact_at = min(size, STORAGE_FIT_IMAGES) if segment_storage is not None and segments is not None else None
    try:
        start = 0
        while start < size:
            stop = compact_at if compact_at is not None and start < compact_at else size
            with index.writer() as w:
                for first in range(start, stop, BUILD_BATCH):
                    n = min(BUILD_BATCH, stop - first)
                    w.commit(*_synthetic_batch(rng, source, size, first, n, noise, segments is not None), [], [], [])
                    if progress is not None:
                        progress(n)
            if stop == compact_at:
                assert segment_storage is not None
                index.compress(segment_storage.method, segment_storage.dim, field="segments",
                               quantize=segment_storage.quantize, drop_originals=True)
            start = stop
    finally:
        index.close()
    return time.perf_counter() - t0


def _synthetic_batch(rng: np.random.Generator, source: Source, size: int, first: int, n: int, noise: float,
                     with_segments: bool) -> tuple[list[NewImage], dict[str, FieldRows]]:
    """Images ``first .. first + n - 1`` of a ``size``-image synthetic index: catalog rows and field rows."""
    pick = rng.integers(0, len(source.globals), n)
    images = [NewImage(path=f"/synthetic/{size}/{first + j:07d}.jpg",
                       sha256=hashlib.sha256(f"{size}/{first + j}".encode()).hexdigest(), size=0,
                       mtime_ns=0, width=int(source.sizes[s][0]), height=int(source.sizes[s][1]))
              for j, s in enumerate(pick)]
    fields = {"global": FieldRows(_noisy(rng, source.globals[pick], noise), np.arange(n))}
    if with_segments:
        assert source.seg_rows is not None
        parts = [source.seg_rows[s] for s in pick]
        rows = FieldRows.concat([FieldRows(p.vectors, np.full(len(p), j, np.int64), p.attrs)
                                 for j, p in enumerate(parts)], source.globals.shape[1])
        fields["segments"] = FieldRows(_noisy(rng, rows.vectors, noise), rows.owners, rows.attrs)
    return images, fields


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


def measure_mode(path: str, mode: str, queries: Sequence[str], k: int = 10) -> tuple[dict[str, Any], list[list[int]]]:
    """One mode on one index: its row (latency, RSS of this process) and each query's top-``k`` image ids."""
    from ..index import Index

    rss_base = _rss_mb()
    index = Index.open(path)
    try:
        index.embed_query(text=queries[0])  # loads the model: RSS after this is the baseline the index adds to
        rss_model = _rss_mb()
        row: dict[str, Any] = {"mode": mode}
        if mode == "global-exact":
            ranked = _exact_global(index, queries, k)
        else:
            base, options = parse_mode(mode)
            index.search(text=queries[0], k=k, mode=base, **options)  # warm-up: builds ANN, segment table
            latencies, encoding, ranked, sim_ops = [], [], [], []
            for q in queries:
                t0 = time.perf_counter()
                hits = index.search(text=q, k=k, mode=base, **options)
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


def measure(path: str, modes: Sequence[str], queries: Sequence[str], k: int = 10, isolate: bool = True
            ) -> list[dict]:
    """Latency, RSS and top-``k`` agreement of each mode on one index.

    ``isolate``: each mode (and each exact reference) runs in its own fresh process, so a row's ``rss_mb``
    is that mode's own peak: the exact ``exhaustive`` reference reads every segment row, which a
    ``hierarchical`` search never does. Without it (quicker, for tests) every mode runs here.
    """
    from .peers import in_child

    top: dict[str, list[list[int]]] = {}
    rows: list[dict[str, Any]] = []
    for mode in _with_references(modes):
        row, top[mode] = in_child(measure_mode, path, mode, list(queries), k) if isolate else \
            measure_mode(path, mode, queries, k)
        if mode in modes:
            rows.append(row)
    for row in rows:
        ref = REFERENCE.get(parse_mode(row["mode"])[0])
        if ref == row["mode"]:
            ref = None
        row["reference"] = ref or row["mode"]
        row["agreement_at_10"] = (None if ref is None else
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
              create_envs: bool = True, segment_storage: SegmentStorage | None = None,
              build_only: bool = False) -> list[dict]:
    """Build (or reuse) one synthetic index per size and measure it; one row per (size, mode).

    ``isolate`` measures each mode of each size in a fresh process, so that ``rss_mb`` is that mode's own
    peak; without it (quicker, for tests) RSS figures include everything this process holds.
    ``peers`` (:mod:`finegrain.bench.peers`): other engines on the same vectors, one row each per size
    (a peer that cannot run gives a row with ``skipped``); ``create_envs``: fast-plaid may make its virtualenv.
    ``segment_storage``: compact segments (:class:`SegmentStorage`); every mode, the exact reference
    included, then scores the compact rows, and rows gain ``segment_storage``.
    ``build_only``: build (or reuse) each size and its global ANN structure, measure nothing, return no rows:
    the hours of a million-image build can run beside other work, the measuring run alone later.
    """
    from ..progress import progress_bar

    unknown = [m for m in modes if parse_mode(m)[0] not in REFERENCE]
    if unknown:
        raise ValueError(f"bench scale does not know mode(s) {', '.join(unknown)}; choose from {', '.join(REFERENCE)}")
    if not queries:
        raise ValueError("bench scale needs at least one query")
    source = Source.from_index(source_index)
    from .peers import MULTIVECTOR_PEERS

    # multi-vector peers need the segments too
    segmented = any(parse_mode(m)[0] != "global" for m in modes) or any(p in MULTIVECTOR_PEERS for p in peers)
    if segmented and source.seg_rows is None:
        raise ValueError(f"the source index at {source_index} has no segments; the multi-vector modes need them")
    if segment_storage is not None and (peers or not segmented):
        raise ValueError("--segment-storage applies to finegrain's multi-vector modes; peers read float32 "
                         "segments, which a compact synthetic index does not keep: run them without it")
    identity = [str(Path(source_index).resolve()), noise, seed, ann, segmented, len(source.globals)]
    if segment_storage is not None:  # older cache keys stay valid for float32 builds
        identity.append(segment_storage.label())
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:10]
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
                build_s = build_synthetic(path, source, size, noise, seed, ann, segmented, bar.advance,
                                          segment_storage)
            done.write_text(json.dumps({"build_s": build_s, "images": size}))
        build_s = json.loads(done.read_text())["build_s"]
        disk = dir_bytes(path)
        if build_only:
            log(f"{size:,} images: built in {build_s:.0f} s, {disk / size / 1024:.1f} KiB per image; "
                f"global search structure ready in {warm_global_search(path):.0f} s")
            continue
        log(f"{size:,} images: built in {build_s:.0f} s, {disk / size / 1024:.1f} KiB per image; measuring")
        measured = measure(str(path), modes, queries, k, isolate)
        for row in measured:
            results.append({"images": size, "system": "finegrain", **row, "disk_bytes_per_image": disk / size,
                            "build_s": build_s, "queries": len(queries), "noise": noise,
                            **({"segment_storage": segment_storage.label()} if segment_storage else {})})
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
