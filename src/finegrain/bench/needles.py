"""Small-object retrieval benchmark on the ``needles`` composites (``finegrain bench needles``).

Data (``../shared/data/needles``): ``scenes/`` (800 photos, 100 of them with a
small pasted Paris landmark, 1-4 % of the area), ``queries/`` (landmark
crops) and ``gnd.json`` (per scene its landmark, box and area fraction; per
query its relevant scenes). Each query searches the whole scene index; the
metric is mAP over queries (non-interpolated AP over the full ranking), also
restricted to the relevant scenes of each pasted-area bucket (the other
relevant scenes are ignored, as junk images are in the revisitop protocol).

Modes: ``global`` (the index's joint-space vector), ``global-raw`` (the image
tower's raw GeM feature of the whole scene, the fair non-object baseline for
the raw object descriptors), ``hierarchical`` (HiMIR segments), ``objects``,
``objects-max``, ``objects-refined`` (docs/mao.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..decompose.segments import SegmentConfig
from ..index import Index
from ..objects.config import ObjectConfig
from .common import bench_index

MODES = ("global", "global-raw", "hierarchical", "objects", "objects-max", "objects-refined")
AREA_BUCKETS = {"1-2%": (0.0, 0.02), "2-3%": (0.02, 0.03), "3-4%": (0.03, 1.0)}


@dataclass
class NeedlesSet:
    """The benchmark's files and ground truth."""

    scenes: list[Path]
    queries: list[Path]
    relevant: list[set[str]]  # per query, relevant scene file names
    area: dict[str, float]  # scene file name -> pasted area fraction (scenes with a landmark)


def load_needles(data: str | Path) -> NeedlesSet:
    """Read ``gnd.json`` and check every listed file exists."""
    root = Path(data)
    gnd_path = root / "gnd.json"
    if not gnd_path.exists():
        raise FileNotFoundError(f"no needles benchmark at {root}: {gnd_path} is missing")
    gnd = json.loads(gnd_path.read_text())
    try:
        scenes = [root / "scenes" / s["image"] for s in gnd["scenes"]]
        queries = [root / "queries" / q["query"] for q in gnd["queries"]]
        relevant = [set(q["relevant"]) for q in gnd["queries"]]
        area = {s["image"]: float(s["area_fraction"]) for s in gnd["scenes"] if s.get("landmark")}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{gnd_path} is not a needles ground truth: {exc}") from None
    missing = [str(p) for p in scenes + queries if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} benchmark files are missing, e.g. {missing[0]}")
    if not queries:
        raise ValueError(f"{gnd_path} lists no queries")
    return NeedlesSet(scenes, queries, relevant, area)


def average_precision(ranked: list[str], relevant: set[str], ignore: set[str] | frozenset[str] = frozenset()) -> float:
    """Non-interpolated AP of a full ranking (names), skipping ``ignore`` names; 0 if nothing is relevant."""
    hits, total, rank = 0, 0.0, 0
    for name in ranked:
        if name in ignore:
            continue
        rank += 1
        if name in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant) if relevant else 0.0


def needles_map(rankings: list[list[str]], data: NeedlesSet) -> dict:
    """``map`` over queries and ``map_by_area`` per pasted-area bucket (fractions in [0, 1])."""
    overall = [average_precision(r, rel) for r, rel in zip(rankings, data.relevant)]
    by_area = {}
    for bucket, (lo, hi) in AREA_BUCKETS.items():
        aps = []
        for r, rel in zip(rankings, data.relevant):
            inside = {n for n in rel if lo <= data.area.get(n, -1) < hi}
            if inside:
                aps.append(average_precision(r, inside, ignore=rel - inside))
        by_area[bucket] = float(np.mean(aps)) if aps else float("nan")
    return {"map": float(np.mean(overall)), "map_by_area": by_area}


def _index_for(mode: str, data: NeedlesSet, encoder: str, cache: Path, show_progress: bool, proposals: str,
               min_crop: int, refine_iters: int, threshold: float | None = None,
               refine_variant: str = "finegrain") -> tuple[Index, dict]:
    safe = encoder.replace("/", "_").replace(":", "_")
    if mode in ("global", "global-raw"):
        return bench_index(data.scenes, encoder, cache / f"needles-{safe}-plain", show_progress)
    if mode == "hierarchical":
        return bench_index(data.scenes, encoder, cache / f"needles-{safe}-segments", show_progress,
                           segments=SegmentConfig())
    refine = refine_iters if mode == "objects-refined" else 0
    if mode == "objects-refined" and refine <= 0:
        raise ValueError("mode objects-refined needs --refine-iters > 0")
    cfg = ObjectConfig(proposals=proposals, min_crop=min_crop, refine_iters=refine,
                       refine_variant=refine_variant if refine else "finegrain")
    name = f"needles-{safe}-objects-{proposals}-c{min_crop}-r{refine}"
    if refine and refine_variant != "finegrain":  # its own cached index; the default keeps the old name
        name += f"-{refine_variant}"
    if threshold is not None and threshold != cfg.threshold:  # a detector score cut other than the default
        cfg = replace(cfg, threshold=threshold)
        name += f"-t{threshold:g}"
    return bench_index(data.scenes, encoder, cache / name, show_progress, objects=cfg)


def _global_raw_rankings(index: Index, data: NeedlesSet, size: int | None = None) -> tuple[list[list[str]], float]:
    """Rankings by the raw GeM (p = 3) feature of whole scenes and queries at ``size`` (default: the encoder's input).

    Also returns the mean milliseconds to encode and score one query.
    """
    import torch

    from ..encoders.base import l2_normalize
    from ..objects.descriptor import gem

    enc = index.encoder

    def raw(paths: list[Path]) -> np.ndarray:
        vecs = []
        for start in range(0, len(paths), 32):
            pix = np.stack([enc.preprocess(p, size) for p in paths[start:start + 32]])
            with torch.inference_mode():
                vecs.append(gem(enc.feature_map_batch(torch.from_numpy(pix)).float()).numpy())
        return l2_normalize(np.concatenate(vecs))

    names = [p.name for p in data.scenes]
    scenes = raw(data.scenes)
    t0 = time.perf_counter()
    scores = raw(data.queries) @ scenes.T
    ms = (time.perf_counter() - t0) * 1000 / len(data.queries)
    return [[names[i] for i in np.argsort(-s, kind="stable")] for s in scores], ms


def run_needles(data: str | Path, mode: str = "objects", proposals: str = "regions", min_crop: int = 0,
                refine_iters: int = 80, encoder: str = "effnet-minilm", cache_dir: str | Path | None = None,
                show_progress: bool = True, raw_size: int | None = None, threshold: float | None = None,
                refine_variant: str = "finegrain") -> dict:
    """Run the benchmark in one mode; returns ``map``, ``map_by_area``, ``index_images_per_s`` and details.

    ``refine_variant``: the Stage B objective of the ``objects-refined`` index (``ObjectConfig.refine_variant``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown needles mode {mode!r}; available: {', '.join(MODES)}")
    bench = load_needles(data)
    cache = Path(cache_dir or Path.home() / ".cache" / "finegrain" / "bench")
    index, stats = _index_for(mode, bench, encoder, cache, show_progress, proposals, min_crop, refine_iters,
                              threshold, refine_variant)
    latencies = []
    if mode == "global-raw":
        rankings, ms = _global_raw_rankings(index, bench, raw_size)
        latencies.append(ms)
    else:
        names = {int(i): Path(index.records[int(i)].path).name for i in index.global_rows.owners}
        all_names = [p.name for p in bench.scenes]
        rankings = []
        for q in bench.queries:
            t0 = time.perf_counter()
            hits = index.search(image=q, k=len(index), mode=mode)
            latencies.append((time.perf_counter() - t0) * 1000)
            ranked = [names[h.id] for h in hits]
            seen = set(ranked)
            rankings.append(ranked + [n for n in all_names if n not in seen])  # unranked scenes last
    result = {
        "dataset": Path(data).name,
        "mode": mode,
        "encoder": encoder,
        "scenes": len(bench.scenes),
        "queries": len(bench.queries),
        **needles_map(rankings, bench),
        "query_ms_p50": float(np.percentile(latencies, 50)),
        "index_images_per_s": stats["index_images_per_s"],
        "index_reused": stats["index_reused"],
    }
    if mode == "global-raw":
        result["raw_size"] = raw_size or index.encoder.image_size
    if index.object_config is not None:
        result["objects"] = index.object_config.to_dict()
        result["objects_per_image"] = round(len(index.fields.get("objects", [])) / max(1, len(index)), 2)
    return result
