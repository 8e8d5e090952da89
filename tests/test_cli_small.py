"""Smaller defects of issue 20 (#11), each reproduced through the real command line or library first."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain import Index

sys.path.insert(0, str(Path(__file__).parent))
from reliability_helpers import png_claiming
from fgcli import fg as fg_in_process  # noqa: E402  (tests/ is on sys.path)


def fg(*args, timeout=300):
    return fg_in_process(*args)  # in-process: the same command-line code without an interpreter start


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, photos_dir):
    root = tmp_path_factory.mktemp("small")
    index = Index.create(root / "index")
    index.add([photos_dir])
    index.close()
    return root / "index"


def test_bbox_forms_and_non_finite_values(small_index, photos_dir):
    query = photos_dir / "chelsea.jpg"
    results = []
    for form in (["--bbox", "40", "30", "200", "180"],  # the README's form
                 ["--bbox", "40", "--bbox", "30", "--bbox", "200", "--bbox", "180"],
                 ["--bbox", "40,30,200,180"]):
        proc = fg("search", "--index", small_index, "--image", query, *form, "-k", "3", "--json")
        assert proc.returncode == 0, (form, proc.stderr)
        results.append([(r["id"], round(r["score"], 5)) for r in json.loads(proc.stdout)["results"]])
    assert results[0] == results[1] == results[2]
    full = fg("search", "--index", small_index, "--image", query, "-k", "3", "--json")
    assert [(r["id"], round(r["score"], 5)) for r in json.loads(full.stdout)["results"]] != results[0]
    # the refusals in-process (the same argv parsing by click; no interpreter start per case)
    from typer.testing import CliRunner

    from finegrain.cli import app

    for bad in (["--bbox", "nan", "30", "200", "180"], ["--bbox", "40", "30", "inf", "180"],
                ["--bbox", "40", "30", "200"], ["--bbox", "1", "2", "3", "4", "5"]):
        res = CliRunner().invoke(app, ["search", "--index", str(small_index), "--image", str(query), *bad])
        assert res.exit_code == 2, (bad, res.output)
        assert "four finite numbers" in res.output and "Traceback" not in res.output, bad
    res = CliRunner().invoke(app, ["search", "--index", str(small_index), "--text", "a cat", "--kk", "3"])
    assert res.exit_code == 2 and "unexpected arguments" in res.output


def test_library_refuses_nan_boxes(small_index, photos_dir):
    index = Index.open(small_index)
    for box in ((float("nan"), 0, 100, 100), (0, 0, float("inf"), 100)):
        with pytest.raises(ValueError, match="not a finite number"):
            index.search(image=photos_dir / "chelsea.jpg", bbox=box)


def test_bad_ann_kind_leaves_nothing_behind(tmp_path, photos_dir):
    target = tmp_path / "new-index"
    proc = fg("index", photos_dir, "--index", target, "--ann", "bogus")
    assert proc.returncode == 2 and "unknown index kind 'bogus'" in proc.stderr and "Traceback" not in proc.stderr
    assert not target.exists()
    proc = fg("index", photos_dir / "coins.jpg", "--index", target, "--json")  # the same folder works afterwards
    assert proc.returncode == 0 and json.loads(proc.stdout)["indexed"] == 1


def test_remove_same_id_twice_reports_one(small_index, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(small_index, copy)
    proc = fg("remove", "1", "1", "--index", copy)
    assert proc.returncode == 0 and "removed 1 image(s)" in proc.stdout
    assert len(Index.open(copy)) == 5


def test_bomb_message_quotes_finegrains_limit(tmp_path):
    from finegrain.images import ImageLoadError, load_image

    for w, h in ((100_000, 100_000), (9_000, 8_000)):  # over Pillow's bomb limit; over finegrain's 64 MP only
        path = tmp_path / f"bomb{w}.png"
        path.write_bytes(png_claiming(w, h))
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        assert "64,000,000" in str(info.value) and "178956970" not in str(info.value), str(info.value)


def test_known_but_unsupported_image_files_are_reported(tmp_path, photos_dir):
    from finegrain.images import IMAGE_SUFFIXES

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(photos_dir / "coins.jpg", folder)
    for name in ("web.jxl", "raw.dng", "scan.JP2", "notes.txt"):
        (folder / name).write_bytes(b"\0" * 64)
    index = Index.create(tmp_path / "index")
    report = index.add([folder])
    failed = {Path(p).name: reason for p, reason in report.failed}
    assert report.indexed == 1 and set(failed) == {"web.jxl", "raw.dng", "scan.JP2"}
    assert failed["web.jxl"].startswith("unsupported image format .jxl")
    # HEIC is decoded (pillow-heif, a core dependency): a non-image .heic is a decode failure, not "unsupported"
    (folder / "phone.heic").write_bytes(b"\0" * 64)
    failed = {Path(p).name: reason for p, reason in index.add([folder]).failed}
    assert failed["phone.heic"] == "not a recognised image format"
    if ".avif" in IMAGE_SUFFIXES:  # this Pillow decodes AVIF: a real one is indexed
        Image.open(photos_dir / "coffee.jpg").save(folder / "coffee.avif")
        assert index.add([folder]).indexed == 1


def test_killed_first_run_keeps_what_commit_every_committed(tmp_path, photos_dir):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sources = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(photos_dir.iterdir())]
    for i in range(150):
        src = sources[i % len(sources)]
        y, x = rng.integers(0, src.shape[0] - 96), rng.integers(0, src.shape[1] - 96)
        Image.fromarray(src[y:y + 96, x:x + 96]).save(folder / f"img{i:03d}.jpg", quality=85)
    idx = tmp_path / "index"
    proc = subprocess.Popen([sys.executable, "-m", "finegrain", "index", str(folder), "--index", str(idx),
                             "--commit-every", "25", "--batch-size", "8", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while True:  # kill it as soon as the first commit is visible
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first commit"
            if (idx / "finegrain.sqlite").exists():
                try:
                    with sqlite3.connect(f"file:{idx / 'finegrain.sqlite'}?mode=ro", uri=True, timeout=5) as db:
                        if db.execute("SELECT count(*) FROM images WHERE status = 'indexed'").fetchone()[0]:
                            break
                except sqlite3.OperationalError:
                    pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    kept = len(Index.open(idx))
    assert kept > 0 and kept % 25 == 0 and kept < 150, kept
    proc = fg("index", folder, "--index", idx, "--json")
    report = json.loads(proc.stdout)
    assert report["unchanged"] == kept and report["indexed"] == 150 - kept
    assert len(Index.open(idx)) == 150


def test_commit_clock_commits_a_slow_run(tmp_path, photos_dir):
    from finegrain.indexer import Indexer

    index = Index.create(tmp_path / "index")
    with index.writer() as w:
        Indexer(w, batch_size=2, commit_every=10**6, commit_seconds=0).run([photos_dir], show_progress=False)
    assert len(index.catalog.chunks("global")) == 6  # one commit per image with a zero-second clock
