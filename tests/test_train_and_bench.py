"""train-aligner and bench flickr8k end to end on a tiny Flickr-shaped folder (real code paths)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finegrain import encoders
from finegrain.bench.flickr8k import run_flickr8k
from finegrain.datasets import load_flickr8k
from finegrain.train.aligner import TrainConfig, build_cache, train_aligner


def test_load_flickr8k_split(tiny_flickr):
    ds = load_flickr8k(tiny_flickr, "dev")
    assert len(ds.images) == 6 and len(ds.captions) == 30
    assert all(0 <= i < 6 for i in ds.caption_image)
    with pytest.raises(FileNotFoundError, match="no split 'test'.*available: dev, train"):
        load_flickr8k(tiny_flickr, "test")


def test_train_aligner_writes_loadable_weights(tiny_flickr, tmp_path):
    out = tmp_path / "heads.safetensors"
    cfg = TrainConfig(epochs=2, batch_size=8, hidden=64, warmup_steps=1)
    result = train_aligner(tiny_flickr, out, tmp_path / "cache", cfg, show_progress=False, log=lambda *_: None)
    assert out.exists() and result["best_epoch"] in (1, 2)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["hidden"] == 64 and {"t2i_r1", "t2i_r10", "i2t_r1"} <= set(card["dev_metrics"])
    enc = encoders.create(f"effnet-minilm:{out}", cache=False)
    emb = enc.encode_texts(["a cat"])
    assert emb.shape == (1, 512) and np.isclose(np.linalg.norm(emb), 1.0, atol=1e-5)
    # A second run reuses the tower caches (each marked complete by its manifest).
    cached = tmp_path / "cache" / "train-orig.npy"
    stamp = cached.stat().st_mtime_ns
    build_cache(tiny_flickr, tmp_path / "cache", show_progress=False)
    assert cached.stat().st_mtime_ns == stamp


def test_bench_flickr8k_reports_all_keys(tiny_flickr, tmp_path):
    result = run_flickr8k(tiny_flickr, "dev", cache_dir=tmp_path, show_progress=False)
    keys = {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "ndcg10",
            "index_images_per_s", "query_ms_p50", "query_ms_p95"}
    assert keys <= set(result)
    for k in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
        assert 0 <= result[k] <= 100
    assert result["t2i_r1"] <= result["t2i_r5"] <= result["t2i_r10"]
    assert result["t2i_r10"] == 100.0  # only 6 images: every caption's image is within the top 10
    assert 0 <= result["ndcg10"] <= 1 and result["index_images_per_s"] > 0
    again = run_flickr8k(tiny_flickr, "dev", cache_dir=tmp_path, show_progress=False)
    assert again["index_reused"] and again["t2i_r1"] == result["t2i_r1"]


def test_bench_flickr8k_on_an_existing_index_with_distractors(tiny_flickr, tmp_path):
    from fgcli import fg

    from finegrain.index import Index

    alone = run_flickr8k(tiny_flickr, "dev", cache_dir=tmp_path / "cache", show_progress=False)
    big = Index.create(tmp_path / "all.fg")
    big.add([tiny_flickr / "images"])  # train + dev: the 18 train images are distractors for the dev captions
    result = run_flickr8k(tiny_flickr, "dev", show_progress=False, index_path=tmp_path / "all.fg")
    assert result["images"] == 6 and result["distractors"] == 18 and result["encoder"] == "effnet-minilm"
    # Exact global search: distractors can only push a caption's image down, never up.
    for k in ("t2i_r1", "t2i_r5", "t2i_r10"):
        assert result[k] <= alone[k]
    assert result["t2i_r10"] < 100.0  # 24 images: some dev image falls out of a caption's top 10
    assert all(result[k] == alone[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10"))  # dev captions only, both ways

    part = Index.create(tmp_path / "part.fg")
    part.add(sorted((tiny_flickr / "images").glob("*_[012].jpg")))  # the train images only
    with pytest.raises(ValueError, match="6 images of the dev split are not in the index"):
        run_flickr8k(tiny_flickr, "dev", show_progress=False, index_path=tmp_path / "part.fg")
    cli = fg("bench", "flickr8k", "--data", tiny_flickr, "--index", tmp_path / "nowhere.fg")
    assert cli.returncode == 2 and "no finegrain index" in cli.stderr and "Traceback" not in cli.stderr
