"""`finegrain shards`: a refused set leaves nothing behind, a refused --add leaves the set as it was."""

from __future__ import annotations

import pytest
from fgcli import fg, one_line_error  # tests/ is on sys.path

from finegrain import Index


def _one_line_error(proc, code: int = 2) -> str:
    return one_line_error(proc, code)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two empty indexes with the default encoder and one whose encoder differs (its scores cannot be merged)."""
    root = tmp_path_factory.mktemp("shardscli")
    for name in ("a.fg", "b.fg", "v2.fg"):
        Index.create(root / name).close()
    with Index.open(root / "v2.fg") as v2:
        v2.catalog.set_meta("encoder", "clip:somewhere-else")
    return root


def test_a_refused_set_creates_nothing_and_a_retry_works(members, tmp_path):
    bad = tmp_path / "bad.set"
    line = _one_line_error(fg("shards", members / "a.fg", members / "v2.fg", "--out", bad))
    assert "use different encoders" in line and "v2.fg" in line
    assert not bad.exists()

    bad2 = tmp_path / "bad2.set"
    line = _one_line_error(fg("shards", members / "a.fg", tmp_path / "nothere.fg", "--out", bad2))
    assert "nothere.fg" in line and not bad2.exists()

    dup = tmp_path / "dup.set"
    assert "listed twice" in _one_line_error(fg("shards", members / "a.fg", members / "a.fg", "--out", dup))
    assert not dup.exists()

    bad.mkdir()  # an existing empty folder is not touched either on a refusal
    _one_line_error(fg("shards", members / "v2.fg", members / "b.fg", "--out", bad))
    assert list(bad.iterdir()) == []

    made = fg("shards", members / "a.fg", members / "b.fg", "--out", bad)  # the corrected retry
    assert made.returncode == 0, made.stderr
    assert "2 shards" in made.stdout and (bad / "shards.json").is_file()


def test_add_to_a_missing_set_is_a_one_line_error(members, tmp_path):
    missing = tmp_path / "bad3.set"
    line = _one_line_error(fg("shards", members / "a.fg", "--add", "--out", missing))
    assert line == f"error: no shard set at {missing} (drop --add to create one)"
    assert not missing.exists()
    missing.mkdir()  # a folder without a manifest: the same answer, and no lock file left in it
    assert "no shard set at" in _one_line_error(fg("shards", members / "a.fg", "--add", "--out", missing))
    assert list(missing.iterdir()) == []


def test_a_refused_add_leaves_the_set_as_it_was(members, tmp_path):
    sset = tmp_path / "photos.set"
    assert fg("shards", members / "a.fg", "--out", sset).returncode == 0
    manifest = (sset / "shards.json").read_bytes()
    for args, reason in (((members / "v2.fg",), "cannot be merged"),
                         ((members / "b.fg", tmp_path / "nothere.fg"), "nothere.fg"),
                         ((members / "a.fg",), "already a shard")):
        assert reason in _one_line_error(fg("shards", *args, "--add", "--out", sset))
        assert (sset / "shards.json").read_bytes() == manifest
    assert not (sset / "shards.json.tmp").exists()
    added = fg("shards", members / "b.fg", "--add", "--out", sset)
    assert added.returncode == 0, added.stderr
    assert "2 shards" in added.stdout
