"""One-line errors instead of tracebacks (issue 20, #6): a locked index, a self-contradicting catalog, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finegrain import Index
from fgcli import fg as fg_in_process  # noqa: E402  (tests/ is on sys.path)
from fgcli import one_line_error

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def fg(*args, timeout=300):
    return fg_in_process(*args)  # in-process: the same command-line code without an interpreter start


def _one_line_error(proc, code: int = 1) -> str:
    return one_line_error(proc, code)


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory, photos_dir):
    root = tmp_path_factory.mktemp("clierr")
    for folder, names in (("a", ("astronaut", "coffee")), ("b", ("chelsea", "rocket", "coins"))):
        (root / folder).mkdir()
        for name in names:
            shutil.copy(photos_dir / f"{name}.jpg", root / folder)
    index = Index.create(root / "base")
    index.add([root / "a"])
    index.close()
    return root


def test_remove_and_compact_while_another_process_writes(two_folders, tmp_path):
    idx = tmp_path / "index"
    shutil.copytree(two_folders / "base", idx)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"fh = open({str(idx / '.lock')!r}, 'a+'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (("remove", "1"), ("compact",)):
            line = _one_line_error(fg(*args, "--index", idx))
            assert "another process is writing" in line
    finally:
        holder.kill()
        holder.wait()
    assert len(Index.open(idx)) == 2


def test_catalog_contradicting_itself_gives_one_line(two_folders, tmp_path):
    idx = tmp_path / "index"
    shutil.copytree(two_folders / "base", idx)
    with sqlite3.connect(idx / "finegrain.sqlite") as db:  # the id sequence behind the table (a restored catalog)
        db.execute("UPDATE sqlite_sequence SET seq = 0 WHERE name = 'images'")
    line = _one_line_error(fg("index", two_folders / "b", "--index", idx))
    assert "damaged" in line and "UNIQUE constraint failed" in line
    assert len(Index.open(idx)) == 2


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB tmpfs mounted for this test (needs root)."""
    if not IS_ROOT:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    st = os.statvfs(mnt)
    filler = mnt / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_disk_full_during_np_save_or_sqlite_commit(two_folders, small_fs, monkeypatch):
    """The disk fills up while `finegrain index` runs: one line, exit 1, and the index keeps its last commit."""
    from finegrain.cli import app
    from finegrain.store import writer

    real_write_chunk = writer.write_chunk
    state: dict = {}

    def fill_then_write(*args, **kwargs):  # the disk fills up (another process, say) just before the commit
        if "leave" in state:
            state["filler"] = _fill(small_fs, state.pop("leave"))
        return real_write_chunk(*args, **kwargs)

    monkeypatch.setattr(writer, "write_chunk", fill_then_write)
    runner = CliRunner()
    seen = set()
    for leave in (0, 4096, 8192, 12288, 16384, 20480, 24576, 32768, 65536):
        idx = small_fs / "index"
        shutil.copytree(two_folders / "base", idx)
        state["leave"] = leave
        result = runner.invoke(app, ["index", str(two_folders / "b"), "--index", str(idx), "--json"],
                               env={"COLUMNS": "400"})
        if "filler" in state:
            state.pop("filler").unlink()  # space again: the index must be whole
        if result.exit_code == 0:
            seen.add("ok")
        else:
            assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: no space left"), result.output
            seen.add("vectors" if "writing vector files" in lines[0] else "catalog")
        reopened = Index.open(idx)
        assert len(reopened) in (2, 5) and (len(reopened) == 5) == (result.exit_code == 0)
        assert len(reopened.search(text="a cat", k=10)) == len(reopened)
        reopened.close()
        rerun = runner.invoke(app, ["index", str(two_folders / "b"), "--index", str(idx), "--json"])
        assert rerun.exit_code == 0, rerun.output
        assert len(Index.open(idx)) == 5
        shutil.rmtree(idx)
    assert seen == {"ok", "vectors", "catalog"}, seen


# ------------------------------------------------------------------ #8 terminal escapes in file names
EVIL = "evil\x1b]0;PWNED\x07\x1b[2J[red]x[bold]\u202e.jpg"  # retitle, clear screen, rich markup, RTL override
EVIL_BAD = "bad\x1b[31m\x9b6n.jpg"  # not an image: reported in the skipped table


def _no_controls(text: str) -> None:
    assert not any(c in text for c in ("\x1b", "\x07", "\x9b", "\u202e")), repr(text[:500])


def test_file_names_with_escapes_are_escaped_on_the_terminal_and_exact_in_json(tmp_path, photos_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos_dir / "chelsea.jpg", folder / EVIL)
    (folder / EVIL_BAD).write_text("not a picture")
    idx = tmp_path / "index"
    proc = fg("index", folder, "--index", idx)
    assert proc.returncode == 0, proc.stderr
    _no_controls(proc.stdout + proc.stderr)
    assert "bad\\x1b[31m\\x9b6n.jpg" in proc.stdout.replace("\n", "")
    proc = fg("info", "--index", idx)
    _no_controls(proc.stdout)
    assert "\\x1b" in proc.stdout
    proc = fg("search", "--index", idx, "--text", "a cat", "-k", "1")
    _no_controls(proc.stdout)
    assert "[red]x[bold]" in proc.stdout.replace("\n", "") and "\\x1b]0;PWNED\\x07" in proc.stdout.replace("\n", "")
    proc = fg("search", "--index", idx, "--text", "a cat", "-k", "1", "--json")
    _no_controls(proc.stdout)
    assert json.loads(proc.stdout)["results"][0]["path"] == str(folder / EVIL)
    info = json.loads(fg("info", "--index", idx, "--json").stdout)
    assert [f["path"] for f in info["failures"]] == [str(folder / EVIL_BAD)]


def test_a_user_slip_is_one_line_that_names_what_was_wrong(two_folders, tmp_path):
    # A misspelt folder: refused before anything is made (not an empty index and exit 0).
    line = _one_line_error(fg("index", tmp_path / "nope", two_folders / "a", "--index", tmp_path / "new"), 2)
    assert "no such file or folder" in line and "nope" in line and "nothing was indexed" in line
    assert not (tmp_path / "new").exists()
    # ... nor does it empty an existing index with --remove-missing.
    idx = tmp_path / "copy"
    shutil.copytree(two_folders / "base", idx)
    _one_line_error(fg("index", tmp_path / "a-typo", "--index", idx, "--remove-missing"), 2)
    assert len(Index.open(idx)) == 2
    # An unknown encoder: the registry's message, not a quoted KeyError, and nothing created.
    line = _one_line_error(fg("index", two_folders / "a", "--index", tmp_path / "enc", "--encoder", "effnet-minlm"), 2)
    assert line.startswith("error: unknown encoder 'effnet-minlm'; available:") and not line.endswith('"'), line
    assert not (tmp_path / "enc" / "finegrain.sqlite").exists()
    # A query image that cannot be read: the message names it (a query may hold several images).
    coffee = "@" + str(two_folders / "a" / "coffee.jpg")
    for args, named in ((["--image", tmp_path / "gone.jpg"], "gone.jpg: file not found"),
                        ([coffee, "-", "@" + str(tmp_path)], f"{tmp_path}: is a directory")):
        line = _one_line_error(fg("search", "--index", idx, *args), 2)
        assert named in line, line


def test_one_index_commands_on_a_shard_set_say_so(two_folders, tmp_path):
    from finegrain.shards import ShardedIndex

    shutil.copytree(two_folders / "base", tmp_path / "one")
    ShardedIndex.create(tmp_path / "set", [tmp_path / "one"]).close()
    for args in (("prepare",), ("compress", "--method", "pca", "--dim", "4"), ("remove", "1")):
        line = _one_line_error(fg(*args, "--index", tmp_path / "set"), 2)
        assert "is a shard set, and this command works on one index" in line, (args, line)
    assert fg("info", "--index", tmp_path / "set").returncode == 0  # the commands that take a set still do
