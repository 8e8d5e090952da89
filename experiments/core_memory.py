"""RSS cost of opening a segmented index and running one hierarchical query (issue "One retrieval core", goal 3).

Usage: python -m experiments.core_memory INDEX_DIR [--build N] [--compact]
Loads the encoder first (one query on a tiny throw-away index), then opens INDEX_DIR and runs one
hierarchical query, and prints the RSS growth against the on-disk bytes of the index's vector files.
--build N creates INDEX_DIR from the first N Flickr8k dev images with segments 4,9,16,25,36 (if absent).
--compact compacts the index first (one chunk per field, segments level-major).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "flickr8k"


def rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def dir_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    from finegrain.decompose.segments import SegmentConfig
    from finegrain.index import Index

    target = Path(sys.argv[1])
    args = sys.argv[2:]
    if "--build" in args and not (target / "finegrain.sqlite").exists():
        n = int(args[args.index("--build") + 1])
        names = (DATA / "splits" / "dev.txt").read_text().split()[:n]
        idx = Index.create(target, segments=SegmentConfig(levels=(4, 9, 16, 25, 36)))
        idx.add([str(DATA / "images" / x) for x in names], show_progress=True)
        idx.close()
    if "--compact" in args:
        idx = Index.open(target)
        idx.compact()
        idx.close()
    with tempfile.TemporaryDirectory() as tmp:  # the encoder loaded, as a running service has it
        small = Index.create(Path(tmp) / "s")
        img = sorted((DATA / "images").iterdir())[0]
        small.add([str(img)])
        encoder = small.encoder
        small.search(text="warm up", k=1)
        small.search(image=str(img), k=1)
        encoder.encode_texts(["a dog runs", "a dog", "runs"])
        before = rss()
        # (the release before the retrieval core had no encoder= on open: it shared the encoder by attribute)
        index = Index.open(target, encoder=encoder) if "encoder" in Index.open.__code__.co_varnames else Index.open(target)
        if not hasattr(index, "snapshot"):
            index._encoder = encoder
        opened = rss()
        hits = index.search(text="a black dog running on the grass", k=10, mode="hierarchical")
        after = rss()
    vec_bytes = dir_bytes(target / "vectors")
    out = {"images": len(index), "vector_bytes": vec_bytes, "rss_open_bytes": opened - before,
           "rss_growth_bytes": after - before, "ratio": round((after - before) / vec_bytes, 3),
           "chunks": len(index.catalog.chunks()), "top": [h.id for h in hits][:3]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
