"""Stopping `finegrain index` early: the first Ctrl-C/SIGTERM commits what is encoded and exits cleanly."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain import indexer
from finegrain.index import Index
from finegrain.stopping import stop_on_signals

from fgcli import fg


def _folder(tmp_path: Path, photos_dir: Path, n: int) -> Path:
    """``n`` distinct images: random crops of the sample photos."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(photos_dir.glob("*.jpg"))]
    for i in range(n):
        arr = photos[i % len(photos)]
        y, x = rng.integers(0, arr.shape[0] // 2), rng.integers(0, arr.shape[1] // 2)
        Image.fromarray(arr[y:y + 160, x:x + 160]).save(folder / f"{i:03d}.jpg")
    return folder


def test_stop_commits_encoded_batches_and_the_next_run_finishes(tmp_path, photos_dir, monkeypatch):
    folder = _folder(tmp_path, photos_dir, 14)
    idx = Index.create(tmp_path / "x.fg")
    stop = threading.Event()
    encode = indexer.Pending.encode

    def encode_then_stop(self, encoder):  # the "signal" arrives while the first batch is encoded
        failed = encode(self, encoder)
        stop.set()
        return failed

    monkeypatch.setattr(indexer.Pending, "encode", encode_then_stop)
    report = idx.add([folder], batch_size=4, commit_every=100, stop=stop)
    assert report.stopped and report.indexed == 4 and len(idx) == 4
    assert report.as_dict()["stopped"] is True
    monkeypatch.setattr(indexer.Pending, "encode", encode)
    report = idx.add([folder], batch_size=4)
    assert not report.stopped and report.indexed == 10 and report.unchanged == 4 and len(idx) == 14


def test_stop_on_signals_first_sets_second_interrupts():
    seen: list[int] = []
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(seen.append) as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.is_set() and seen == [signal.SIGTERM] and stop.exit_code() == 143
        with pytest.raises(KeyboardInterrupt):  # SIGTERM again: a test runner may have SIGINT ignored
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def _committed(index: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index / 'finegrain.sqlite'}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM images WHERE status = 'indexed'").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_ctrl_c_stops_a_real_index_run_cleanly(tmp_path, photos_dir):
    sig = signal.SIGINT
    folder = _folder(tmp_path, photos_dir, 60)
    index = tmp_path / "x.fg"
    cmd = [sys.executable, "-m", "finegrain", "index", str(folder), "--index", str(index), "--batch-size", "2",
           "--commit-every", "2", "--json"]
    # restore SIGINT's default in the child: a test runner started in the background may ignore it
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while _committed(index) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "the run ended before it could be stopped"
    child.send_signal(sig)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 128 + sig, (child.returncode, err)
    assert "Traceback" not in err and "stopping" in err and "run the same command" in err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["stopped"] is True and 2 <= report["indexed"] < 60
    assert _committed(index) == report["indexed"]
    check = fg("check", "--index", index)
    assert check.returncode == 0, check.stdout + check.stderr
    rerun = fg(*cmd[3:])
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["indexed"] == 60 - report["indexed"]
    assert _committed(index) == 60
