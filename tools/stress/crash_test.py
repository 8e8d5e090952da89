"""Crash test: SIGKILL index writers at random moments, then check nothing committed was lost or half-written.

Phases (each in a separate process that is killed with SIGKILL):

* ``index``: ``Index.add`` (what ``finegrain index`` runs) over a folder of
  generated photos, with small commits (``commit_every`` 1 to 5, so that kills
  land between, inside and after commits, and in the compaction that follows
  a run with more than 32 chunks). The writer journals every commit: the
  paths of the images *before* the commit starts and again *after* it
  returned. After each kill the index is re-opened and must: open; hold each
  path once; hold one global vector per image, equal to the reference
  vector of that file; contain every journalled "done" commit completely and
  every in-flight commit completely or not at all (no partial commit); hold
  nothing that no commit wrote. The next run resumes; the final run must
  report ``indexed`` = the rest and ``unchanged`` = what was there.
* ``tune``: ``finegrain tune`` writing its chosen configuration into a
  segmented index; after a kill the index opens with the same images and
  vectors, and its search settings are either absent or complete.
* ``compress``: ``finegrain compress --method pca`` when this tree has that
  command (else reported as skipped); same checks, plus the stored
  projection is either absent or complete.
* ``compact`` (``--compact-kills``): ``finegrain compact`` on a segmented
  index of one-image commits with every fifth image removed; the live images
  and their vectors must be unchanged after every kill.
* ``ray`` (``--ray-kills``): the index phase with ``engine="ray"``: Ray
  workers write shard chunks, and the driver's merge step commits them
  through the writer; the same journal and checks.
* ``watch`` (``--watch-kills``): the index phase run by ``finegrain watch``
  (polling observer): half the files are there at start (its start-up scan),
  the other half arrive one by one while it runs (its event commits); the
  same journal and checks, and the finished index holds every file.

After every kill, when the tree has ``finegrain.store.integrity``, the full
``finegrain check`` runs on the index too (every byte against its checksum,
every owner, NaN/inf): a half-written chunk a commit lists is a violation.

While the writers run, reader threads re-open the index (``Index.open``) and
refresh a long-lived one (``Index.refresh``) in a loop and check every state
they see: images and vectors agree, and every commit is all-or-nothing.

    python -m tools.stress.crash_test --seeds 5 --kills-per-seed 10 --json
    python -m tools.stress.crash_test --seeds 1 --kills-per-seed 3 --images 24     # quick
    python -m tools.stress.crash_test --kills-per-seed 0 --no-tune --src ../other-tree/src   # compress only, another tree
    python -m tools.stress.crash_test --seeds 3 --kills-per-seed 20 --no-tune --compress-kills 15 \
        --compact-kills 20 --ray-kills 5 --json                                              # issue 20's 100 kills

Prints one JSON object (``--json``) or a summary; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"  # the finegrain sources the writers run (--src: another tree's, e.g. a branch with `compress`)

# The writer: Index.add with every commit journalled before and after (fsync'd), so the checker
# knows which commits finished, which one was in flight, and which images each held.
WRITER = r"""
import json, os, sys
from finegrain import Index
from finegrain.store.writer import Writer
index_dir, folder, journal_path, commit_every = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
engine = sys.argv[5] if len(sys.argv) > 5 else "local"
journal = open(journal_path, "a")
original = Writer.commit
counter = [0]
def note(entry):
    journal.write(json.dumps(entry) + "\n"); journal.flush(); os.fsync(journal.fileno())
def journalled(writer, images, *args, **kwargs):
    counter[0] += 1
    gid = f"{os.getpid()}-{counter[0]}"
    paths = [im.path for im in images]
    note({"begin": gid, "paths": paths})
    n = original(writer, images, *args, **kwargs)
    note({"done": gid})
    return n
Writer.commit = journalled
if engine == "watch":  # `finegrain watch`: start-up scan, then files arriving one by one from the staging folder
    import threading, time
    from finegrain.watch import Watcher
    staging = folder + ".incoming"
    index = Index.open(index_dir)
    before = len(index)
    stop = threading.Event()
    def feed():
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
            time.sleep(0.05)
        total = len(os.listdir(folder))
        with Index.open(index_dir) as counter_index:
            while not stop.is_set():
                counter_index.refresh()
                if len(counter_index) >= total:
                    stop.set()
                time.sleep(0.1)
    threading.Thread(target=feed, daemon=True).start()
    Watcher(index, [folder], poll=True, interval=0.1, quiet=0.2, settle=0.1, max_batch=commit_every,
            batch_size=2).run(stop)
    index.refresh()
    print(json.dumps({"indexed": len(index) - before, "unchanged": before}))
else:
    report = Index.open(index_dir).add([folder], batch_size=2, commit_every=commit_every, engine=engine)
    print(json.dumps(report.as_dict()))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def make_photos(folder: Path, photos_dir: Path, n: int, seed: int) -> list[str]:
    """``n`` distinct small JPEG crops of the photos in ``photos_dir``; returns their absolute paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted(photos_dir.iterdir())]
    for i in range(n):
        img = sources[i % len(sources)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.4, 0.8)), int(h * rng.uniform(0.4, 0.8))
        x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        img.crop((x, y, x + cw, y + ch)).resize((160, 120)).save(folder / f"img_{i:04d}.jpg", quality=85)
    return sorted(str(p) for p in folder.iterdir())


def read_journal(path: Path) -> dict[str, dict]:
    """Commit groups by id: ``{"paths": set, "done": bool}`` (a torn last line is ignored)."""
    groups: dict[str, dict] = {}
    if not path.exists():
        return groups
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "begin" in entry:
            groups[entry["begin"]] = {"paths": set(entry["paths"]), "done": False}
        elif "done" in entry and entry["done"] in groups:
            groups[entry["done"]]["done"] = True
    return groups


def check_state(index, groups: dict[str, dict] | None, reference: dict[str, np.ndarray] | None, strict_done: bool) -> list[str]:
    """Violations of the crash-safety contract in one opened ``index`` (empty list when it holds).

    ``groups`` are the journalled commits (None: no journal, only the
    images/vectors agreement is checked); ``reference`` the expected vector
    of each path; ``strict_done``: a commit journalled as done must be there.
    """
    problems: list[str] = []
    paths = [r.path for r in index.records.values()]
    present = set(paths)
    if len(present) != len(paths):
        problems.append(f"duplicate paths: {len(paths) - len(present)}")
    owners = index.global_rows.owners
    if len(owners) != len(index.records) or set(int(o) for o in owners) != set(index.records):
        problems.append(f"{len(index.records)} images but {len(owners)} global rows / different owners")
    if groups is None:
        return problems
    written = set().union(*(g["paths"] for g in groups.values())) if groups else set()
    stray = present - written
    if stray:
        problems.append(f"{len(stray)} images no commit wrote, e.g. {sorted(stray)[:2]}")
    for gid, g in groups.items():
        have = len(g["paths"] & present)
        if g["done"] and strict_done and have != len(g["paths"]):
            problems.append(f"finished commit {gid} lost {len(g['paths']) - have} of {len(g['paths'])} images")
        elif 0 < have < len(g["paths"]):
            problems.append(f"commit {gid} is partial: {have} of {len(g['paths'])} images")
    problems += integrity_problems(index.path)
    if reference is not None and not problems:
        row_of = {int(o): i for i, o in enumerate(owners)}
        for rec in index.records.values():
            vec = np.asarray(index.global_rows.vectors[row_of[rec.id]])
            cos = float(vec @ reference[rec.path])
            if cos < 0.999:
                problems.append(f"vector of {os.path.basename(rec.path)} differs from the reference (cos {cos:.4f})")
                break
    return problems


def integrity_problems(index_dir: Path) -> list[str]:
    """What `finegrain check` finds in the committed state (every byte against its checksum, owners, NaN), if
    this tree has it: a half-written chunk that a commit lists would show here."""
    try:
        from finegrain.store import integrity
    except ImportError:
        return []
    report = integrity.check_index(index_dir, record=False)
    return [f"finegrain check: {p.message}" for p in report.problems if p.kind != "cache"]


class Readers:
    """Threads re-opening (and refreshing) the index while a writer runs; every state seen is checked."""

    def __init__(self, index_dir: Path, journal: Path | None, extra_check: Callable | None = None):
        self.index_dir, self.journal, self.extra_check = index_dir, journal, extra_check
        self.stop = threading.Event()
        self.checks = 0
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._open_loop, daemon=True),
                        threading.Thread(target=self._refresh_loop, daemon=True)]

    def __enter__(self) -> "Readers":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _check(self, index) -> None:
        groups = read_journal(self.journal) if self.journal else None  # read after the snapshot: every commit it shows is journalled
        problems = check_state(index, groups, None, strict_done=False)
        if self.extra_check is not None:
            problems += self.extra_check(index)
        self.checks += 1
        self.violations.extend(f"reader: {p}" for p in problems)

    def _open_loop(self) -> None:
        from finegrain import Index

        while not self.stop.is_set():
            try:
                with Index.open(self.index_dir) as index:
                    self._check(index)
            except Exception as exc:  # noqa: BLE001 - any failure to open a committed index is a finding
                self.errors.append(f"open: {type(exc).__name__}: {exc}")
            time.sleep(0.01)

    def _refresh_loop(self) -> None:
        from finegrain import Index

        index = None
        while not self.stop.is_set():
            try:
                if index is None:
                    index = Index.open(self.index_dir)
                    self._check(index)
                elif index.refresh():
                    self._check(index)
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"refresh: {type(exc).__name__}: {exc}")
                index = None
            time.sleep(0.01)
        if index is not None:
            index.close()


def _add_reader_stats(out: dict, readers: "Readers") -> None:
    """Fold one run's concurrent-reader counts into the totals."""
    out["reader_checks"] += readers.checks
    out["reader_violations"] += readers.violations
    out["reader_errors"] += readers.errors[:5]


def _kill_after(proc: subprocess.Popen, rng: random.Random, journal: Path | None, expected_s: float,
                commits_left: int = 1) -> bool:
    """SIGKILL ``proc`` at a random moment; returns False if it finished first.

    Without a journal: at a uniform random time over ``expected_s``. With
    one: 15% during start-up (uniform over the first 6 s), 45% once a random
    number of commits (1 to ``commits_left``) has started plus 0-50 ms (in or
    just after a commit), 40% at a uniform random time over the expected
    remaining work after the first commit started (``expected_s``).
    """

    def wait(cond: Callable[[], bool], deadline: float) -> None:
        while proc.poll() is None and time.monotonic() < deadline and not cond():
            time.sleep(0.003)

    def started() -> int:
        return journal.read_text().count('"begin"') if journal.exists() else 0

    if journal is None:
        wait(lambda: False, time.monotonic() + rng.uniform(0, expected_s))
    else:
        base = started()
        r = rng.random()
        if r < 0.15:
            wait(lambda: False, time.monotonic() + rng.uniform(0, 6.0))
        elif r < 0.6:
            target = base + rng.randint(1, max(1, commits_left))
            wait(lambda: started() >= target, time.monotonic() + 300)
            wait(lambda: False, time.monotonic() + rng.uniform(0, 0.05))
        else:
            wait(lambda: started() > base, time.monotonic() + 300)
            wait(lambda: False, time.monotonic() + rng.uniform(0, expected_s))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def index_phase(work: Path, photos_dir: Path, seed: int, kills: int, n_images: int, commit_every: int | None,
                readers: bool, log: Callable, engine: str = "local") -> dict:
    """Kill ``Index.add`` ``kills`` times (starting fresh indexes as needed); check after every kill."""
    from finegrain import Index

    rng = random.Random(seed)
    folder = work / f"photos-{seed}"
    files = make_photos(folder, photos_dir, n_images, seed)
    ref_index = Index.create(work / f"reference-{seed}")
    ref_index.add([folder], batch_size=8)
    reference = {r.path: np.asarray(ref_index.global_rows.vectors[i])
                 for i, r in enumerate(ref_index.records[int(o)] for o in ref_index.global_rows.owners)}
    ref_index.close()
    out = {"seed": seed, "engine": engine, "kills": 0, "finished_before_kill": 0, "rounds": 0, "violations": [],
           "reader_checks": 0,
           "reader_violations": [], "reader_errors": [], "kill_points": []}
    round_no = 0
    while out["kills"] < kills:
        round_no += 1
        every = commit_every or rng.choice([1, 2, 3, 5])
        index_dir = work / f"index-{seed}-{round_no}"
        journal = work / f"journal-{seed}-{round_no}.jsonl"
        Index.create(index_dir).close()
        if engine == "watch":  # half the files arrive while the watch runs
            incoming = Path(str(folder) + ".incoming")
            incoming.mkdir(exist_ok=True)
            for f in files[len(files) // 2:]:
                os.replace(f, incoming / Path(f).name)
        while True:
            with Index.open(index_dir) as index:
                before = len(index)
            commits_left = -(-(n_images - before) // every)
            expected = 0.2 * (n_images - before) + {"ray": 15.0, "watch": 3.0}.get(engine, 0.5)  # start-up
            proc = subprocess.Popen([sys.executable, "-c", WRITER, str(index_dir), str(folder), str(journal),
                                     str(every), engine],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True)
            want_kill = out["kills"] < kills
            rd = Readers(index_dir, journal) if readers else None
            if rd:
                rd.__enter__()
            try:
                killed = _kill_after(proc, rng, journal, expected, commits_left) if want_kill else False
                stdout, stderr = proc.communicate()
            finally:
                if rd:
                    rd.__exit__()
                    _add_reader_stats(out, rd)
            with Index.open(index_dir) as index:
                groups = read_journal(journal)
                problems = check_state(index, groups, reference, strict_done=True)
                now = len(index)
            out["violations"] += [f"seed {seed} round {round_no}: {p}" for p in problems]
            if killed:
                out["kills"] += 1
                open_commit = sum(not g["done"] for g in groups.values())
                out["kill_points"].append({"images_before": before, "images_after": now, "in_flight": open_commit})
                log(f"seed {seed} round {round_no} (commit_every {every}): kill {out['kills']}: {before} -> {now} "
                    f"images{' (a commit was in flight)' if open_commit else ''}{'; VIOLATION' if problems else ''}")
                continue
            if proc.returncode != 0:
                out["violations"].append(f"seed {seed}: writer failed: {stderr.strip()[-500:]}")
                break
            report = json.loads(stdout.strip().splitlines()[-1])
            if want_kill:
                out["finished_before_kill"] += 1
            if (report["indexed"], report["unchanged"]) != (n_images - before, before):
                out["violations"].append(f"seed {seed}: final run indexed {report['indexed']} and kept "
                                         f"{report['unchanged']}, expected {n_images - before} and {before}")
            with Index.open(index_dir) as index:
                paths = sorted(r.path for r in index.records.values())
            if paths != files:
                out["violations"].append(f"seed {seed}: finished index holds {len(paths)} images "
                                         f"({len(set(paths))} distinct), expected {len(files)}")
            break
        out["rounds"] = round_no
        shutil.rmtree(index_dir, ignore_errors=True)
    return out


def _has_command(name: str) -> bool:
    result = subprocess.run([sys.executable, "-m", "finegrain.cli", name, "--help"], capture_output=True, env=_env())
    return result.returncode == 0


def settings_phase(work: Path, photos_dir: Path, command: str, kills: int, seed: int, readers: bool,
                   log: Callable) -> dict:
    """Kill ``finegrain tune`` or ``finegrain compress`` writing into a segmented index ``kills`` times."""
    from finegrain import Index
    from finegrain.decompose.segments import SegmentConfig

    out = {"command": command, "kills": 0, "finished_before_kill": 0, "violations": [], "reader_checks": 0,
           "reader_violations": [], "reader_errors": []}
    if not _has_command(command):
        out["skipped"] = f"this tree has no `finegrain {command}` command"
        return out
    rng = random.Random(seed)
    folder = work / f"{command}-photos"
    files = make_photos(folder, photos_dir, 24, seed)
    queries = work / f"{command}-queries.tsv"
    subjects = {"astronaut": "an astronaut", "camera": "a man with a camera", "chelsea": "a cat", "coffee": "a cup of coffee",
                "coins": "some coins", "rocket": "a rocket"}
    names = sorted(p.stem for p in photos_dir.iterdir())
    queries.write_text("".join(f"{subjects.get(names[i % len(names)], 'a photo')} number {i}\t{os.path.basename(f)}\n"
                               for i, f in enumerate(files)))
    master = work / f"{command}-master"
    index = Index.create(master, segments=SegmentConfig(levels=(4, 9)))
    if command == "compact":  # many chunks per field, and removed images for the compaction to drop
        index.add([folder], batch_size=2, commit_every=1)
        index.remove(sorted(index.records)[::5])
    else:
        index.add([folder], batch_size=8)
    index.close()
    args = {"tune": ["--queries", str(queries), "--sample", "24", "--json"],
            "compress": ["--method", "pca", "--dim", "16", "--json"], "compact": []}[command]

    def run(index_dir: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "finegrain.cli", command, "--index", str(index_dir), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True)

    def snapshot(index) -> tuple:
        order = np.argsort(index.global_rows.owners)
        return (sorted(index.records), np.asarray(index.global_rows.vectors)[order].round(5).tobytes())

    def settings(index) -> dict:
        """Every stored setting but the generation counter (tune and compress write theirs there)."""
        rows = index.catalog.db.execute("SELECT key, value FROM meta WHERE key != 'generation'").fetchall()
        return dict(rows)

    with Index.open(master) as index:
        base_state, base_settings = snapshot(index), settings(index)
    # One complete run on a copy: how long it takes, and what it writes.
    full = work / f"{command}-full"
    shutil.copytree(master, full)
    t0 = time.monotonic()
    proc = run(full)
    stdout, stderr = proc.communicate()
    duration = time.monotonic() - t0
    if proc.returncode != 0:
        out["violations"].append(f"complete {command} run failed: {stderr.strip()[-800:]}")
        return out
    with Index.open(full) as index:
        final_settings = settings(index)
    out["complete_run_s"] = round(duration, 1)

    def consistent(index) -> list[str]:
        problems = []
        if snapshot(index) != base_state and command in ("tune", "compact"):
            problems.append("images or vectors changed")
        elif sorted(index.records) != base_state[0]:
            problems.append("image ids changed")
        problems += _settings_problems(settings(index), base_settings, final_settings, index.path)
        problems += integrity_problems(index.path)
        return problems

    target = work / f"{command}-victim"
    shutil.copytree(master, target)
    attempts = 0
    while out["kills"] < kills and attempts < 3 * kills:
        attempts += 1
        proc = run(target)
        rd = Readers(target, None, consistent) if readers else None
        if rd:
            rd.__enter__()
        try:
            killed = _kill_after(proc, rng, None, duration * 1.1)
            proc.communicate()
        finally:
            if rd:
                rd.__exit__()
                _add_reader_stats(out, rd)
        try:
            with Index.open(target) as index:
                problems = consistent(index)
        except Exception as exc:  # noqa: BLE001
            problems = [f"does not open: {type(exc).__name__}: {exc}"]
        out["violations"] += [f"{command}: {p}" for p in problems]
        if killed:
            out["kills"] += 1
            log(f"{command}: kill {out['kills']}{'; VIOLATION ' + str(problems) if problems else ''}")
        else:
            out["finished_before_kill"] += 1
            shutil.rmtree(target)
            shutil.copytree(master, target)  # start again from the state before the command
    return out


def _settings_problems(now: dict, before: dict, after: dict, index_dir: Path) -> list[str]:
    """Settings after a kill must be the old ones or a complete new set.

    A complete run may record run-specific values (a fitted file's name, a
    fit time), so a new value need not equal the reference run's: it must
    be valid JSON with the same keys, and any file it names must exist.
    """
    problems = []
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    new_keys = {k for k in changed if now.get(k) != before.get(k)}
    for key in set(now) | set(before):
        if key not in changed and now.get(key) != before.get(key):
            problems.append(f"setting {key!r} changed, though a complete run leaves it")
    if new_keys and new_keys != changed:
        problems.append(f"settings half-updated: {sorted(new_keys)} of {sorted(changed)}")
    for key in new_keys:
        try:
            value, reference = json.loads(now[key]), json.loads(after[key])
        except (KeyError, TypeError, ValueError):
            problems.append(f"setting {key!r} is missing or not JSON: {now.get(key)!r}")
            continue
        if isinstance(reference, dict) and (not isinstance(value, dict) or set(value) != set(reference)):
            problems.append(f"setting {key!r} is incomplete: {value!r}")
        elif isinstance(value, dict) and isinstance(value.get("file"), str) and not any(index_dir.rglob(value["file"])):
            problems.append(f"setting {key!r} names a file that is not there: {value['file']}")
    return problems


def run(work: Path, photos_dir: Path, seeds: list[int], kills_per_seed: int, n_images: int = 40,
        commit_every: int | None = None, readers: bool = True, tune: bool = True, compress: bool = True,
        settings_kills: int = 5, log: Callable = print, compact_kills: int = 0, compress_kills: int | None = None,
        ray_kills: int = 0, watch_kills: int = 0) -> dict:
    """All phases; returns totals (``kills``, ``violations``, ``reader_checks``, ``reader_violations``) and per-phase detail."""
    t0 = time.monotonic()
    phases = [index_phase(work, photos_dir, s, kills_per_seed, n_images, commit_every, readers, log) for s in seeds
              if kills_per_seed]
    if ray_kills:  # the Ray engine: workers write shard chunks, the driver's merge step commits them
        phases.append(index_phase(work, photos_dir, 1000, ray_kills, n_images, commit_every, readers, log, "ray"))
    if watch_kills:  # `finegrain watch`: its start-up scan and its event commits
        phases.append(index_phase(work, photos_dir, 2000, watch_kills, n_images, commit_every, readers, log, "watch"))
    if tune and settings_kills:
        phases.append(settings_phase(work, photos_dir, "tune", settings_kills, 100, readers, log))
    compress_kills = settings_kills if compress_kills is None else compress_kills
    if compress and compress_kills:
        phases.append(settings_phase(work, photos_dir, "compress", compress_kills, 200, readers, log))
    if compact_kills:
        phases.append(settings_phase(work, photos_dir, "compact", compact_kills, 300, readers, log))
    return {
        "kills": sum(p["kills"] for p in phases),
        "index_kills": sum(p["kills"] for p in phases if "seed" in p),
        "violations": [v for p in phases for v in p["violations"]],
        "reader_checks": sum(p["reader_checks"] for p in phases),
        "reader_violations": [v for p in phases for v in p["reader_violations"]],
        "reader_errors": [v for p in phases for v in p["reader_errors"]],
        "kill_moments": _kill_moments(phases, n_images),
        "seconds": round(time.monotonic() - t0, 1),
        "phases": phases,
    }


def _kill_moments(phases: list[dict], n_images: int) -> dict:
    """Where the index kills landed: before any commit, with the index partly built, or after the last commit."""
    points = [p for ph in phases for p in ph.get("kill_points", [])]
    return {"before_first_commit": sum(p["images_after"] == 0 for p in points),
            "partial_index": sum(0 < p["images_after"] < n_images for p in points),
            "after_last_commit": sum(p["images_after"] == n_images for p in points)}


def _photos(folder: Path) -> Path:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg", quality=90)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="Number of seeds (0, 1, ...).")
    parser.add_argument("--kills-per-seed", type=int, default=10)
    parser.add_argument("--images", type=int, default=40, help="Generated photos per seed.")
    parser.add_argument("--settings-kills", type=int, default=5, help="Kills of tune and of compress.")
    parser.add_argument("--compress-kills", type=int, default=None, help="Kills of compress (default: --settings-kills).")
    parser.add_argument("--compact-kills", type=int, default=0, help="Kills of `finegrain compact` on an index of "
                        "one-image chunks with removed images.")
    parser.add_argument("--ray-kills", type=int, default=0, help="Kills of `Index.add(engine='ray')` (its merge step "
                        "commits the workers' shards).")
    parser.add_argument("--watch-kills", type=int, default=0, help="Kills of `finegrain watch` (start-up scan and "
                        "commits of files arriving while it runs).")
    parser.add_argument("--no-readers", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="Work folder (default: a temporary one, deleted).")
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--no-compress", action="store_true")
    parser.add_argument("--src", type=Path, default=None,
                        help="Run another tree's finegrain (its src/ folder), e.g. a branch that has `finegrain compress`.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    global SRC
    SRC = (args.src or SRC).resolve()
    sys.path.insert(0, str(SRC))
    with tempfile.TemporaryDirectory(prefix="finegrain-crash-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        photos = _photos(work / "sources")
        result = run(work, photos, list(range(args.seeds)), args.kills_per_seed, args.images, None,
                     not args.no_readers, tune=not args.no_tune, compress=not args.no_compress,
                     settings_kills=args.settings_kills, compact_kills=args.compact_kills,
                     compress_kills=args.compress_kills, ray_kills=args.ray_kills, watch_kills=args.watch_kills,
                     log=(lambda *a: print(*a, file=sys.stderr, flush=True)))
    for p in result["phases"]:
        p.pop("kill_points", None)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['kills']} SIGKILLs ({result['index_kills']} of index runs) in {result['seconds']} s: "
              f"{len(result['violations'])} violations, {result['reader_checks']} reader checks with "
              f"{len(result['reader_violations'])} violations and {len(result['reader_errors'])} errors")
        for v in result["violations"] + result["reader_violations"] + result["reader_errors"]:
            print("  ", v)
    sys.exit(1 if result["violations"] or result["reader_violations"] or result["reader_errors"] else 0)


if __name__ == "__main__":
    main()
