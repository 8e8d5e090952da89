"""HiMIR pieces: SLIC segments, region embeddings, the segment table and the scoring modes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finegrain import Index, encoders
from finegrain.decompose.segments import SegmentConfig, embed_segments, segment_image
from finegrain.search import multivector as mv
from finegrain.store.vectors import FieldRows


@pytest.fixture(scope="module")
def enc():
    return encoders.create("effnet-minilm")


def test_segments_partition_the_image_at_every_level(photos_dir):
    img = Image.open(photos_dir / "chelsea.jpg")
    cfg = SegmentConfig(levels=(1, 4, 16))
    seg = segment_image(img, cfg)
    assert set(seg.level.tolist()) == {0, 1, 2}
    for level in range(3):
        sel = seg.level == level
        assert abs(seg.area[sel].sum() - 1.0) < 1e-6  # superpixels of a level tile the image
        assert seg.masks[sel].sum(axis=0).max() == 1  # ... without overlap
    assert (seg.level == 0).sum() == 1 and (seg.level == 2).sum() > (seg.level == 1).sum()
    assert (seg.box >= 0).all() and (seg.box <= 1).all() and (seg.box[:, 2:] > seg.box[:, :2]).all()
    boxes = seg.pixel_boxes(*img.size)
    assert (boxes[:, 2] > boxes[:, 0]).all() and boxes[:, 2].max() <= img.size[0]
    with pytest.raises(ValueError):
        SegmentConfig(embed="nope")


def test_region_of_whole_image_equals_global_embedding(enc, photos_dir):
    img = Image.open(photos_dir / "coffee.jpg").convert("RGB")
    pixels = enc.prepare_image(img)
    full = enc.encode_regions(pixels[None], [np.ones((1, 50, 50), np.float32)])[0]
    np.testing.assert_allclose(full[0], enc.encode_pixels(pixels[None])[0], atol=1e-4)


def test_pool_and_crop_embeddings(enc, photos_dir):
    img = Image.open(photos_dir / "chelsea.jpg").convert("RGB")
    seg = segment_image(img, SegmentConfig(levels=(4,)))
    for embed in ("pool", "crop"):
        e = embed_segments(enc, img, seg, SegmentConfig(levels=(4,), embed=embed))
        assert e.shape == (len(seg), enc.dim)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def _random_table(seed=0, n_images=40, n_levels=3, dim=8, q=3):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(100, 100 + n_images))  # ids in an arbitrary row order
    owners, levels = [], []
    for i in ids:
        for level in range(n_levels):
            if i % 7 == 0 and level == 1:
                continue  # some images have no segments at a level
            count = int(rng.integers(1, 5))
            owners += [i] * count
            levels += [level] * count
    vecs = rng.normal(size=(len(owners), dim)).astype(np.float32)
    rows = FieldRows(vecs, np.array(owners), {"level": np.array(levels, np.int16)})
    table = mv.SegmentTable(rows, ids, n_levels)
    glob = rng.normal(size=(n_images, dim)).astype(np.float32)
    queries = rng.normal(size=(q, dim)).astype(np.float32)
    return ids, rows, table, glob, queries


def _brute_level_max(ids, rows, level, queries):
    out = np.full((len(ids), len(queries)), -np.inf, np.float32)
    for p, i in enumerate(ids):
        sel = (rows.owners == i) & (rows.attrs["level"] == level)
        if sel.any():
            out[p] = (rows.vectors[sel] @ queries.T).max(axis=0)
    return out


def test_segment_table_matches_brute_force():
    ids, rows, table, _, queries = _random_table()
    for level in range(3):
        got, ops = table.level_max(level, queries)
        # atol: another summation order moves a sum that cancels near 0 by a few float32 ulps of its terms
        np.testing.assert_allclose(got, _brute_level_max(ids, rows, level, queries), rtol=1e-5, atol=1e-6)
        assert ops == int((rows.attrs["level"] == level).sum()) * len(queries)
        cand = np.array([3, 0, 21, 7, 39])
        sub, sub_ops = table.level_max(level, queries, cand)
        np.testing.assert_allclose(sub, _brute_level_max(ids, rows, level, queries)[cand], rtol=1e-5, atol=1e-6)
        assert sub_ops < ops


def test_exhaustive_single_and_hierarchical_scoring():
    ids, rows, table, glob, queries = _random_table(seed=1)
    cfg = mv.MultiVectorConfig(weight_global=0.3)
    best = np.max([_brute_level_max(ids, rows, lv, queries) for lv in range(3)], axis=0)
    expected = mv.combine(glob @ queries[0], best, 0.3)
    scores, pos, stats = mv.search("exhaustive", table, glob, queries, 10, cfg)
    np.testing.assert_array_equal(pos, np.argsort(-expected, kind="stable")[:10])
    np.testing.assert_allclose(scores, np.sort(expected)[::-1][:10], rtol=1e-5)
    assert stats.levels_visited == 3 and stats.sim_ops == len(glob) + len(rows) * len(queries)
    # No pruning and no early exit: the scheduler visits every level and agrees with exhaustive.
    same = mv.MultiVectorConfig(weight_global=0.3, T=0.0, alpha=1.0, tau=2.0)
    hscores, hpos, hstats = mv.search("hierarchical", table, glob, queries, 10, same)
    np.testing.assert_array_equal(hpos, pos)
    assert hstats.sim_ops == stats.sim_ops
    # With pruning it does less work and visits fewer candidates at each finer level.
    fast = mv.MultiVectorConfig(weight_global=0.3, T=0.5, alpha=0.8, tau=2.0)
    _, _, fstats = mv.search("hierarchical", table, glob, queries, 5, fast)
    assert fstats.sim_ops < stats.sim_ops
    assert fstats.candidates_per_level == sorted(fstats.candidates_per_level, reverse=True)
    _, _, sstats = mv.search("single", table, glob, queries, 5, mv.MultiVectorConfig(single_level=2))
    assert sstats.levels_visited == 1
    with pytest.raises(ValueError, match="unknown search mode"):
        mv.search("nope", table, glob, queries, 5, cfg)


def test_schedule_and_tau():
    cfg = mv.MultiVectorConfig(stride=2)
    assert mv.schedule(5, cfg) == [0, 2, 4]
    assert mv.schedule(4, cfg) == [0, 2, 3]  # the finest level is always visited
    assert mv.schedule(5, mv.MultiVectorConfig(skip_levels=(1, 2))) == [0, 3, 4]
    a = np.array([1, 2, 3, 4])
    assert mv.topk_tau(a, a) == 1.0
    assert mv.topk_tau(a, a[::-1]) == pytest.approx(-1.0)
    assert mv.topk_tau(a, np.array([5, 6, 7, 8])) < 0


def test_segmented_index_end_to_end(tmp_path, photos_dir):
    index = Index.create(tmp_path / "seg", segments=SegmentConfig(levels=(1, 4, 9)))
    assert index.add([photos_dir]).indexed == 6
    index = Index.open(tmp_path / "seg")
    seg = index.fields["segments"]
    assert set(np.unique(seg.owners)) == set(index.records) and seg.attrs["box"].shape == (len(seg), 4)
    for mode in ("global", "single", "exhaustive", "hierarchical"):
        hits = index.search(text="a cat sitting on a rug", k=3, mode=mode)
        stats, queries = hits.stats, hits.subqueries
        assert len(hits) == 3 and stats.sim_ops > 0
        if mode != "global":
            assert queries[0] == "a cat sitting on a rug" and len(queries) >= 2
    hits = index.search(image=photos_dir / "rocket.jpg", k=1, mode="exhaustive")
    assert hits[0].path.endswith("rocket.jpg")
    plain = Index.create(tmp_path / "plain")
    plain.add([photos_dir / "coins.jpg"])
    with pytest.raises(ValueError, match="needs an index built with segments"):
        plain.search(text="coins", mode="exhaustive")


def test_tune_saves_a_configuration_and_plot(tmp_path, photos_dir):
    import json

    from finegrain.tune import load_queries, tune

    index = Index.create(tmp_path / "seg", segments=SegmentConfig(levels=(1, 4, 9)))
    index.add([photos_dir])
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("\n".join(json.dumps({"text": t, "relevant": [n]}) for t, n in [
        ("a cat", "chelsea.jpg"), ("a man taking a picture", "camera.jpg"), ("coins on a table", "coins.jpg"),
        ("a cup of coffee", "coffee.jpg"), ("a woman smiling", "astronaut.jpg")]))
    queries = load_queries(qfile)
    assert queries[0] == ("a cat", {"chelsea.jpg"})
    result = tune(index, queries, plot=tmp_path / "tune.png")
    n_sparsity = 3 if result["profiled_skip_levels"] else 2  # stride 1, stride 2, profiled skip list
    assert result["queries"] == 5 and len(result["trials"]) == 36 * n_sparsity
    assert (tmp_path / "tune.png").read_bytes()[:4] == b"\x89PNG"
    reopened = Index.open(index.path)
    saved = reopened.search_config_dict()["multivector"]
    assert mv.MultiVectorConfig.from_dict(saved) == mv.MultiVectorConfig.from_dict(result["chosen"])
    assert 0 <= result["chosen_ndcg10"] <= 1
    # The saved configuration is what hierarchical search uses by default.
    stats = reopened.search(text="a cat", mode="hierarchical", k=3).stats
    assert stats.levels_visited >= 1
    # No budget: the chosen trial is within 0.005 NDCG@10 of the best one.
    assert result["chosen_ndcg10"] >= max(t["ndcg10"] for t in result["trials"]) - 0.005


def test_choose_respects_budget():
    from finegrain.tune import Trial, choose

    cfg = mv.MultiVectorConfig()
    trials = [Trial(cfg, 0.50, 1.0, 10), Trial(cfg, 0.60, 3.0, 30), Trial(cfg, 0.598, 2.0, 20)]
    assert choose(trials, None, 0.005) is trials[2]  # fastest within 0.005 of the best
    assert choose(trials, 2.5, 0.005) is trials[2]  # most accurate within the budget
    assert choose(trials, 0.5, 0.005) is trials[0]  # nothing fits: the fastest


def test_profile_levels_drops_redundant_levels_and_keeps_the_informative_one():
    from finegrain.tune import profile_levels

    rng = np.random.default_rng(3)
    n_images, dim = 60, 16
    ids = np.arange(n_images)
    queries = [rng.normal(size=(2, dim)).astype(np.float32) for _ in range(20)]
    relevant = [{int(i)} for i in rng.choice(n_images, size=len(queries), replace=False)]
    owners, levels, vecs = [], [], []
    for level in range(4):
        for i in ids:
            for _ in range(2):
                v = rng.normal(size=dim).astype(np.float32)
                for q, rel in zip(queries, relevant):
                    if level == 2 and i in rel:
                        v = q.sum(axis=0) * 3  # only level 2 finds the relevant images
                owners.append(i), levels.append(level), vecs.append(v)
    rows = FieldRows(np.array(vecs), np.array(owners), {"level": np.array(levels, np.int16)})
    table = mv.SegmentTable(rows, ids, 4)
    glob = rng.normal(size=(n_images, dim)).astype(np.float32) * 0.01
    base = mv.MultiVectorConfig(weight_global=0.1)
    skip = profile_levels(table, glob, ids, queries, relevant, base, max_loss=0.0)
    assert 2 not in skip and len(skip) == 3  # the noise levels go, the informative one stays
    assert profile_levels(table, glob, ids, queries, relevant, base, max_loss=-1.0) == ()  # no loss allowed below zero
