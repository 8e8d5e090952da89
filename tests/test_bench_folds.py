"""Landmark folds (choose on one half, report on the other) and the distractor options of the landmark benches."""

from __future__ import annotations

import json

import pytest
from conftest import DATA, needs_data
from fgcli import fg
from photo_crop_helpers import revisitop_folder

import finegrain.bench.revisitop as revisitop_module
from finegrain.bench.folds import landmark_folds, landmark_of, protocol
from finegrain.bench.revisitop import (
    available_distractors,
    revisitop_index,
    revisitop_index_name,
    run_revisitop,
    seed_index,
)
from finegrain.datasets import load_revisitop
from finegrain.index import Index


@pytest.fixture(scope="module")
def folded_revisitop(tmp_path_factory, photos_dir):
    """Six 'landmarks' (sample photos), two database crops and one query crop each, named like rparis6k."""
    return revisitop_folder(tmp_path_factory.mktemp("foldrevisitop"), photos_dir, query="tiny_{stem}_000900")


def test_landmark_of():
    assert landmark_of("paris_eiffel_000266") == "paris_eiffel"
    assert landmark_of("all_souls_000013") == "all_souls"
    assert landmark_of("ashmolean_000000") == "ashmolean"
    assert landmark_of("nonumber") == "nonumber"


def test_folds_are_disjoint_deterministic_and_cover_every_query():
    imlist = [f"paris_{m}_{i:06d}" for m in ("louvre", "eiffel", "defense", "pompidou", "invalides") for i in range(4)]
    qimlist = ["paris_eiffel_000900", "paris_louvre_000901", "paris_louvre_000902", "paris_defense_000903",
               "paris_pompidou_000904", "paris_invalides_000905"]
    folds = landmark_folds(imlist, qimlist)
    again = landmark_folds(imlist, qimlist)
    assert folds == again  # deterministic
    assert [f.name for f in folds] == ["A", "B"]
    assert set(folds[0].landmarks).isdisjoint(folds[1].landmarks)
    assert sorted(folds[0].landmarks + folds[1].landmarks) == sorted({landmark_of(n) for n in imlist})
    assert sorted(folds[0].queries + folds[1].queries) == list(range(len(qimlist)))  # each query exactly once
    assert sorted(folds[0].database + folds[1].database) == list(range(len(imlist)))
    # sorted landmarks dealt round-robin: defense, eiffel, invalides, louvre, pompidou
    assert folds[0].landmarks == ("paris_defense", "paris_invalides", "paris_pompidou")
    for fold in folds:
        assert all(landmark_of(qimlist[q]) in fold.landmarks for q in fold.queries)
        assert all(landmark_of(imlist[i]) in fold.landmarks for i in fold.database)
    assert [(c.name, r.name) for c, r in protocol(folds)] == [("B", "A"), ("A", "B")]
    with pytest.raises(ValueError, match="at least 3 landmarks"):
        landmark_folds(imlist[:8], qimlist[:1], 3)


@needs_data
def test_rparis_folds():
    bench = load_revisitop(DATA / "rparis6k-mini")
    folds = landmark_folds(bench.gnd.imlist, bench.gnd.qimlist)
    assert [len(f.queries) for f in folds] == [3, 3]
    assert sum(len(f.database) for f in folds) == len(bench.db_paths)


def test_distractor_list_file_changes_the_database_and_is_recorded(folded_revisitop, photos_dir, tmp_path):
    listed = tmp_path / "d.txt"
    listed.write_text(f"{photos_dir / 'coins.jpg'}\n\n{photos_dir.name}/rocket.jpg\n")  # absolute and relative
    (tmp_path / photos_dir.name).symlink_to(photos_dir)
    two = run_revisitop(folded_revisitop, distractors=listed, cache_dir=tmp_path / "c", show_progress=False,
                        baselines=False)
    assert (two["database"], two["distractors"], two["distractors_requested"]) == (12, 2, 2)
    assert two["distractors_partial"] is False
    bench = load_revisitop(folded_revisitop, distractors=listed)
    assert len(Index.open(tmp_path / "c" / revisitop_index_name(bench, "effnet-minilm"))) == 14  # searched 14
    listed.write_text(f"{photos_dir / 'nope.jpg'}\n")
    with pytest.raises(FileNotFoundError, match="1 of the 1 images listed"):
        load_revisitop(folded_revisitop, distractors=listed)
    with pytest.raises(ValueError, match="needs --distractors to be a folder"):
        load_revisitop(folded_revisitop, distractors=listed, distractor_list=listed)


def test_distractor_index_is_built_in_steps_and_partial_indexes_are_usable(folded_revisitop, photos_dir,
                                                                            tmp_path, monkeypatch):
    bench = load_revisitop(folded_revisitop, distractors=photos_dir)  # 6 distractors
    cache = tmp_path / "c"
    alone, _, _ = revisitop_index(load_revisitop(folded_revisitop), "effnet-minilm", cache, False)
    assert len(alone) == 12
    # the database's own index seeds every distractor index (copied, not re-indexed); a wrong size does not
    assert not seed_index(alone.path, tmp_path / "other", 13) and not (tmp_path / "other").exists()
    seeded = []
    monkeypatch.setattr(revisitop_module, "seed_index", lambda *a: seeded.append(seed_index(*a)) or seeded[-1])
    index, stats, rows = revisitop_index(bench, "effnet-minilm", cache, False, step=4)  # database, +4, +2
    assert len(index) == 18 and not stats["index_reused"] and seeded == [True]
    # an interrupted build: drop the last 3 distractors, as if the last pass had not happened
    index_dir = cache / revisitop_index_name(bench, "effnet-minilm")
    late = {str(p) for p in bench.distractor_paths[3:]}
    Index.open(index_dir).remove([r.id for r in Index.open(index_dir).records.values() if r.path in late])
    partial, where = available_distractors(bench, "effnet-minilm", cache)
    assert where == index_dir and partial.distractor_paths == bench.distractor_paths[:3]
    result = run_revisitop(folded_revisitop, distractors=photos_dir, cache_dir=cache, show_progress=False,
                           available_only=True)
    assert (result["distractors"], result["distractors_requested"], result["distractors_partial"]) == (3, 6, True)
    # resuming indexes only what is missing
    _, stats, _ = revisitop_index(bench, "effnet-minilm", cache, False)
    assert len(Index.open(index_dir)) == 18


def test_compress_folds_json_names_the_folds_and_what_chose(folded_revisitop, tmp_path):
    out = fg("bench", "compress", "--data", folded_revisitop, "--cache-dir", tmp_path, "--folds", "2",
             "--dims", "4", "--epochs", "1", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["protocol"].startswith("2-fold landmarks")
    assert [f["fold"] for f in report["folds"]] == ["A", "B"]
    assert {tuple(f["landmarks"]) for f in report["folds"]} == {("tiny_astronaut", "tiny_chelsea", "tiny_coins"),
                                                                 ("tiny_camera", "tiny_coffee", "tiny_rocket")}
    methods = {r["method"] for r in report["results"]}
    assert methods == {"none", "pca", "aesvc", "aesvc-paper", "ss2d"}
    for row in report["results"]:
        assert row["fold"] in ("A", "B") and row["chosen_on"] in ("A", "B") and row["chosen_on"] != row["fold"]
    for choice in report["choices"]:
        assert choice["aesvc"] in {c["setting"] for c in report["candidates"] if c["method"] == "aesvc"}
    assert {g["fold"] for g in report["goals"]} == {"A", "B"}


def test_revisitop_folds_rejects_modes_without_settings(folded_revisitop, tmp_path):
    out = fg("bench", "revisitop", "--data", folded_revisitop, "--cache-dir", tmp_path, "--folds", "2",
             "--mode", "global")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--folds chooses" in out.stderr


def test_revisitop_l2g_folds_on_tiny_set(folded_revisitop, tmp_path):
    from finegrain.bench.revisitop_folds import run_revisitop_folds
    from finegrain.local.store import LocalConfig

    local = LocalConfig("cnn", {"image_size": 160, "scales": [1.0], "max_features": 60, "threads": 1})
    grid = ({"variant": "finegrain", "w": 0.9, "shortlist": 100}, {"variant": "finegrain", "w": 0.5, "shortlist": 8},
            {"variant": "paper", "w": 0.19, "shortlist": 700})
    report = run_revisitop_folds(folded_revisitop, cache_dir=tmp_path, show_progress=False, local=local, grid=grid)
    assert [c["chosen_on"] for c in report["choices"]] == ["B", "A"]
    rows = {(r["fold"], r["row"]) for r in report["results"]}
    for fold in ("A", "B"):
        for row in ("global (joint)", "global (GeM instance)", "global+local", "l2g (chosen)",
                    "l2g (shipped default)", "l2g (paper, faithful)"):
            assert (fold, row) in rows
    chosen = [r for r in report["results"] if r["role"] == "chosen"]
    assert all(r["chosen_on"] != r["fold"] and r["setting"] for r in chosen)
    assert all(0 <= r["map_medium"] <= 100 and 0 <= r["class_map"] <= 100 for r in report["results"])
    # every candidate carries its search cost (the k 700 variant's cost is what a user weighs against its mAP)
    assert all(c["rank_ms_p50"] > 0 for c in report["candidates"])
