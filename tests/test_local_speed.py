"""The folded image tower of the ``cnn`` local extractor gives what the encoder's own tower gives.

The "before" reference is the old code path itself: ``CNNExtractor.tower``
replaced by the encoder's ``feature_map_batch`` (what ``_feature_map`` called
before the tower was folded). Differences must stay at float rounding level.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from finegrain import encoders
from finegrain.local import features as lf
from finegrain.local.tower import FoldedTower, fold_tower

# The issue-17 benchmark's settings (``bench revisitop --local cnn``)
BENCH = {"image_size": 512, "scales": [1.0, 0.707, 0.5], "max_features": 1000, "threads": 1}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_folded_tower_matches_the_encoder_tower():
    enc = encoders.create("effnet-minilm")
    before = {k: v.clone() for k, v in enc.trunk.state_dict().items()}
    tower = fold_tower(enc)
    assert isinstance(tower, FoldedTower)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())
    # the stride-2 layers' asymmetric "same" padding is the only explicit pad left
    assert sum(b.depthwise.pre_pad is not None for b in tower.blocks) == 4 and tower.stem.pre_pad == (0, 1, 0, 1)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        # multiples of 32 (what the extractor feeds), odd sizes, a batch
        for shape in [(1, 3, 512, 384), (1, 3, 256, 352), (2, 3, 224, 224), (1, 3, 75, 101), (1, 3, 33, 64)]:
            x = torch.rand(shape, generator=gen) * 2 - 1
            ref, out = enc.feature_map_batch(x), tower(x)
            assert out.shape == ref.shape and out.is_contiguous()
            assert _rel(ref, out) < 5e-5, shape
    # the encoder is left as it was (the global field keeps its exact computation)
    assert all(torch.equal(v, enc.trunk.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.trunk.modules())


def test_fold_tower_refuses_other_towers():
    import copy
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="cannot fold"):
        fold_tower(object())
    enc = encoders.create("effnet-minilm")
    training = SimpleNamespace(trunk=copy.deepcopy(enc.trunk).train(), aligner=enc.aligner)
    with pytest.raises(ValueError, match="eval mode"):  # batch statistics cannot be folded
        fold_tower(training)


def _raws(photos_dir, **params):
    ex = lf.CNNExtractor(**{**BENCH, **params})
    return [ex.extract_raw(photos_dir / f"{n}.jpg") for n in ("astronaut", "coffee", "rocket")]


def _key(r: lf.RawFeatures) -> np.ndarray:
    """Row order that does not depend on near-tied strengths: by position and support size (exact grid floats)."""
    return np.lexsort((r.scales, r.positions[:, 1], r.positions[:, 0]))


@pytest.mark.parametrize("max_features", [1000, 150])  # every cell kept; a cut inside the candidates
def test_raw_features_match_the_unfolded_tower(photos_dir, monkeypatch, max_features):
    new = _raws(photos_dir, max_features=max_features)
    monkeypatch.setattr(lf.CNNExtractor, "tower", property(lambda self: self.encoder.feature_map_batch))
    old = _raws(photos_dir, max_features=max_features)
    for a, b in zip(old, new):
        np.testing.assert_allclose(b.global_raw, a.global_raw, atol=1e-5)
        assert len(a) == len(b) == min(max_features, len(a))
        assert np.all(np.diff(b.strengths) <= 0)
        np.testing.assert_allclose(b.strengths, a.strengths, rtol=1e-4)  # the sorted strengths agree
        same = {tuple(v) for v in np.column_stack([a.positions, a.scales])} == {
            tuple(v) for v in np.column_stack([b.positions, b.scales])}
        if not same:  # a cut between near-equal strengths may swap the last rows, nothing else
            assert max_features < 1000 and abs(a.strengths[-1] - b.strengths[-1]) <= 1e-4 * a.strengths[0]
            continue
        ia, ib = _key(a), _key(b)
        np.testing.assert_array_equal(a.positions[ia], b.positions[ib])
        np.testing.assert_allclose(b.descriptors[ib], a.descriptors[ia], atol=2e-5)


def _stored(index, path_prefix: str):
    """Per file name: (local rows keyed by position, instance row) of an index."""
    from finegrain.local.store import INSTANCE_FIELD, LOCAL_FIELD

    local, inst = index.fields[LOCAL_FIELD], index.fields[INSTANCE_FIELD]
    out = {}
    for image_id, rec in index.records.items():
        if not rec.path.startswith(path_prefix):
            continue
        m = local.owners == image_id
        xys, vec = local.attrs["xys"][m], local.vectors[m].astype(np.float32)
        order = np.lexsort((xys[:, 2], xys[:, 1], xys[:, 0]))
        out[rec.path.rsplit("/", 1)[-1]] = (xys[order], vec[order], local.attrs["strength"][m].astype(np.float32),
                                            inst.vectors[inst.owners == image_id][0].astype(np.float32))
    return out


def test_index_stores_the_same_rows_as_before(photos_dir, tmp_path, monkeypatch):
    """Index.add with --local cnn (the benchmark's settings): stored local and instance rows, before vs after."""
    from finegrain import Index
    from finegrain.local.store import STATE_FILE, LocalConfig

    photos = sorted(photos_dir.iterdir())
    (tmp_path / "fit").mkdir()
    (tmp_path / "db").mkdir()
    for p in photos[:3]:
        shutil.copy(p, tmp_path / "fit" / p.name)
    for p in photos[3:]:
        shutil.copy(p, tmp_path / "db" / p.name)
    cfg = LocalConfig("cnn", dict(BENCH), fit_images=128)
    with monkeypatch.context() as m:  # before: the unfolded tower, for the fit and the indexed files
        m.setattr(lf.CNNExtractor, "tower", property(lambda self: self.encoder.feature_map_batch))
        old = Index.create(tmp_path / "old", local=cfg)
        old.add([tmp_path / "fit"])
        assert old.add([tmp_path / "db"]).indexed == 3
    new = Index.create(tmp_path / "new", local=cfg)
    (tmp_path / "new" / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "old" / STATE_FILE, tmp_path / "new" / STATE_FILE)  # one whitening for both
    assert new.add([tmp_path / "db"]).indexed == 3
    a, b = _stored(old, str(tmp_path / "db")), _stored(new, str(tmp_path / "db"))
    assert sorted(a) == sorted(b) and len(a) == 3
    for name in a:
        (xa, va, sa, ga), (xb, vb, sb, gb) = a[name], b[name]
        np.testing.assert_array_equal(xa, xb)  # the same cells are kept
        np.testing.assert_allclose(vb, va, atol=2e-3)  # float16 rows: at most about one float16 step apart
        np.testing.assert_allclose(np.sort(sb), np.sort(sa), rtol=2e-3)
        np.testing.assert_allclose(gb, ga, atol=1e-3)
        assert np.abs(vb - va).mean() < 1e-4  # nearly all rows identical after float16 rounding
