"""MaO Stage A: composites, the crop-vector cache, the adapter and its training (finegrain.train.stagea)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.train import stagea
from finegrain.train.stagea import (CacheConfig, StageAAdapter, StageAConfig, apply_adapter, build_cache, info_nce,
                                    load_adapter, make_composite, padded, save_adapter, train_stagea)


def _flat(colour, size=(300, 200)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _gradient_donor(size=(320, 240)) -> Image.Image:
    """A donor whose every pixel differs from a flat background (red ramp, green 200)."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(100, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = 200
    return Image.fromarray(arr)


@pytest.mark.parametrize("seed", range(8))
def test_composite_pastes_the_object_at_the_recorded_box_in_the_needles_area_range(seed):
    comp = make_composite(_flat((10, 20, 30)), _gradient_donor(), np.random.default_rng(seed))
    assert comp.image.size == (stagea.SCENE_SIDE, stagea.SCENE_SIDE)
    x0, y0, x1, y1 = comp.box
    assert 0 <= x0 < x1 <= stagea.SCENE_SIDE and 0 <= y0 < y1 <= stagea.SCENE_SIDE
    area = (x1 - x0) * (y1 - y0) / stagea.SCENE_SIDE ** 2
    assert area == pytest.approx(comp.area_fraction)
    assert 0.009 <= area <= 0.041  # 1-4 %, up to rounding of the pasted side
    arr = np.asarray(comp.image).astype(int)
    inside = np.zeros(arr.shape[:2], bool)
    inside[y0:y1, x0:x1] = True
    assert (arr[inside][:, 1] > 150).all()  # the donor's green everywhere in the box
    assert (arr[~inside] == (10, 20, 30)).all()  # background untouched elsewhere
    # The query is the donor region at the donor's resolution, larger than the pasted copy.
    qw, qh = comp.query.size
    assert qw * qh > (x1 - x0) * (y1 - y0)
    assert (np.asarray(comp.query)[..., 1] == 200).all()


def test_adapter_is_the_identity_at_init_and_numpy_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = StageAAdapter(32, rank=4)
    v = torch.rand(10, 32)
    v = v / v.norm(dim=-1, keepdim=True)
    assert np.allclose(apply_adapter(model.weights(), v.numpy()), v.numpy(), atol=1e-6)
    with torch.no_grad():  # make it a non-trivial map
        model.up.normal_(0, 0.3)
        model.log_scale.normal_(0, 0.5)
    expected = model(v).detach().numpy()
    assert not np.allclose(expected, v.numpy(), atol=1e-3)
    assert np.allclose(apply_adapter(model.weights(), v.numpy()), expected, atol=1e-5)
    # safetensors round trip keeps the weights and the metadata.
    path = tmp_path / "a.safetensors"
    save_adapter(path, model.weights(), {"rank": 4})
    weights, meta = load_adapter(path)
    assert meta == {"rank": 4}
    assert np.allclose(apply_adapter(weights, v.numpy()), expected, atol=1e-5)


def test_load_adapter_rejects_other_safetensors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(path))
    with pytest.raises(ValueError, match="not a Stage A adapter"):
        load_adapter(path)


def _toy_split(rng: np.random.Generator, n: int, dim: int = 48, crops: int = 6) -> dict[str, np.ndarray]:
    """Composites whose clutter fires channels 0-7 strongly, as do the queries' noise: down-weighting them helps."""
    objects = rng.random((n, dim)) * (np.arange(dim) >= 8)
    all_crops, offsets = [], [0]
    for i in range(n):
        clutter = rng.random((crops - 1, dim)) * 0.3
        clutter[:, :8] += 3.0 * rng.random((crops - 1, 8))
        c = np.concatenate([objects[i][None] + 0.05 * rng.random((1, dim)), clutter])
        all_crops.append(c / np.linalg.norm(c, axis=1, keepdims=True))
        offsets.append(offsets[-1] + crops)
    q = objects + 0.2 * rng.random((n, dim))
    q[:, :8] += 2.0 * rng.random((n, 8))
    return {"crops": np.concatenate(all_crops).astype(np.float16), "offsets": np.asarray(offsets),
            "queries": (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float16),
            "boxes": np.zeros((n, 4), np.float32), "areas": np.zeros(n, np.float32), "best_iou": np.ones(n, np.float32)}


def test_training_lowers_the_loss_and_beats_the_identity_on_a_toy_cache():
    rng = np.random.default_rng(0)
    cache = {"train": _toy_split(rng, 256), "val": _toy_split(rng, 128)}
    cfg = StageAConfig(rank=8, epochs=15, patience=15, batch_size=64, lr=3e-3, max_crops=6)
    logs = []
    model, info = train_stagea(cache, cfg, log=logs.append)
    x, m, q = padded(cache["train"], cfg.max_crops)
    with torch.no_grad():
        trained = info_nce(model, x, m, q, cfg.pool_p, cfg.temperature).item()
        identity = info_nce(StageAAdapter(x.shape[-1], cfg.rank), x, m, q, cfg.pool_p, cfg.temperature).item()
    assert trained < identity - 0.1
    assert info["best_epoch"] > 0
    hist = info["history"]
    assert hist[info["best_epoch"]]["objects_mrr"] > hist[0]["objects_mrr"]
    assert len(logs) >= 2


def test_fused_descriptor_has_finite_gradients_when_a_channel_is_zero_in_every_crop():
    """At p = 8 a channel that ReLU zeroes in every crop underflowed to 0 under the root: NaN training."""
    x = torch.rand(3, 5, 16) * 0.3
    x[:, :, 3] = 0.0
    m = torch.ones(3, 5)
    m[1, 3:] = 0.0
    x.requires_grad_(True)
    out = stagea.fuse_torch(x, m, 8.0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    from finegrain.objects.descriptor import fuse

    ref = np.stack([fuse(x[i][m[i] > 0].detach().numpy(), 8.0) for i in range(3)])
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=1e-6)


def test_a_diverged_model_never_scores_as_perfect():
    scores = torch.tensor([[float("nan"), 0.1, 0.2], [0.3, 0.9, 0.1], [0.0, 0.0, float("nan")]])
    assert stagea.true_ranks(scores).tolist() == [2.0, 0.0, 2.0]


def test_training_stops_at_a_non_finite_loss_and_keeps_the_best_epoch(monkeypatch):
    rng = np.random.default_rng(0)
    cache = {"train": _toy_split(rng, 128), "val": _toy_split(rng, 64)}
    cfg = StageAConfig(rank=4, epochs=5, patience=5, batch_size=64, max_crops=6)
    real = stagea.info_nce
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss if len(calls) <= 2 else loss * float("nan")  # epoch 1 trains, epoch 2 diverges

    monkeypatch.setattr(stagea, "info_nce", diverging)
    model, info = train_stagea(cache, cfg, log=lambda *_: None)
    hist = info["history"]
    assert hist[-1].get("diverged") and hist[-1]["epoch"] == 2 and len(hist) == 3
    assert info["best_epoch"] in (0, 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_build_cache_uses_only_train_images_and_holds_out_the_validation_ones(tiny_flickr, tmp_path, monkeypatch):
    seen = []
    real_load = stagea.load_image

    def spy(path, *a, **k):
        seen.append(path.name)
        return real_load(path, *a, **k)

    monkeypatch.setattr(stagea, "load_image", spy)
    cfg = CacheConfig(n_train=3, n_val=2, holdout=4)
    cache = build_cache(tiny_flickr, tmp_path / "cache", cfg, show_progress=False, log=lambda *_: None)
    dev = set((tiny_flickr / "splits" / "dev.txt").read_text().split())
    train = (tiny_flickr / "splits" / "train.txt").read_text().split()
    assert seen and not set(seen) & dev
    val_seen = set(seen[:4])  # the validation split is built first: 2 composites x (background, donor)
    assert val_seen <= set(train[-4:]) and not set(seen[4:]) & set(train[-4:])
    for split, n in (("train", 3), ("val", 2)):
        s = cache[split]
        assert len(s["queries"]) == n and len(s["offsets"]) == n + 1
        assert s["crops"].shape == (s["offsets"][-1], 1280)
        norms = np.linalg.norm(np.asarray(s["crops"], np.float32), axis=1)
        assert np.allclose(norms, 1.0, atol=1e-2)
    # A second call with the same settings reuses the cache without decoding anything.
    seen.clear()
    build_cache(tiny_flickr, tmp_path / "cache", cfg, show_progress=False, log=lambda *_: None)
    assert seen == []
