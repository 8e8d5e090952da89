"""`finegrain tune --breadth-only`: the global ANN breadth chosen by recall against exact search, saved, used."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finegrain.index import Index
from finegrain.store.catalog import NewImage
from finegrain.store.vectors import FieldRows
from finegrain.tune import BreadthTrial, choose_breadth, tune_breadth

TEXTS = ["a dog runs on the grass", "two children play in the water", "a man rides a bike", "a cat on a sofa",
         "a red car in the street", "people at the beach", "a boy jumps into a pool", "a woman with an umbrella"]


def _hnsw_index(path, n: int = 3000) -> Index:
    """``n`` random unit global vectors in an index whose global search is HNSW (no image is encoded)."""
    index = Index.create(path, ann="hnsw")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, index.encoder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    images = [NewImage(f"/syn/{i}.jpg", f"{i:064x}", 1, 1, 64, 48) for i in range(n)]
    with index.writer() as w:
        w.commit(images, {"global": FieldRows(vectors, np.arange(n))}, [], [], [])
    return index


def test_breadth_is_chosen_saved_and_used(tmp_path):
    index = _hnsw_index(tmp_path / "hnsw")
    rows_generation = index.snapshot.rows_generation
    result = tune_breadth(index, [(t, set()) for t in TEXTS], recall=0.95, grid=(10, 40, 160, 640, 3000))
    trials = result["breadth"]["trials"]
    assert [t["breadth"] for t in trials] == [10, 40, 160, 640, 3000]
    assert trials[-1]["recall10"] == 1.0  # efSearch = every row: exact
    chosen = result["breadth"]["breadth"]
    assert chosen == min(t["breadth"] for t in trials if t["recall10"] >= 0.95)
    index = Index.open(tmp_path / "hnsw")
    assert index.search_config_dict()["breadth"] == chosen
    assert index.search_config_dict()["tuned"]["breadth"]["chosen_on"]["queries"] == len(TEXTS)
    # saving search settings keeps the rows generation, so the cached HNSW graph is not rebuilt
    assert index.snapshot.rows_generation == rows_generation
    assert index.snapshot.generation > rows_generation
    saved = [h.id for h in index.search(text=TEXTS[0], k=10)]
    assert saved == [h.id for h in index.search(text=TEXTS[0], k=10, breadth=chosen)]
    index.close()


def test_rows_generation_follows_row_changes(tmp_path):
    index = _hnsw_index(tmp_path / "hnsw", n=50)
    before = index.snapshot.rows_generation
    index.save_search_config({"decomposer": "rules"})
    assert index.snapshot.rows_generation == before
    index.remove([next(iter(index.snapshot.records))])
    assert index.snapshot.rows_generation == index.snapshot.generation > before
    index.close()


def test_exact_index_has_no_breadth(tmp_path):
    index = _hnsw_index(tmp_path / "x", n=50)
    index.close()
    flat = Index.create(tmp_path / "flat")
    with pytest.raises(ValueError, match="no breadth"):
        tune_breadth(flat, [(TEXTS[0], set())])
    with pytest.raises(ValueError, match="recall"):
        tune_breadth(flat, [(TEXTS[0], set())], recall=1.5)
    flat.close()


def test_choose_breadth_rules():
    trials = [BreadthTrial(16, 0.80, 0.2), BreadthTrial(64, 0.97, 0.5), BreadthTrial(256, 0.995, 1.5),
              BreadthTrial(1024, 0.995, 4.0)]
    assert choose_breadth(trials, None, 0.99).breadth == 256  # smallest reaching the recall
    assert choose_breadth(trials, None, 0.999).breadth == 256  # none reaches it: best recall, smaller breadth
    assert choose_breadth(trials, 1.0, 0.99).breadth == 64  # best recall within the budget
    assert choose_breadth(trials, 0.1, 0.99).breadth == 16  # nothing fits: the fastest


def test_cli_breadth_only(tmp_path):
    from typer.testing import CliRunner

    from finegrain.cli import app

    _hnsw_index(tmp_path / "hnsw", n=400).close()
    queries = tmp_path / "q.tsv"
    queries.write_text("".join(f"{t}\t{i}.jpg\n" for i, t in enumerate(TEXTS)))
    runner = CliRunner()
    res = runner.invoke(app, ["tune", "--index", str(tmp_path / "hnsw"), "--queries", str(queries), "--breadth-only",
                              "--json", "--report", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["breadth"]["breadth"] in (16, 32, 64, 128, 256, 512,
                                                                                      1024, 2048, 4096)
    assert (tmp_path / "r.html").exists()
    Index.create(tmp_path / "flat").close()
    res = runner.invoke(app, ["tune", "--index", str(tmp_path / "flat"), "--queries", str(queries), "--breadth-only"])
    assert res.exit_code == 2 and "no breadth" in res.output
