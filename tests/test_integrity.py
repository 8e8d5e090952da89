"""Integrity checks (issue 20, #5): checksums recorded at commit, cheap checks on open, `finegrain check [--repair]`.

Each damage is done to a real index's files (tools/stress/damage.py holds the cases; that script runs every case
through the real command line), and each was reproduced against the old code first: a changed owner row made an
image query for one image answer another at score 1.0; a header dtype changed to a same-sized one (``>f4``) was
read as good; bit flips and NaN gave silently wrong rankings.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from finegrain import Index
from finegrain.cli import app
from finegrain.store import integrity
from finegrain.store.catalog import IndexFormatError
from tools.stress import damage

runner = CliRunner()


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def base(tmp_path_factory, photos_dir):
    """Six photos committed two at a time: three global chunks, each with a checksum."""
    root = tmp_path_factory.mktemp("integrity")
    index = Index.create(root / "index")
    commits: list[int] = []
    report = index.add([photos_dir], commit_every=2, on_commit=commits.append)
    assert commits == [2, 2, 2] and report.indexed == 6  # the per-commit hook sees every commit, none empty
    index.close()
    return root / "index"


@pytest.fixture
def idx(base, tmp_path):
    path = tmp_path / "index"
    shutil.copytree(base, path)
    return path


def _target(idx: Path) -> tuple[int, int]:
    ids = damage.ids_by_stem(idx)
    return ids["coffee"], ids["chelsea"]


def _one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_every_chunk_is_committed_with_a_checksum(base):
    with sqlite3.connect(base / "finegrain.sqlite") as db:
        rows = db.execute("SELECT name, field, checksum, damaged FROM chunks").fetchall()
    assert len(rows) == 3 and all(c and d is None for _, _, c, d in rows)
    record = json.loads(rows[0][2])["files"]
    assert set(record) == {"vectors", "owner"} and record["vectors"]["dtype"] == "<f4"
    # the digest is the file's (computed while writing, not re-read)
    name, field = rows[0][0], rows[0][1]
    assert record["vectors"]["blake2b"] == damage_digest(base / "vectors" / field / f"{name}.npy")
    result = cli("check", "--index", base)
    assert result.exit_code == 0, result.output
    assert result.output.strip().startswith("ok: 3 chunk(s), 3 verified"), result.output


def damage_digest(path: Path) -> str:
    import hashlib

    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def test_compact_compress_remove_and_import_record_checksums(idx, tmp_path):
    index = Index.open(idx)
    index.remove([1])
    index.compact()
    index.compress("pca", 4)
    index.close()
    with sqlite3.connect(idx / "finegrain.sqlite") as db:
        rows = db.execute("SELECT field, checksum FROM chunks").fetchall()
    assert sorted(f for f, _ in rows) == ["compressed", "global"] and all(c for _, c in rows)
    assert integrity.check_index(idx).problems == []
    pytest.importorskip("pyarrow")
    from finegrain.interop import export_index, import_embeddings

    with Index.open(idx) as index:
        export_index(index, tmp_path / "export")
    import_embeddings(tmp_path / "export", tmp_path / "imported")
    with sqlite3.connect(tmp_path / "imported" / "finegrain.sqlite") as db:
        assert all(c for (c,) in db.execute("SELECT checksum FROM chunks"))
    report = integrity.check_index(tmp_path / "imported")
    assert report.problems == [] and report.verified == report.chunks > 0


def test_changed_owner_row_is_refused_on_open(idx, photos_dir):
    """Before: an image query for coffee answered chelsea's id at score 1.0."""
    coffee, chelsea = _target(idx)
    damage.owner_swap(idx, coffee, chelsea)
    with pytest.raises(IndexFormatError, match="several rows for image id.*finegrain check"):
        Index.open(idx)
    line = _one_line(cli("search", "--index", idx, "--image", photos_dir / "coffee.jpg"))
    assert "finegrain check" in line
    result = cli("check", "--index", idx)
    assert result.exit_code == 1 and "damaged: chunk" in result.output and "owner.npy changed" in result.output


def test_changed_owner_row_without_checksums_is_refused_too(idx, photos_dir):
    coffee, chelsea = _target(idx)
    damage.forget_checksums(idx)
    damage.owner_swap(idx, coffee, chelsea)
    with pytest.raises(IndexFormatError, match="several rows"):
        Index.open(idx)
    result = cli("check", "--index", idx)
    assert result.exit_code == 1 and "several rows for image id" in result.output, result.output


def test_unknown_owner_id_is_refused_on_open(idx):
    coffee, chelsea = _target(idx)
    damage.owner_unknown(idx, coffee, chelsea)
    with pytest.raises(IndexFormatError, match="ids no image ever had"):
        Index.open(idx)


@pytest.mark.parametrize("case", ["dtype_f2", "dtype_big_endian", "shape_swap"])
@pytest.mark.parametrize("checksums", [True, False])
def test_changed_headers_are_refused_on_open(idx, photos_dir, case, checksums):
    """Before: `<f4` -> `<f2` made every search answer [] with exit 0; `>f4` (same size) read byte-swapped values."""
    if not checksums:
        damage.forget_checksums(idx)
    coffee, chelsea = _target(idx)
    damage.CASES[case](idx, coffee, chelsea)
    with pytest.raises(IndexFormatError, match="damaged vector chunk"):
        Index.open(idx)
    assert "damaged vector chunk" in _one_line(cli("search", "--index", idx, "--text", "a cat"))
    assert "damaged vector chunk" in _one_line(cli("info", "--index", idx))
    result = cli("check", "--index", idx)
    assert result.exit_code == 1 and result.output.count("damaged:") == 1, result.output


def test_bit_flip_found_by_check_then_refused_then_dropped_and_reindexed(idx, photos_dir):
    coffee, chelsea = _target(idx)
    chunk, _ = damage.owner_chunk(idx, coffee)
    mate = [int(i) for i in np.load(damage.chunk_file(idx, chunk, "owner")) if i != coffee]
    index = Index.open(idx)  # the cheap check cannot see a flipped bit: opening works
    damage.bit_flip(idx, coffee, chelsea)
    index.close()
    index = Index.open(idx)
    before = index.search(image=photos_dir / "coffee.jpg", k=1)[0]
    assert abs(before.score - 1) > 0.01  # silently wrong (the image matched itself at 1.0): what the check is for
    index.close()

    result = cli("check", "--index", idx)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"damaged: chunk {chunk} of field global: {chunk}.npy changed since commit")
    assert "recorded in the index" in result.output and lines[-1].startswith("damaged index: 3 chunk(s)")

    index = Index.open(idx)  # info still works and says so; searches needing the chunk are refused
    assert index.info()["damaged_chunks"] == 1
    with pytest.raises(IndexFormatError, match=f"chunk {chunk} of field global is damaged"):
        index.search(text="a cat")
    index.close()
    assert "finegrain check" in _one_line(cli("search", "--index", idx, "--text", "a cat"))

    result = cli("check", "--index", idx, "--repair")  # says what cannot be done and why
    assert result.exit_code == 1 and "cannot repair: 1 damaged chunk(s) hold vectors of 2 image(s)" in result.output
    assert "coffee.jpg" in result.output and "--drop-damaged" in result.output
    assert result.output.strip().splitlines()[-1].startswith("damaged index, not all repaired:")

    result = cli("check", "--index", idx, "--repair", "--drop-damaged")
    assert result.exit_code == 0, result.output
    assert "repaired: removed 2 image(s) whose vectors were damaged" in result.output
    last = result.output.strip().splitlines()[-1]  # how it ended, not the damage found before the repair
    assert last.startswith("repaired index:") and last.endswith("problem(s) found before the repair"), last
    assert cli("check", "--index", idx).exit_code == 0
    index = Index.open(idx)
    assert coffee not in index.records and not set(mate) & set(index.records) and len(index) == 4
    assert all(h.id != coffee for h in index.search(image=photos_dir / "coffee.jpg", k=6))
    index.add([photos_dir])  # the re-run re-adds exactly the dropped images
    assert len(index) == 6
    hit = index.search(image=photos_dir / "coffee.jpg", k=1)[0]
    assert Path(hit.path).name == "coffee.jpg" and hit.score > 0.999
    index.close()
    assert cli("check", "--index", idx).exit_code == 0


@pytest.mark.parametrize("case", ["nan", "inf"])
def test_non_finite_vectors_never_rank(idx, photos_dir, case):
    """Unverified chunks (an older index) with NaN/inf: search refuses instead of dropping or promoting the image.

    Before: FAISS skipped the NaN row (the image silently vanished from every answer); an inf row ranked first.
    """
    coffee, chelsea = _target(idx)
    damage.forget_checksums(idx)
    damage.CASES[case](idx, coffee, chelsea)
    index = Index.open(idx)
    with pytest.raises(IndexFormatError, match="NaN or inf"):
        index.search(text="a cat")
    index.close()
    result = cli("check", "--index", idx)
    assert result.exit_code == 1 and "hold NaN or inf" in result.output and "coffee.jpg" in result.output


def test_damaged_ann_cache_reported_and_rebuilt(idx):
    damage.bad_ann_cache(idx, 1, 2)
    result = cli("check", "--index", idx)
    assert result.exit_code == 1 and "damaged: cache file ann/global-" in result.output
    result = cli("check", "--index", idx, "--repair")
    assert result.exit_code == 0 and "repaired: deleted 1 cached search structure" in result.output
    assert cli("check", "--index", idx).exit_code == 0


def test_old_index_without_checksum_columns_opens_and_migrates(idx, photos_dir):
    """An index from before checksums (no columns): read as before, "unverified"; a write migrates it."""
    with sqlite3.connect(idx / "finegrain.sqlite") as db:
        db.execute("ALTER TABLE chunks DROP COLUMN checksum")
        db.execute("ALTER TABLE chunks DROP COLUMN damaged")
    index = Index.open(idx)
    assert index.search(image=photos_dir / "coffee.jpg", k=1)[0].score > 0.999
    index.close()
    result = cli("check", "--index", idx)
    assert result.exit_code == 0 and "0 verified" in result.output and "3 unverified" in result.output
    result = cli("check", "--index", idx, "--repair")
    assert result.exit_code == 0 and "recorded checksums of 3 unverified chunk(s)" in result.output
    assert "3 verified" in cli("check", "--index", idx).output
    # what older finegrain versions run on the chunks table still works on the migrated one
    with sqlite3.connect(idx / "finegrain.sqlite") as db:
        assert len(db.execute("SELECT name, field, rows FROM chunks ORDER BY created, name").fetchall()) == 3
        db.execute("INSERT INTO chunks(name, field, rows, created) VALUES ('x', 'global', 0, 0)")
        assert db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()[0] == "1"


def test_check_on_a_non_index_gives_one_line(tmp_path):
    assert "no finegrain index" in _one_line(cli("check", "--index", tmp_path / "nothing"))


def test_server_refuses_recorded_damage_with_a_json_error(idx):
    """A running server, reloaded after `finegrain check` records damage, answers 503 `index_damaged`."""
    import httpx

    from finegrain.service import create_app
    from finegrain.service.background import BackgroundServer

    coffee, chelsea = _target(idx)
    with BackgroundServer(create_app(idx, reload_interval=0)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/api/search", json={"text": "a cat", "k": 2}).status_code == 200
        damage.bit_flip(idx, coffee, chelsea)
        report = integrity.check_index(idx)
        assert report.recorded and len(report.damaged_chunks) == 1
        client.post("/api/reload")
        response = client.post("/api/search", json={"text": "a cat", "k": 2})
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["error"] == "index_damaged" and "finegrain check" in body["message"]
