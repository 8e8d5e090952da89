"""bench revisitop end to end: a tiny revisitop-shaped folder built from real photos, and the real rparis6k-mini."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA, needs_data
from photo_crop_helpers import revisitop_folder

from finegrain.bench.revisitop import full_ranking, run_revisitop
from finegrain.datasets import load_revisitop


@pytest.fixture(scope="module")
def tiny_revisitop(tmp_path_factory, photos_dir):
    """Database: two crops of each sample photo; query: the whole photo, relevant: its two crops."""
    return revisitop_folder(tmp_path_factory.mktemp("tinyrevisitop"), photos_dir, query="q_{stem}")


def test_full_ranking_appends_missing_positions():
    np.testing.assert_array_equal(full_ranking(np.array([3, 0]), 5), [3, 0, 1, 2, 4])


def test_load_revisitop_and_landmarks(tiny_revisitop, photos_dir):
    data = load_revisitop(tiny_revisitop, distractors=photos_dir)
    assert len(data.db_paths) == 12 and len(data.query_paths) == 6 and len(data.distractor_paths) == 6
    assert data.landmarks[:2] == ["astronaut", "astronaut"]
    (photos_dir.parent / "list.txt").write_text("coins.jpg\nnot-there.jpg\n")
    with pytest.raises(FileNotFoundError, match="listed distractors are missing"):
        load_revisitop(tiny_revisitop, distractors=photos_dir, distractor_list=photos_dir.parent / "list.txt")
    (tiny_revisitop / "jpg" / "tiny_coins_000001.jpg").rename(tiny_revisitop / "moved.jpg")
    try:
        with pytest.raises(FileNotFoundError, match="missing from"):
            load_revisitop(tiny_revisitop)
    finally:
        (tiny_revisitop / "moved.jpg").rename(tiny_revisitop / "jpg" / "tiny_coins_000001.jpg")


def test_bench_revisitop_on_tiny_set(tiny_revisitop, photos_dir, tmp_path):
    result = run_revisitop(tiny_revisitop, distractors=photos_dir, cache_dir=tmp_path, show_progress=False)
    assert result["database"] == 12 and result["distractors"] == 6 and result["queries"] == 6
    for key in ("map_easy", "map_medium", "map_hard", "mp1_medium", "mp5_medium", "mp10_medium"):
        assert 0 <= result[key] <= 100
    # Crops of the same photo are easy to find among 18 images; a ranking bug would sink this.
    assert result["map_medium"] > 80 and result["query_ms_p50"] > 0


@needs_data
def test_bench_revisitop_on_rparis6k_mini(tmp_path):
    result = run_revisitop(DATA / "rparis6k-mini", cache_dir=tmp_path, show_progress=False)
    assert result["database"] == 238 and result["queries"] == 6
    # Random ranking gives roughly the share of positives (about 20%); the bundled model does far better.
    assert result["map_medium"] > 50 and result["map_easy"] >= result["map_hard"]


@pytest.mark.parametrize("mode", ["global+local", "l2g"])
def test_bench_revisitop_local_modes_on_tiny_set(tiny_revisitop, tmp_path, mode):
    from finegrain.local.store import LocalConfig

    local = LocalConfig("cnn", {"image_size": 192, "scales": [1.0, 0.707], "max_features": 120, "threads": 1})
    result = run_revisitop(tiny_revisitop, cache_dir=tmp_path, show_progress=False, mode=mode, local=local,
                           shortlist=6, mds_dim=4)
    assert result["mode"] == mode and result["queries"] == 6 and result["shortlist"] == 6
    assert result["rerank_ms_p50"] > 0 and result["local"]["extractor"] == "cnn"
    # Two crops of the query's photo among 12: well above the chance level of about 17%.
    assert result["map_medium"] > 60
    for baseline in ("baseline_global", "baseline_instance"):  # both global descriptors ride along (issue 17)
        assert set(result[baseline]) == {"map_easy", "map_medium", "map_hard"}
        assert 0 <= result[baseline]["map_medium"] <= 100
    if mode == "l2g":
        assert 0.0 <= result["approx_recall_at_100"] <= 1.0
        assert result["approx_recall_at_100"] >= 0.9  # exact neighbours here; only the per-image fill is approximate
    with pytest.raises(ValueError, match="needs local features"):
        run_revisitop(tiny_revisitop, cache_dir=tmp_path, show_progress=False, mode=mode)
    with pytest.raises(ValueError, match="unknown mode 'bogus'"):  # refused before any bench index is built
        run_revisitop(tiny_revisitop, cache_dir=tmp_path / "none", show_progress=False, mode="bogus", local=local)
    assert not (tmp_path / "none").exists()


def test_bench_revisitop_on_a_folder_of_symlinks(tiny_revisitop, tmp_path):
    """A data folder made of symlinks (issue 20, #11): the index stores the link paths, the bench must match them."""
    linked = tmp_path / "linked"
    (linked / "jpg").mkdir(parents=True)
    for f in (tiny_revisitop / "jpg").iterdir():
        (linked / "jpg" / f.name).symlink_to(f)
    (linked / "gnd_tiny.json").symlink_to(tiny_revisitop / "gnd_tiny.json")
    result = run_revisitop(linked, cache_dir=tmp_path / "cache", show_progress=False)
    assert result["database"] == 12 and result["queries"] == 6 and result["map_medium"] > 50
