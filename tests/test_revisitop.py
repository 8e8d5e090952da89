"""Tests for the revisitop ground-truth loader (finegrain.eval.revisitop)."""

from __future__ import annotations

import builtins
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest

from finegrain.eval.revisitop import (
    RevisitopGnd,
    UnsafePickleError,
    db_image_path,
    find_gnd_file,
    load_gnd,
    query_image_path,
)

DATA = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()
FULL = [DATA / "revisitop" / "gnd_roxford5k.pkl", DATA / "revisitop" / "gnd_rparis6k.pkl"]
MINI_DIR = DATA / "rparis6k-mini"
MINI_PKL = MINI_DIR / "gnd_rparis6k-mini.pkl"
MINI_JSON = MINI_DIR / "gnd_rparis6k-mini.json"

needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared evaluation data not found at {DATA} (../shared/data relative to the repo)"
)


def _check_structure(g: RevisitopGnd) -> None:
    assert isinstance(g, RevisitopGnd)
    assert all(type(x) is str for x in g.imlist + g.qimlist)
    assert len(g.gnd) == len(g.qimlist)
    n = len(g.imlist)
    for entry in g.gnd:
        assert set(entry) == {"bbx", "easy", "hard", "junk"}
        assert entry["bbx"] is None or (len(entry["bbx"]) == 4 and all(type(v) is float for v in entry["bbx"]))
        for key in ("easy", "hard", "junk"):
            assert all(type(i) is int and 0 <= i < n for i in entry[key]), key
        assert entry["easy"] or entry["hard"]


@needs_data
@pytest.mark.parametrize("path", FULL, ids=lambda p: p.name)
def test_full_files(path: Path) -> None:
    g = load_gnd(path)
    _check_structure(g)
    assert len(g.qimlist) == 70
    assert len(g.gnd) == 70
    assert len(g.imlist) in (4993, 6322)


@needs_data
def test_mini_pkl_and_json_identical() -> None:
    a, b = load_gnd(MINI_PKL), load_gnd(MINI_JSON)
    _check_structure(a)
    assert a == b
    assert len(a.imlist) == 238
    # The raw JSON is the same data too.
    raw = json.loads(MINI_JSON.read_text())
    assert a.imlist == raw["imlist"] and a.qimlist == raw["qimlist"]


@needs_data
def test_find_gnd_file_and_image_paths() -> None:
    assert find_gnd_file(MINI_DIR) == MINI_PKL  # pkl preferred over json
    g = load_gnd(find_gnd_file(MINI_DIR))
    assert query_image_path(MINI_DIR, g.qimlist[0]).is_file()
    assert db_image_path(MINI_DIR, g.imlist[0]).is_file()


def test_image_path_helpers(tmp_path: Path) -> None:
    assert query_image_path(tmp_path, "paris_x_1") == tmp_path / "jpg" / "paris_x_1.jpg"
    assert db_image_path(str(tmp_path), "a.b") == tmp_path / "jpg" / "a.b.jpg"


def _write(path: Path, obj: object, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def test_find_gnd_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no gnd_"):
        find_gnd_file(tmp_path)
    (tmp_path / "gnd_a.json").write_text("{}")
    assert find_gnd_file(tmp_path) == tmp_path / "gnd_a.json"
    (tmp_path / "gnd_b.json").write_text("{}")
    with pytest.raises(ValueError, match="several"):
        find_gnd_file(tmp_path)
    _write(tmp_path / "gnd_c.pkl", {})
    assert find_gnd_file(tmp_path) == tmp_path / "gnd_c.pkl"
    _write(tmp_path / "gnd_d.pkl", {})
    with pytest.raises(ValueError, match="several"):
        find_gnd_file(tmp_path)


def test_synthetic_roundtrip_pkl_json(tmp_path: Path) -> None:
    raw = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q"],
        "gnd": [{"bbx": [1, 2, 3.5, 4], "easy": [0], "hard": [2], "junk": [1]}],
    }
    a = load_gnd(_write(tmp_path / "gnd_x.pkl", raw))
    (tmp_path / "gnd_x.json").write_text(json.dumps(raw))
    b = load_gnd(tmp_path / "gnd_x.json")
    assert a == b
    assert a.gnd[0] == {"bbx": [1.0, 2.0, 3.5, 4.0], "easy": [0], "hard": [2], "junk": [1]}


def test_missing_bbx_is_none_and_bad_suffix(tmp_path: Path) -> None:
    raw = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": []}]}
    assert load_gnd(_write(tmp_path / "g.pkl", raw)).gnd[0]["bbx"] is None
    with pytest.raises(ValueError, match="unsupported"):
        load_gnd(tmp_path / "g.txt")


class _SystemPayload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalPayload:
    def __reduce__(self):
        return (builtins.eval, ("1 + 1",))


def test_malicious_os_system_pickle_rejected_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"imlist": [], "qimlist": [], "gnd": [], "x": _SystemPayload(f"touch {marker}")}
    path = _write(tmp_path / "gnd_evil.pkl", payload)
    assert b"system" in path.read_bytes()
    with pytest.raises(UnsafePickleError, match="refusing to unpickle") as info:
        load_gnd(path)
    assert isinstance(info.value, ValueError)
    assert "os.system" in str(info.value) or "posix.system" in str(info.value)
    assert not marker.exists()


def test_builtins_eval_pickle_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "gnd_eval.pkl", _EvalPayload(), protocol=4)
    with pytest.raises(ValueError, match=r"refusing to unpickle.*builtins\.eval"):
        load_gnd(path)
    # Hand-written protocol-0 pickle: GLOBAL builtins.eval, REDUCE on a marker-writing expression.
    marker = tmp_path / "evaluated"
    expr = f"open({str(marker)!r}, 'w').close()"
    path.write_bytes(b"cbuiltins\neval\n(V" + expr.encode() + b"\ntR.")
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        load_gnd(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # sanity: the plain unpickler does run it
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_any_global_rejected_all_protocols(tmp_path: Path, protocol: int) -> None:
    # Even a harmless global (collections.OrderedDict) is refused: the real files need none.
    path = tmp_path / "gnd_od.pkl"
    path.write_bytes(pickle.dumps({"imlist": OrderedDict(a=1)}, protocol=protocol))
    with pytest.raises(UnsafePickleError, match="refusing to unpickle"):
        load_gnd(path)
