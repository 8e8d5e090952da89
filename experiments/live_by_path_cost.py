"""What an indexing run's "live rows by path" costs on a large catalog: a dict of records against LiveByPath.

``finegrain index`` on an existing index compares every file against the catalog's live rows. It used to
build ``{path: ImageRecord}`` for every live row (the dict form, rebuilt here as the old
``Catalog.live_by_path`` did); it now builds :class:`finegrain.store.records.LiveByPath`. For each form, in
its own process: build seconds, the RSS it adds (after giving freed heap back), and the seconds to look up
every indexed path (the dict: ``get`` per path; LiveByPath: one ``indexed_rows`` call). One JSON line each.

Usage::

    python -m experiments.live_by_path_cost INDEX_FOLDER
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from finegrain.store.catalog import Catalog
from finegrain.store.pages import release_free_heap


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(index: str, form: str) -> dict:
    catalog = Catalog(index)
    before = rss_mib()
    start = time.perf_counter()
    if form == "dict":
        live = {r.path: r for r in catalog.images(None) if r.status != "removed"}
        release_free_heap()
    else:
        live = catalog.live_by_path()
    build = time.perf_counter() - start
    added = rss_mib() - before
    paths = [p for p in live if live[p].status == "indexed"] if form == "dict" else list(live)
    start = time.perf_counter()
    if form == "dict":
        found = sum(live.get(p) is not None for p in paths)
    else:
        found = int((live.indexed_rows(paths) >= 0).sum())
    lookups = time.perf_counter() - start
    return {"form": form, "rows": len(live), "build_s": round(build, 2), "rss_added_mib": round(added),
            "lookups": found, "lookup_s": round(lookups, 2)}


def main() -> None:
    if len(sys.argv) == 3:  # one form, in this process
        print(json.dumps(measure(sys.argv[1], sys.argv[2])), flush=True)
        return
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for form in ("dict", "live"):
        subprocess.run([sys.executable, "-m", "experiments.live_by_path_cost", sys.argv[1], form], check=True)


if __name__ == "__main__":
    main()
