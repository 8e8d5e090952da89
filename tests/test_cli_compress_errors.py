"""`finegrain compress` (global projection and --field storage): every failure of the write is one line, right code."""

from __future__ import annotations

import errno
import shutil
import sqlite3
import subprocess
import sys

import pytest
from random_index_helpers import random_segmented_index
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.index import Index

FORMS = {"projection": ["--method", "pca", "--dim", "4"], "field": ["--field", "global", "--quantize", "int8"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("cliquant") / "idx"
    random_segmented_index(path, 40, seed=3).close()
    return path


@pytest.fixture
def index(base, tmp_path):
    shutil.copytree(base, tmp_path / "idx")
    return tmp_path / "idx"


def _one_line(index, form: str, code: int) -> str:
    result = CliRunner().invoke(app, ["compress", "--index", str(index), *FORMS[form]], env={"COLUMNS": "400"})
    lines = result.output.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("raised,code,says", [
    (OSError(errno.ENOSPC, "No space left on device"), 1, "no space left on the device of"),
    (OSError(errno.EIO, "Input/output error"), 1, "cannot write to the index at"),
    (sqlite3.DatabaseError("file is not a database"), 1, "is damaged or unreadable: file is not a database"),
    (ValueError("the fit went wrong"), 2, "error: the fit went wrong"),
    (TypeError("a bad parameter"), 2, "error: a bad parameter"),
])
def test_write_failures_are_one_line(index, monkeypatch, form, raised, code, says):
    def fail(self, *args, **kwargs):
        raise raised

    monkeypatch.setattr(Index, "compress", fail)
    assert says in _one_line(index, form, code)


@pytest.mark.parametrize("form", FORMS)
def test_a_locked_index_is_one_line(index, form):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, time\n"
        f"fh = open({str(index / '.lock')!r}, 'a+'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert "another process is writing" in _one_line(index, form, 1)
    finally:
        holder.kill()
        holder.wait()
    with Index.open(index) as idx:
        assert idx.info()["storage"] is None and idx.info()["projection"] is None


def test_a_fit_warning_is_one_line_without_source(index):
    # 40 images cannot give 48 decorrelated unit-variance dims: AE-SVC warns, and the user sees the warning only.
    proc = subprocess.run([sys.executable, "-m", "finegrain", "compress", "--index", str(index), "--method", "aesvc",
                           "--dim", "48", "--steps", "3"], capture_output=True, text=True, env={"COLUMNS": "400",
                           "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["warning: AESVC: 40 samples cannot give 48 decorrelated unit-variance dimensions; fit on more "
                     "samples or lower n_components"], proc.stderr
