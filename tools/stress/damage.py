"""Damaged index files: each case applied to a copy of a real index, then `finegrain check` and search run on it.

Every case must be (1) detected by ``finegrain check`` (exit 1, a line naming
the problem) and (2) never give a search answer computed from the damaged
chunk: either the search is refused with a one-line error, or (after
``finegrain check --repair [--drop-damaged]``) it answers from what is left,
and a ``finegrain index`` re-run restores the full answer.

    python -m tools.stress.damage --json                  # every case on a fresh 6-image index
    python -m tools.stress.damage --subprocess            # each command a real process (slower)
    python -m tools.stress.damage --index IDX --photos DIR --cases owner_swap,bit_flip

The cases are plain functions (``CASES``) that tests reuse
(``tests/test_integrity.py``). Exits 1 when any case is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------- helpers
def chunks(index: Path, field: str = "global") -> list[str]:
    """The catalog's chunks of ``field``, oldest first."""
    with sqlite3.connect(index / "finegrain.sqlite") as db:
        return [r[0] for r in db.execute("SELECT name FROM chunks WHERE field = ? ORDER BY created, name", (field,))]


def chunk_file(index: Path, name: str, kind: str = "vectors", field: str = "global") -> Path:
    suffix = ".npy" if kind == "vectors" else f".{kind}.npy"
    return index / "vectors" / field / f"{name}{suffix}"


def data_offset(path: Path) -> int:
    """Where the array data of a ``.npy`` file starts (after its header)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh)
        return fh.tell()


def patch_array(path: Path, change: Callable[[np.ndarray], None]) -> None:
    """Change a ``.npy`` file's data in place, header untouched (what a disk or a hand edit could do)."""
    arr = np.load(path, allow_pickle=False)
    change(arr)
    offset = data_offset(path)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.ascontiguousarray(arr).tobytes())


def patch_header(path: Path, old: bytes, new: bytes) -> None:
    """Replace bytes of a ``.npy`` header with bytes of the same length (the file keeps its size)."""
    assert len(old) == len(new)
    raw = path.read_bytes()
    head = data_offset(path)
    assert old in raw[:head], (old, raw[:head])
    path.write_bytes(raw[:head].replace(old, new, 1) + raw[head:])


def forget_checksums(index: Path) -> None:
    """Make the index look written by a finegrain without checksums (the columns stay, empty)."""
    with sqlite3.connect(index / "finegrain.sqlite") as db:
        db.execute("UPDATE chunks SET checksum = NULL")


def ids_by_stem(index: Path) -> dict[str, int]:
    with sqlite3.connect(index / "finegrain.sqlite") as db:
        return {Path(p).stem: i for i, p in db.execute("SELECT id, path FROM images WHERE status = 'indexed'")}


def owner_chunk(index: Path, image_id: int, field: str = "global") -> tuple[str, int]:
    """The chunk of ``field`` holding ``image_id``'s row, and the row."""
    for name in chunks(index, field):
        owners = np.load(chunk_file(index, name, "owner", field))
        rows = np.flatnonzero(owners == image_id)
        if len(rows):
            return name, int(rows[0])
    raise KeyError(image_id)


# --------------------------------------------------------------------------- cases
# Each case damages ``index`` (a copy) and returns a short description. ``target`` is the image whose row it hits.
def owner_swap(index: Path, target: int, other: int) -> str:
    """One row of a chunk's .owner.npy changed to another live image's id (the issue: id 11 answered as 12)."""
    name, row = owner_chunk(index, target)
    patch_array(chunk_file(index, name, "owner"), lambda a: a.__setitem__(row, other))
    return f"owner row of image {target} set to {other} in chunk {name}"


def owner_unknown(index: Path, target: int, other: int) -> str:
    """One owner id changed to an id no image ever had."""
    name, row = owner_chunk(index, target)
    patch_array(chunk_file(index, name, "owner"), lambda a: a.__setitem__(row, 10_000 + other))
    return f"owner row of image {target} set to an unknown id in chunk {name}"


def dtype_f2(index: Path, target: int, other: int) -> str:
    """The vectors header's dtype ``<f4`` changed to ``<f2`` (the issue: every search returned [])."""
    name, _ = owner_chunk(index, target)
    patch_header(chunk_file(index, name), b"'<f4'", b"'<f2'")
    return f"dtype <f4 -> <f2 in the header of chunk {name}"


def dtype_big_endian(index: Path, target: int, other: int) -> str:
    """The vectors header's dtype ``<f4`` changed to ``>f4``: same size, every value byte-swapped."""
    name, _ = owner_chunk(index, target)
    patch_header(chunk_file(index, name), b"'<f4'", b"'>f4'")
    return f"dtype <f4 -> >f4 in the header of chunk {name}"


def shape_swap(index: Path, target: int, other: int) -> str:
    """The vectors header's shape changed to the same number of values in another shape."""
    name, _ = owner_chunk(index, target)
    path = chunk_file(index, name)
    n, d = np.load(path, mmap_mode="r").shape
    if d % 2:
        raise ValueError("needs an even dimension")
    old = f"({n}, {d})".encode()
    new = f"({n * 2}, {d // 2})".encode()
    raw = path.read_bytes()
    head = data_offset(path)
    header = raw[:head].replace(old, new, 1)
    # keep the header length: numpy pads headers with spaces before the final newline
    diff = len(header) - head
    if diff > 0:
        header = header.replace(b" " * diff + b"\n", b"\n", 1)
    else:
        header = header.replace(b"\n", b" " * -diff + b"\n", 1)
    assert len(header) == head
    path.write_bytes(header + raw[head:])
    return f"shape ({n}, {d}) -> ({n * 2}, {d // 2}) in chunk {name}"


def bit_flip(index: Path, target: int, other: int) -> str:
    """One bit flipped in the middle of ``target``'s vector (the top exponent bit: a small value becomes huge)."""
    name, row = owner_chunk(index, target)
    path = chunk_file(index, name)
    d = np.load(path, mmap_mode="r").shape[1]
    pos = data_offset(path) + (row * d + d // 2) * 4 + 3
    with open(path, "r+b") as fh:
        fh.seek(pos)
        byte = fh.read(1)[0]
        fh.seek(pos)
        fh.write(bytes([byte ^ 0x40]))
    return f"one bit flipped in image {target}'s vector in chunk {name}"


def nan_in_vector(index: Path, target: int, other: int) -> str:
    """NaN written into ``target``'s vector."""
    name, row = owner_chunk(index, target)
    patch_array(chunk_file(index, name), lambda a: a.__setitem__((row, 0), np.nan))
    return f"NaN in image {target}'s vector in chunk {name}"


def inf_in_vector(index: Path, target: int, other: int) -> str:
    """+inf written into ``target``'s vector (an inner product with it is inf: it would rank first)."""
    name, row = owner_chunk(index, target)
    patch_array(chunk_file(index, name), lambda a: a.__setitem__((row, 3), np.inf))
    return f"inf in image {target}'s vector in chunk {name}"


def truncated(index: Path, target: int, other: int) -> str:
    name, _ = owner_chunk(index, target)
    path = chunk_file(index, name)
    path.write_bytes(path.read_bytes()[:-100])
    return f"chunk {name} truncated by 100 bytes"


def bad_ann_cache(index: Path, target: int, other: int) -> str:
    """A garbage ANN cache for the current generation (rebuilt by --repair)."""
    with sqlite3.connect(index / "finegrain.sqlite") as db:
        gen = json.loads(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
    (index / "ann").mkdir(exist_ok=True)
    (index / "ann" / f"global-{gen}.faiss").write_bytes(b"IxHF" + os.urandom(200))
    return "garbage ann/global-<generation>.faiss"


#: Cases run with checksums only: a flipped bit only a checksum can see (an older index without checksums cannot
#: be checked for it); a bad cache file has no checksum either way.
UNDETECTABLE_WITHOUT_CHECKSUMS = ("bit_flip", "bad_ann_cache")

#: Every case: name -> function(index, target image id, another image id) -> description.
CASES: dict[str, Callable[[Path, int, int], str]] = {
    "owner_swap": owner_swap, "owner_unknown": owner_unknown, "dtype_f2": dtype_f2,
    "dtype_big_endian": dtype_big_endian, "shape_swap": shape_swap, "bit_flip": bit_flip,
    "nan": nan_in_vector, "inf": inf_in_vector, "truncated": truncated, "bad_ann_cache": bad_ann_cache,
}


# ------------------------------------------------------------------------ the script
IN_PROCESS = True  # --subprocess: each command in its own `python -m finegrain` (slow on a loaded machine)


def fg(*args: object, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a finegrain command: in this process through the same typer app (default), or as a real process."""
    if IN_PROCESS:
        from typer.testing import CliRunner

        from finegrain.cli import app

        res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
        stderr = res.stderr
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            import traceback

            stderr += "Traceback\n" + "".join(traceback.format_exception(res.exception))
        return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, stderr)
    env = {**os.environ, "COLUMNS": "400", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "finegrain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def one_line(proc: subprocess.CompletedProcess) -> bool:
    lines = proc.stderr.strip().splitlines()
    return "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error:")


def run_case(case: str, base: Path, photos: Path, work: Path, checksums: bool = True) -> dict:
    """Damage a copy of ``base``; check, search, repair, re-index; returns what happened and any violation."""
    idx = work / f"{case}-{'v' if checksums else 'u'}"
    shutil.copytree(base, idx)
    if not checksums:
        forget_checksums(idx)
    ids = ids_by_stem(idx)
    stems = sorted(ids)
    target, other = ids[stems[1]], ids[stems[2]]
    query = photos / f"{stems[1]}.jpg"
    out: dict = {"case": case, "checksums": checksums, "damage": CASES[case](idx, target, other), "violations": []}
    bad = out["violations"]

    def top(proc: subprocess.CompletedProcess) -> list:
        return [(r["id"], round(r["score"], 4)) for r in json.loads(proc.stdout)["results"]]

    check = fg("check", "--index", idx)
    out["check"] = {"rc": check.returncode, "lines": check.stdout.strip().splitlines()[:4]}
    if check.returncode != 1 or "damaged:" not in check.stdout or "Traceback" in check.stderr:
        bad.append("finegrain check did not report the damage")
    search = fg("search", "--index", idx, "--image", query, "-k", "3", "--json")
    out["search_after_check"] = search.returncode
    if search.returncode == 0:
        hits = top(search)
        out["hits"] = hits
        if case != "bad_ann_cache":
            bad.append(f"search answered from a damaged index: {hits}")
        elif not hits or hits[0][0] != target:
            bad.append(f"search after a bad cache gave {hits}")
    elif not one_line(search):
        bad.append(f"search failed without a one-line error: {search.stderr[-300:]}")
    repair = fg("check", "--index", idx, "--repair", "--drop-damaged")
    out["repair"] = {"rc": repair.returncode, "lines": repair.stdout.strip().splitlines()[-3:]}
    if "Traceback" in repair.stderr + repair.stdout:
        bad.append("traceback from --repair")
    if repair.returncode == 0:
        again = fg("check", "--index", idx)
        if again.returncode != 0:
            bad.append(f"check after a successful repair still fails: {again.stdout[-300:]}")
        search = fg("search", "--index", idx, "--image", query, "-k", "3", "--json")
        if search.returncode != 0:
            bad.append(f"search after repair failed: {search.stderr[-300:]}")
        elif any(h[0] == target for h in top(search)) and case != "bad_ann_cache":
            bad.append("search after dropping the damaged image still returns it")
        reindex = fg("index", photos, "--index", idx, "--json")
        search = fg("search", "--index", idx, "--image", query, "-k", "1", "--json")
        # the image is back, and finds itself first (a grayscale JPEG scores 0.997 against itself)
        ok = (reindex.returncode == 0 and search.returncode == 0
              and json.loads(search.stdout)["results"][0]["path"] == str(query) and top(search)[0][1] > 0.99)
        out["reindexed"] = ok
        if not ok:
            bad.append(f"re-index after repair did not restore the image: index rc {reindex.returncode} "
                       f"{reindex.stdout[-200:]} {reindex.stderr[-200:]}; search rc {search.returncode} "
                       f"{search.stdout[-300:]} {search.stderr[-200:]}")
        elif fg("check", "--index", idx).returncode != 0:
            bad.append("check after re-index fails")
    else:  # what cannot be repaired must be said, in one line per thing
        if "cannot repair:" not in repair.stdout:
            bad.append("--repair failed without saying what cannot be repaired")
    shutil.rmtree(idx, ignore_errors=True)
    return out


def build_base(work: Path) -> tuple[Path, Path]:
    """A 6-image index of the scikit-image photos, committed 2 images at a time (3 global chunks)."""
    from PIL import Image
    from skimage import data

    photos = work / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.jpg", quality=90)
    sys.path.insert(0, str(ROOT / "src"))
    from finegrain import Index

    index = Index.create(work / "base")
    index.add([photos], commit_every=2)
    index.close()
    return work / "base", photos


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, help="an existing index to damage copies of (default: a fresh one)")
    ap.add_argument("--photos", type=Path, help="the folder that index was built from (its image queries)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    ap.add_argument("--no-unverified", action="store_true", help="skip the runs without checksums (old indexes)")
    ap.add_argument("--subprocess", action="store_true", help="run each command as a real `python -m finegrain`")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    global IN_PROCESS
    IN_PROCESS = not args.subprocess
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fg-damage-") as tmp:
        work = Path(tmp)
        base, photos = (args.index, args.photos) if args.index else build_base(work)
        results = []
        for case in args.cases.split(","):
            # Without a checksum nothing can tell a flipped bit from a real value: those runs are not made.
            unverified = not args.no_unverified and case not in UNDETECTABLE_WITHOUT_CHECKSUMS
            for checksums in (True, False) if unverified else (True,):
                results.append(run_case(case, base, photos, work, checksums))
                if not args.json:
                    r = results[-1]
                    print(f"{case:18s} checksums={checksums!s:5s} check rc={r['check']['rc']} "
                          f"search rc={r['search_after_check']} repair rc={r['repair']['rc']} "
                          f"violations={r['violations']}", flush=True)
    summary = {"cases": len(results), "violations": sum(len(r["violations"]) for r in results),
               "seconds": round(time.time() - started, 1), "results": results}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['cases']} runs, {summary['violations']} violation(s) in {summary['seconds']} s")
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
