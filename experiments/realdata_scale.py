"""Issue 15, item 5: index a whole real photo folder through `finegrain index` and watch it.

Runs ``finegrain index FOLDER --index OUT ...`` as a child process and samples, every ``--every`` seconds,
the child's resident memory (VmRSS) and the number of images committed (the catalog, read-only). Writes one
JSON line per sample to ``--log`` (appending: a killed run is resumed by running the same command again, as
``finegrain index`` skips what is committed), then prints per tenth of the folder the images/s and the RSS at
its end.

    python -m experiments.realdata_scale FOLDER OUT --log run.jsonl -- --segments 4,9,16,25,36 --objects regions
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from finegrain.images import IMAGE_SUFFIXES


def committed(index: Path) -> int:
    """Images committed so far (0 before the catalog exists)."""
    path = index / "finegrain.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM images WHERE status = 'indexed'").fetchone()[0])
    except sqlite3.Error:
        return -1  # the schema is being written


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


PAUSE_S = 120.0  # a gap between two samples longer than this was a pause, not work (the period is seconds)


def tenths(samples: list[dict], total: int) -> list[dict]:
    """Images/s within each tenth of ``total`` images and the RSS when it ended (samples of every run)."""
    rows, start = [], None
    for i in range(1, 11):
        goal = total * i // 10
        end = next((s for s in samples if s["images"] >= goal), None)
        if end is None:
            break
        first = start or samples[0]
        within = [s for s in samples if first["t"] <= s["t"] <= end["t"]]
        # only time spent running counts: a gap between runs (a resume) or a pause (SIGSTOP of sampler and
        # child: no samples for far longer than the sampling period) is left out
        busy = sum(b["t"] - a["t"] for a, b in zip(samples, samples[1:])
                   if first["t"] <= a["t"] and b["t"] <= end["t"] and b["run"] == a["run"]
                   and b["t"] - a["t"] <= PAUSE_S)
        rows.append({"tenth": i, "images": end["images"], "images_per_s": (end["images"] - first["images"]) / busy
                     if busy else None, "rss_mb": end["rss_mb"],
                     # the end sample falls anywhere in a batch's cycle, so the range within the tenth says more
                     "rss_min_mb": min(s["rss_mb"] for s in within), "rss_max_mb": max(s["rss_mb"] for s in within)})
        start = end
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("index", type=Path)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--every", type=float, default=5.0)
    ap.add_argument("--report-only", action="store_true")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    total = sum(1 for p in args.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not args.report_only:
        run = time.time()
        cmd = [sys.executable, "-m", "finegrain", "index", str(args.folder), "--index", str(args.index), *extra]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with args.log.open("a") as log:
            while True:
                done = child.poll() is not None
                log.write(json.dumps({"run": run, "t": time.time(), "images": committed(args.index),
                                      "rss_mb": rss_mb(child.pid)}) + "\n")
                log.flush()
                if done:
                    break
                time.sleep(args.every)
        print(f"finegrain index exited with {child.returncode}", file=sys.stderr)
    samples = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    samples = [s for s in samples if s["images"] >= 0 and s["rss_mb"] > 0]
    for row in tenths(samples, total):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
