"""The command line, run as a user would (a subprocess per command)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fgcli import fg as fg_in_process  # noqa: E402  (tests/ is on sys.path)


def fg(*args, check=True, process=False):
    """``finegrain ARGS`` in-process, or as a real ``python -m finegrain`` process with ``process=True``."""
    proc = (subprocess.run([sys.executable, "-m", "finegrain", *map(str, args)], capture_output=True, text=True,
                           timeout=600) if process else fg_in_process(*args))
    if check and proc.returncode != 0:
        raise AssertionError(f"finegrain {args} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, photos_dir):
    index = tmp_path_factory.mktemp("cli") / "index"
    proc = fg("index", photos_dir, "--index", index, "--json")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["indexed"] == 6 and report["failed"] == 0
    return index


def test_index_search_info(cli_index, photos_dir):
    # a real `python -m finegrain` process for one text and one image search; the other tests run in-process
    proc = fg("search", "--index", cli_index, "--text", "a cat", "-k", "3", "--json", process=True)
    out = json.loads(proc.stdout)
    assert len(out["results"]) == 3 and {"id", "path", "score", "rank"} <= set(out["results"][0])
    proc = fg("search", "--index", cli_index, "--image", photos_dir / "coins.jpg", "-k", "1", "--json", process=True)
    assert json.loads(proc.stdout)["results"][0]["path"].endswith("coins.jpg")
    info = json.loads(fg("info", "--index", cli_index, "--json").stdout)
    assert info["images"] == 6 and info["failed"] == 0 and info["encoder"] == "effnet-minilm"
    assert info["bytes_on_disk"] > 0
    assert "rank" in fg("search", "--index", cli_index, "--text", "coffee").stdout


def test_cli_errors_are_clear(cli_index, tmp_path):
    proc = fg("search", "--index", cli_index, check=False)
    assert proc.returncode == 2 and "exactly one" in proc.stderr
    proc = fg("search", "--index", tmp_path / "nope", "--text", "x", check=False)
    assert proc.returncode == 1 and "no finegrain index" in proc.stderr
    proc = fg("search", "--index", cli_index, "--text", "   ", check=False)
    assert proc.returncode == 2 and "empty" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_strict_exit_code(tmp_path, photos_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes((photos_dir / "coffee.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    proc = fg("index", folder, "--index", tmp_path / "i1", check=False)
    assert proc.returncode == 0 and "warning" in proc.stderr and "broken.jpg" in proc.stdout
    proc = fg("index", folder, "--index", tmp_path / "i2", "--strict", check=False)
    assert proc.returncode == 2
