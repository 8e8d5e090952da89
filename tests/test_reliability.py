"""Reliability: hostile image folders, corrupt indexes through the CLI, SIGKILLed writers, concurrent readers.

The long versions (50+ kills, 10,000 generated files) are scripts in bench/;
these are their short forms for the default suite.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain import Index
from finegrain.images import load_image

sys.path.insert(0, str(Path(__file__).parent))
from reliability_helpers import BAD, GOOD_EXTRA, LONG_NAME, NON_UTF8_SHOWN, make_hostile_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``finegrain ARGS`` in a fresh interpreter, with a strict UTF-8 locale (as on a typical terminal)."""
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONUTF8": "0", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONIOENCODING", None)
    return subprocess.run([sys.executable, "-m", "finegrain.cli", *args], capture_output=True, text=True,
                          errors="replace", env=env, timeout=timeout)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, photos_dir) -> tuple[Path, dict[str, str]]:
    """The scikit-image photos plus every kind of unusual and bad file the issue lists, in one folder."""
    folder = tmp_path_factory.mktemp("hostile") / "photos"
    shutil.copytree(photos_dir, folder)
    kinds = {p.name: "good" for p in photos_dir.iterdir()}
    kinds.update(make_hostile_folder(folder, photos_dir / "coffee.jpg"))
    if IS_ROOT:
        kinds["unreadable.jpg"] = "good"  # root reads a mode-000 file; covered by test_unreadable_file_is_skipped
    yield folder, kinds
    (folder / "unreadable.jpg").chmod(0o600)


@pytest.fixture(scope="module")
def hostile_run(hostile, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    folder, _ = hostile
    index_dir = tmp_path_factory.mktemp("hostile-index") / "index"
    return index_dir, _cli("index", str(folder), "--index", str(index_dir))


def test_hostile_folder_every_good_image_indexed_every_bad_one_reported(hostile, hostile_run):
    folder, kinds = hostile
    index_dir, run = hostile_run
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    good = {n for n, k in kinds.items() if k == "good"}
    bad = {n for n, k in kinds.items() if k == "bad"}
    assert set(GOOD_EXTRA) <= good and LONG_NAME in good and set(BAD) - {"unreadable.jpg"} <= bad
    assert f"warning: {len(bad)} file(s) skipped" in " ".join(run.stderr.split())
    assert f"indexed {len(good)}," in run.stdout and f"failed {len(bad)}" in run.stdout

    index = Index.open(index_dir)
    indexed = {os.path.basename(r.path) for r in index.records.values()}
    assert indexed == good
    info = index.info()
    reasons = {os.path.basename(f["path"]): f["reason"] for f in info["failures"]}
    assert info["failed"] == len(bad) and set(reasons) == bad
    expected = {"empty.jpg": "empty", "truncated.jpg": "truncated", "bomb.png": "decompression bomb",
                "text_as.jpg": "not a recognised image", "html_as.gif": "not a recognised image",
                "broken_link.jpg": "symlink", "loop_a.jpg": "symlink", "loop_b.jpg": "symlink",
                NON_UTF8_SHOWN: "UTF-8", "unreadable.jpg": "ermission denied"}
    for name, words in expected.items():
        if name in bad:
            assert words in reasons[name], (name, reasons[name])
    # The run summary lists every skipped file with its reason (names may be folded over lines).
    summary = "".join(run.stdout.split())
    for name in bad - {NON_UTF8_SHOWN}:
        assert name in summary, name
    assert "latin1_" in summary

    # `finegrain info` (plain and JSON) shows the same failures, and prints them without crashing.
    plain = _cli("info", "--index", str(index_dir))
    assert plain.returncode == 0 and "Traceback" not in plain.stderr, plain.stderr
    assert "bomb.png" in "".join(plain.stdout.split()) and "latin1_" in plain.stdout
    as_json = _cli("info", "--index", str(index_dir), "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["failed"] == len(bad) and {os.path.basename(f["path"]) for f in data["failures"]} == bad


def test_exif_rotated_photos_are_indexed_upright(hostile, hostile_run):
    folder, _ = hostile
    index_dir, _ = hostile_run
    index = Index.open(index_dir)
    by_name = {os.path.basename(r.path): r for r in index.records.values()}
    upright = load_image(folder / "upright.png")
    for name in ("rotated_exif.png", "rotated_exif.jpg"):
        rec = by_name[name]
        assert (rec.width, rec.height) == upright.size, name  # stored size is the upright size
        assert Image.open(folder / name).size == upright.size[::-1]  # while the stored pixels are rotated
    vec = {int(o): index.global_rows.vectors[i] for i, o in enumerate(index.global_rows.owners)}
    same = float(vec[by_name["rotated_exif.png"].id] @ vec[by_name["upright.png"].id])
    assert same > 0.9999, same  # lossless: the very same upright pixels were encoded
    # The JPEG's stored vector is that of its pixels turned upright (not of the pixels as stored).
    from PIL import ImageOps

    jpg = vec[by_name["rotated_exif.jpg"].id]
    raw = Image.open(folder / "rotated_exif.jpg")
    as_stored = Image.fromarray(np.asarray(raw.convert("RGB")))  # no EXIF left: stays sideways
    turned, sideways = index.encoder.encode_images([ImageOps.exif_transpose(raw).convert("RGB"), as_stored])
    assert float(jpg @ turned) > 0.9999 and float(jpg @ sideways) < float(jpg @ turned) - 1e-3


def test_strict_exits_non_zero_and_rerun_keeps_failures(hostile, hostile_run):
    from typer.testing import CliRunner

    from finegrain.cli import app

    folder, kinds = hostile
    index_dir, _ = hostile_run
    n_bad = sum(k == "bad" for k in kinds.values())
    result = CliRunner().invoke(app, ["index", str(folder), "--index", str(index_dir), "--strict", "--json",
                                      "--remove-missing"])
    assert result.exit_code == 2, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["indexed"] == 0 and summary["failed"] == n_bad
    assert summary["removed"] == 0
    # Failures are replaced, not duplicated, and --remove-missing keeps those of files still there
    # (including the non-UTF-8 name, recorded under its printable form).
    assert Index.open(index_dir).info()["failed"] == n_bad


def test_unreadable_file_is_skipped(tmp_path, photos_dir, monkeypatch):
    """A file the process may not read is skipped with 'permission denied' (simulated when running as root)."""
    from finegrain import images

    folder = tmp_path / "p"
    folder.mkdir()
    shutil.copy(photos_dir / "coins.jpg", folder)
    victim = folder / "secret.jpg"
    shutil.copy(photos_dir / "rocket.jpg", victim)
    victim.chmod(0)
    if IS_ROOT:  # root ignores file modes: make open() fail the way it fails for other users
        real_open = os.open

        def guarded_open(path, *args, **kwargs):
            if os.fspath(path) == str(victim):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(images.os, "open", guarded_open)
    index = Index.create(tmp_path / "index")
    report = index.add([folder])
    assert report.indexed == 1 and [(p, r) for p, r in report.failed] == [(str(victim), "permission denied")]


# ------------------------------------------------------------------ corrupt indexes through the CLI
def _tiny_index(tmp_path: Path, photos_dir: Path) -> Path:
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("coins.jpg", "camera.jpg"):
        shutil.copy(photos_dir / name, folder)
    index = Index.create(tmp_path / "index")
    index.add([folder])
    index.close()
    return tmp_path / "index"


def test_corrupt_or_newer_index_gives_a_clear_cli_error(tmp_path, photos_dir):
    from typer.testing import CliRunner

    from finegrain.cli import app

    good = _tiny_index(tmp_path, photos_dir)
    runner = CliRunner()
    cases: dict[str, Path] = {}

    def variant(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(good, dst)
        cases[name] = dst
        return dst

    db = sqlite3.connect(variant("newer") / "finegrain.sqlite")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    db.commit()
    db.close()
    (variant("garbage") / "finegrain.sqlite").write_bytes(b"\x00garbage" * 4096)
    (variant("empty_catalog") / "finegrain.sqlite").write_bytes(b"")
    chunk = next((variant("truncated_chunk") / "vectors" / "global").glob("*[0-9a-f].npy"))
    chunk.write_bytes(chunk.read_bytes()[:100])
    chunk = next((variant("missing_chunk") / "vectors" / "global").glob("*[0-9a-f].npy"))
    chunk.unlink()
    chunk = next((variant("random_chunk") / "vectors" / "global").glob("*[0-9a-f].npy"))
    chunk.write_bytes(os.urandom(4096))
    owner = next((variant("wrong_owner_shape") / "vectors" / "global").glob("*.owner.npy"))
    np.save(owner, np.zeros(7, np.int64))
    db = sqlite3.connect(variant("no_images_table") / "finegrain.sqlite")
    db.execute("DROP TABLE images")
    db.commit()
    db.close()
    db = sqlite3.connect(variant("blob_path") / "finegrain.sqlite")  # a row the record table cannot hold
    db.execute("UPDATE images SET path = X'00ff' WHERE id = (SELECT MIN(id) FROM images WHERE status = 'indexed')")
    db.commit()
    db.close()
    db = sqlite3.connect(variant("text_size") / "finegrain.sqlite")
    db.execute("UPDATE images SET size = 'large' WHERE id = (SELECT MIN(id) FROM images WHERE status = 'indexed')")
    db.commit()
    db.close()
    db = sqlite3.connect(variant("bad_meta") / "finegrain.sqlite")
    db.execute("UPDATE meta SET value = 'not json' WHERE key = 'dim'")
    db.commit()
    db.close()
    for name, path in cases.items():
        for args in (["info", "--index", str(path)], ["search", "--index", str(path), "--text", "a cat"],
                     ["index", str(tmp_path / "two"), "--index", str(path)]):
            result = runner.invoke(app, args)
            assert result.exit_code == 1, (name, args, result.output, result.exception)
            assert "error:" in result.output and "Traceback" not in result.output, (name, result.output)
            assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
                (name, args, repr(result.exception))
        if name == "newer":
            assert "newer than this finegrain supports" in result.output


# ------------------------------------------------------------------ crash safety, short form
def test_sigkilled_index_runs_short(tmp_path, photos_dir):
    """A few SIGKILLs of `finegrain index` at random moments (tools/stress/crash_test.py does 50+)."""
    from tools.stress import crash_test

    result = crash_test.run(tmp_path, photos_dir, seeds=[1], kills_per_seed=3, n_images=12, commit_every=2,
                            readers=True, tune=False, compress=False, log=lambda *a: None)
    assert result["kills"] >= 3 and result["violations"] == [], result["violations"]
    assert result["reader_checks"] > 0 and result["reader_violations"] == [] and result["reader_errors"] == []
