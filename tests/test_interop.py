"""Export/import in clip-retrieval's layout, imported (external) embeddings, and `search --format`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finegrain import Index, interop
from finegrain.interop import ImportFormatError, export_index, import_embeddings
from fgcli import fg as fg_in_process  # noqa: E402  (tests/ is on sys.path)


def fg(*args, check=True):
    proc = fg_in_process(*args)  # in-process: the same command-line code without an interpreter start
    if check and proc.returncode != 0:
        raise AssertionError(f"finegrain {args} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def source(tmp_path_factory, photos_dir) -> Path:
    path = tmp_path_factory.mktemp("interop") / "index"
    with Index.create(path) as index:
        index.add([photos_dir])
    return path


def _write_clip_folder(root: Path, parts: list[tuple[np.ndarray, dict]]) -> Path:
    """A folder as clip-retrieval's inference writes it (zero-padded partition numbers)."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    digits = len(str(len(parts))) if len(parts) > 1 else 1
    for n, (emb, columns) in enumerate(parts):
        suffix = str(n).zfill(digits)
        np.save(root / "img_emb" / f"img_emb_{suffix}.npy", emb)
        pq.write_table(pa.table(columns), root / "metadata" / f"metadata_{suffix}.parquet")
    return root


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".importing-" in p.name]


def test_export_writes_clip_retrieval_layout_and_import_round_trips(source, tmp_path):
    out = tmp_path / "export"
    with Index.open(source) as index:
        info = export_index(index, out)
        records = sorted(index.records.values(), key=lambda r: r.id)
        expected = index.search(text="a cat", k=3)
        vectors = index.global_rows
    assert info["images"] == 6 and info["encoder"] == "effnet-minilm"
    emb = np.load(out / "img_emb" / "img_emb_0.npy")
    table = pq.read_table(out / "metadata" / "metadata_0.parquet")
    assert emb.shape == (6, info["dim"]) and emb.dtype == np.float32 and table.num_rows == 6
    assert table.column("image_path").to_pylist() == [r.path for r in records]
    assert table.column("sha256").to_pylist() == [r.sha256 for r in records]
    row = {int(o): i for i, o in enumerate(vectors.owners)}
    np.testing.assert_array_equal(emb, np.stack([vectors.vectors[row[r.id]] for r in records]))
    assert json.loads((out / "finegrain_export.json").read_text())["encoder"] == "effnet-minilm"

    summary = import_embeddings(out, tmp_path / "copy")
    assert summary["encoder"] == "effnet-minilm" and summary["text_search"] and summary["images"] == 6
    with Index.open(tmp_path / "copy") as copy:
        got = copy.search(text="a cat", k=3)
        assert [h.path for h in got] == [h.path for h in expected]
        assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-5)
        assert {r.path: r.sha256 for r in copy.records.values()} == {r.path: r.sha256 for r in records}
        assert copy.info()["encoder"] == "effnet-minilm"
    with pytest.raises(FileExistsError):
        export_index(Index.open(source), out)  # not into a non-empty folder
    with pytest.raises(FileExistsError):
        import_embeddings(out, tmp_path / "copy")  # never over an existing index


def test_import_of_foreign_embeddings_answers_vector_queries_only(tmp_path):
    rng = np.random.default_rng(0)
    emb = [rng.normal(size=(n, 16)).astype(np.float16) for n in (5, 4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 1)]
    parts, k = [], 0
    for e in emb:
        urls = [f"https://example.com/{k + i}.jpg" for i in range(len(e))]
        parts.append((e, {"url": urls, "caption": [f"caption {k + i}" for i in range(len(e))]}))
        k += len(e)
    src = _write_clip_folder(tmp_path / "laion", parts)  # 12 partitions: img_emb_00 .. img_emb_11
    assert (src / "img_emb" / "img_emb_00.npy").exists()
    summary = import_embeddings(src, tmp_path / "index", encoder="open_clip:ViT-B-32", batch=4)
    assert summary["encoder"] == "external:open_clip:ViT-B-32" and not summary["text_search"]
    everything = np.concatenate(emb).astype(np.float32)
    everything /= np.linalg.norm(everything, axis=1, keepdims=True)
    with Index.open(tmp_path / "index") as index:
        assert len(index) == 29 and index.info()["encoder"] == "external:open_clip:ViT-B-32"
        # Row order is kept across partitions: row 17's own vector finds row 17's url first.
        scores, ids = index.search_vectors(everything[17:18], k=3)
        assert index.get(int(ids[0, 0])).path == "https://example.com/17.jpg"
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-3)
        with pytest.raises(ValueError, match="vector queries only"):
            index.search(text="a cat", k=3)
    proc = fg("search", "--index", tmp_path / "index", "--text", "a cat", check=False)
    assert proc.returncode == 2 and "vector queries only" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("defect, message", [
    ("nan", "NaN or infinite"),
    ("zero", "all-zero"),
    ("one_d", "expected \\(rows, dim\\)"),
    ("ints", "not floating-point"),
    ("rows", "has 3 rows but"),
    ("columns", "none of the columns image_path, url"),
    ("no_meta", "no matching metadata"),
    ("dims", "dimension 8, the first file 4"),
    ("duplicate", "appears twice"),
    ("pickle", "not a readable .npy"),
    ("empty", "no img_emb"),
])
def test_bad_input_is_refused_clearly_and_leaves_no_index(tmp_path, defect, message):
    good = np.ones((3, 4), np.float32)
    cols = {"image_path": ["a.jpg", "b.jpg", "c.jpg"]}
    parts = [(good, cols)]
    if defect == "nan":
        bad = good.copy()
        bad[2, 1] = np.nan
        parts = [(bad, cols)]
    elif defect == "zero":
        bad = good.copy()
        bad[1] = 0
        parts = [(bad, cols)]
    elif defect == "one_d":
        parts = [(np.ones(3, np.float32), cols)]
    elif defect == "ints":
        parts = [(np.ones((3, 4), np.int32), cols)]
    elif defect == "rows":
        parts = [(good, {"image_path": ["a.jpg", "b.jpg"]})]
    elif defect == "columns":
        parts = [(good, {"caption": ["x", "y", "z"]})]
    elif defect == "dims":
        parts = [(good, cols), (np.ones((1, 8), np.float32), {"image_path": ["d.jpg"]})]
    elif defect == "duplicate":
        parts = [(good, {"image_path": ["a.jpg", "b.jpg", "a.jpg"]})]
    src = _write_clip_folder(tmp_path / "src", parts if defect != "empty" else [])
    if defect == "no_meta":
        (src / "metadata" / "metadata_0.parquet").unlink()
    elif defect == "pickle":
        np.save(src / "img_emb" / "img_emb_0.npy", np.array([{"x": 1}, {"y": 2}, {"z": 3}], dtype=object),
                allow_pickle=True)
    dest = tmp_path / "dest"
    with pytest.raises(ImportFormatError, match=message):
        import_embeddings(src, dest)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_a_failure_half_way_leaves_no_index(tmp_path, monkeypatch):
    from finegrain.store.writer import Writer

    src = _write_clip_folder(tmp_path / "src", [(np.eye(6, dtype=np.float32), {"image_path": list("abcdef")})])
    calls = []
    real = Writer.commit

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(Writer, "commit", flaky)
    with pytest.raises(OSError, match="disk full"):
        import_embeddings(src, tmp_path / "dest", batch=2)
    assert len(calls) == 2 and not (tmp_path / "dest").exists() and _leftovers(tmp_path) == []


def test_a_finegrain_encoder_is_checked_against_the_embeddings(tmp_path, photos_dir, source):
    with Index.open(source) as index:
        records = sorted(index.records.values(), key=lambda r: r.id)
        dim = index.global_rows.vectors.shape[1]
    paths = [r.path for r in records]
    rng = np.random.default_rng(1)
    src = _write_clip_folder(tmp_path / "src", [(rng.normal(size=(6, dim)).astype(np.float32), {"image_path": paths})])
    with pytest.raises(ValueError, match="do not come from encoder 'effnet-minilm'"):
        import_embeddings(src, tmp_path / "dest", encoder="effnet-minilm")
    small = _write_clip_folder(tmp_path / "small", [(np.ones((2, 7), np.float32), {"image_path": ["x", "y"]})])
    with pytest.raises(ValueError, match="dimension"):
        import_embeddings(small, tmp_path / "dest", encoder="effnet-minilm")
    assert not (tmp_path / "dest").exists() and _leftovers(tmp_path) == []
    assert interop.resolve_encoder("external:foo", interop.read_clip_folder(small)) == "external:foo"


def test_cli_export_import_and_search_formats(source, tmp_path):
    fg("export", "--index", source, "--out", tmp_path / "e")
    proc = fg("import", tmp_path / "e", "--index", tmp_path / "i", "--json")
    assert json.loads(proc.stdout)["images"] == 6
    proc = fg("search", "--index", tmp_path / "i", "--text", "a cat", "-k", "3", "--format", "jsonl")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 3 and lines[0]["path"].endswith("chelsea.jpg") and set(lines[0]) == {"id", "path", "score", "rank"}
    proc = fg("search", "--index", tmp_path / "i", "--text", "a cat", "-k", "3", "--format", "paths")
    assert proc.stdout.splitlines() == [line["path"] for line in lines]
    proc = fg("search", "--index", tmp_path / "i", "--text", "a cat", "--format", "csv", check=False)
    assert proc.returncode == 2 and "--format must be" in " ".join(proc.stderr.split())
    proc = fg("import", tmp_path / "e", "--index", tmp_path / "i", check=False)
    assert proc.returncode == 2 and "already exists" in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr
    shutil.rmtree(tmp_path / "e" / "metadata")
    proc = fg("import", tmp_path / "e", "--index", tmp_path / "j", check=False)
    assert proc.returncode == 2 and "no matching metadata" in " ".join(proc.stderr.split()) and not (tmp_path / "j").exists()
