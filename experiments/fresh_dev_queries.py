"""Multi-vector modes on dev captions no earlier run has used: top-10 agreement with exhaustive, latency, memory.

Usage::

    python -m experiments.fresh_dev_queries --halves DATA OUTDIR
    python -m experiments.fresh_dev_queries INDEX DATA N REFS.json [--images=LIST] --refs-only
    python -m experiments.fresh_dev_queries INDEX DATA N REFS.json [--images=LIST] MODE [MODE ...]

The queries: N Flickr8k dev captions drawn with seed 1 from those that ``finegrain bench scale --queries 100``
(seed 0) did not draw, so a setting chosen after that run is reported on captions it never saw.
``--halves`` writes ``dev-a.txt`` and ``dev-b.txt``: the dev images split in two at random (seed 2), to
choose on one half (``finegrain tune --query-images dev-a.txt``) and report on the other. With
``--images=LIST`` the N captions are drawn with seed 3 from those of LIST's images, leaving out both
earlier draws (seed 0 and seed 1) as well. The first
form computes the reference (``exhaustive`` over every image, which reads every segment row) and caches it;
the second, in a fresh process, times each MODE (options after a colon, as ``bench scale`` takes them) through
``Index.search`` after one warm-up query, and prints one JSON line per mode: p50/p95 of the whole call, of the
query encoding and of the search after it, agreement@10, and the process's peak, anonymous and file-backed RSS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from finegrain.bench.scale import flickr8k_queries, parse_mode
from finegrain.datasets import load_flickr8k
from finegrain.index import Index


def fresh_captions(data: str, n: int, images: Path | None = None) -> list[str]:
    split = load_flickr8k(data, "dev")
    used = set(flickr8k_queries(data, "dev", 100, 0))
    rest = sorted(set(split.captions) - used)
    picked = np.random.default_rng(1).choice(len(rest), size=min(n, len(rest)), replace=False)
    drawn = [rest[int(i)] for i in picked]
    if images is None:
        return drawn
    names = set(images.read_text().split())
    used |= set(fresh_captions(data, 100))  # the seed-1 draw of 100 that earlier reports used
    rest = sorted({c for c, i in zip(split.captions, split.caption_image) if split.images[i] in names} - used)
    picked = np.random.default_rng(3).choice(len(rest), size=min(n, len(rest)), replace=False)
    return [rest[int(i)] for i in picked]


def write_halves(data: str, out: Path) -> None:
    names = sorted(load_flickr8k(data, "dev").images)
    order = np.random.default_rng(2).permutation(len(names))
    half = len(names) // 2
    out.mkdir(parents=True, exist_ok=True)
    for label, part in (("a", order[:half]), ("b", order[half:])):
        (out / f"dev-{label}.txt").write_text("".join(names[int(i)] + "\n" for i in sorted(part)))


def memory() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def main(argv: list[str]) -> None:
    if argv[0] == "--halves":
        write_halves(argv[1], Path(argv[2]))
        return
    images = next((Path(a.split("=", 1)[1]) for a in argv if a.startswith("--images=")), None)
    argv = [a for a in argv if not a.startswith("--images=")]
    path, data, n, refs_path = argv[0], argv[1], int(argv[2]), Path(argv[3])
    texts = fresh_captions(data, n, images)
    index = Index.open(path)
    if argv[4:] == ["--refs-only"]:
        refs = json.loads(refs_path.read_text()) if refs_path.exists() else {}
        for i, t in enumerate(texts):
            if t not in refs:
                refs[t] = [h.id for h in index.search(text=t, k=10, mode="exhaustive", candidates=0)]
                refs_path.write_text(json.dumps(refs))
                print(f"# reference {i + 1}/{len(texts)}", file=sys.stderr, flush=True)
        return
    refs = json.loads(refs_path.read_text())
    for label in argv[4:]:
        mode, options = parse_mode(label)
        index.search(text="a dog", k=10, mode=mode, **options)  # loads the structures (the ANN graph)
        total, enc, search, agree = [], [], [], []
        for t in texts:
            t0 = time.perf_counter()
            hits = index.search(text=t, k=10, mode=mode, **options)
            total.append((time.perf_counter() - t0) * 1000)
            enc.append(hits.timings["encode_ms"])
            search.append(hits.timings["search_ms"])
            agree.append(len(set(refs[t]) & {h.id for h in hits}) / max(1, len(refs[t])))
        print(json.dumps({"mode": label, "queries": len(texts), "p50_ms": round(float(np.median(total)), 2),
                          "p95_ms": round(float(np.percentile(total, 95)), 2),
                          "encode_p50_ms": round(float(np.median(enc)), 2),
                          "search_p50_ms": round(float(np.median(search)), 2),
                          "search_p95_ms": round(float(np.percentile(search, 95)), 2),
                          "agreement_at_10": round(float(np.mean(agree)), 4),
                          **{k: round(v) for k, v in memory().items()}}), flush=True)
    index.close()


if __name__ == "__main__":
    main(sys.argv[1:])
