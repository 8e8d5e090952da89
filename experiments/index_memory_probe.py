"""Issue 15, item 5: anonymous memory right after every commit of a fresh index run, and its peak in between.

    python -m experiments.index_memory_probe 600 [OUT.fg]   # the last 600 Flickr8k images, global+segments+objects

Prints one JSON line per commit (commits of 100 images or 60 s). docs/benchmarks.md ("Real-data scale check")
compares commits 88dd2bd (trim after each commit) and a2ca62c (trim + 1 MiB mmap threshold) on the same images.
"""

import json
import shutil
import sys
import threading
import time
from pathlib import Path

from finegrain.decompose.segments import SegmentConfig
from finegrain.index import Index

IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "flickr8k" / "images"


def rss() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) // 1024
    return out


def main() -> None:
    n = int(sys.argv[1])
    files = sorted(IMAGES.rglob("*.jpg"))[-n:]
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "index-memory-probe.fg")
    shutil.rmtree(out, ignore_errors=True)
    idx = Index.create(out, segments=SegmentConfig(levels=(4, 9, 16, 25, 36)), objects="regions")
    peak, done = [0], [0]

    def sampler() -> None:
        while True:
            peak[0] = max(peak[0], rss()["RssAnon"])
            time.sleep(0.5)

    threading.Thread(target=sampler, daemon=True).start()

    def committed(added: int) -> None:  # the memory right after each of the product's commits
        done[0] += added
        print(json.dumps({"images": done[0], **rss(), "anon_peak_since_last": peak[0]}), flush=True)
        peak[0] = 0

    idx.add([str(f) for f in files], commit_every=100, on_commit=committed)


if __name__ == "__main__":
    main()
