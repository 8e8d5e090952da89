"""effnet-minilm-v2: the encoder loads offline and embeds; the v2 recipe trains end to end; adapters round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finegrain import encoders
from finegrain.encoders.effnet_minilm_v2 import (
    DEFAULT_WEIGHTS_V2,
    AlignerV2,
    adapt_text_tower,
    apply_text_state,
    load_v2,
    save_v2,
    text_tower_state,
)
from finegrain.encoders.minilm import load_minilm
from finegrain.train.aligner_v2 import TextTop, TrainConfigV2, train_aligner_v2
from finegrain.train.cache_v2 import TEXT_SPLIT, minilm_states


def _train_some(model, params):
    """Move the trainable parameters away from their start, as training would."""
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))


@pytest.mark.parametrize("adapter", ["lora", "delta"])
def test_adapter_round_trips_through_safetensors(adapter, tmp_path):
    tokenizer, model = load_minilm()
    _, base = load_minilm()
    params = adapt_text_tower(model, adapter, layers=2, rank=4)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in model.layers[0].parameters())
    _train_some(model, params)
    ids, mask = tokenizer(["a dog runs on the grass", "two children"], 64)
    with torch.no_grad():
        trained = model(ids, mask)
        assert (trained - base(ids, mask)).abs().max() > 1e-3  # the adapter changes the tower
    out = tmp_path / "v2.safetensors"
    save_v2(out, AlignerV2(), text_tower_state(model, base, adapter), {"model": "effnet-minilm-v2", "dim": 512})
    size = out.stat().st_size
    assert size < (3 * 2**20 if adapter == "lora" else 16 * 2**20)  # small enough for git (heads: 2.1 MB)
    _, state, config = load_v2(out)
    assert config["dim"] == 512 and all(k.startswith(f"text.{adapter}.") for k in state)
    _, fresh = load_minilm()
    apply_text_state(fresh, state)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(ids, mask).numpy(), trained.numpy(), atol=2e-2)  # float16 storage


def test_load_refuses_v1_weights():
    from finegrain.encoders.effnet_minilm import DEFAULT_WEIGHTS

    with pytest.raises(ValueError, match="not effnet-minilm-v2"):
        load_v2(DEFAULT_WEIGHTS)


def test_packed_text_top_matches_the_padded_model():
    tokenizer, model = load_minilm()
    texts = ["a dog", "a man in a red shirt climbs a rock wall", "two girls"]
    ids, mask = tokenizer(texts, 64)
    with torch.no_grad():
        full = model(ids, mask)
        low = minilm_states(model, ids, mask, 0, TEXT_SPLIT)
        lengths = mask.sum(1).numpy()
        packed = torch.cat([low[i, :n] for i, n in enumerate(lengths)])
        top, top_mask = TextTop(model)(packed, lengths)
    assert torch.equal(top_mask, mask)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(top[i, :n].numpy(), full[i, :n].numpy(), atol=1e-4)


@pytest.mark.skipif(not DEFAULT_WEIGHTS_V2.exists(), reason="v2 weights not trained yet")
def test_v2_encoder_loads_offline_and_embeds(photos_dir):
    enc = encoders.create("effnet-minilm-v2", cache=False)
    assert enc.name == "effnet-minilm-v2" and enc.dim == 512
    paths = sorted(photos_dir.iterdir())[:3]
    img = enc.encode_images(paths)
    txt = enc.encode_texts(["a cat", "a rocket"])
    for x, n in ((img, 3), (txt, 2)):
        assert x.shape == (n, 512) and x.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    fmap = enc.feature_maps(paths[:1])
    assert fmap.shape == (1, 1280, 7, 7)
    with torch.no_grad():
        pooled = enc.pool_regions(torch.from_numpy(fmap[0]), torch.ones(1, 7, 7)).numpy()
    np.testing.assert_allclose(enc.project(pooled), img[:1], atol=1e-4)


def test_v2_recipe_trains_end_to_end(tiny_flickr, tmp_path):
    out = tmp_path / "v2.safetensors"
    cfg = TrainConfigV2(epochs=1, batch_size=6, warmup_steps=1, val_images=4, views=1, hard_negative=0.5,
                        region=0.5, region_batch=4, lora_rank=4, phrase_dropout=0.5)
    result = train_aligner_v2(tiny_flickr, out, tmp_path / "cache", cfg, show_progress=False, log=lambda *_: None,
                              cache_views=1)
    assert result["best_epoch"] == 1 and result["recipe"]["region"] == 0.5
    card = json.loads(out.with_suffix(".json").read_text())
    assert {"t2i_r1", "i2t_r1"} <= set(card["dev_metrics"]) and "val_t2i_r1" in card["history"][0]
    enc = encoders.create(f"effnet-minilm-v2:{out}", cache=False)
    emb = enc.encode_texts(["a cat"])
    assert emb.shape == (1, 512) and np.isclose(np.linalg.norm(emb), 1.0, atol=1e-5)


def test_frozen_layers_run_once_give_the_same_states(tmp_path):
    """advance() moves cached states up one frozen layer at a time; the rest of the tower then matches."""
    from finegrain.train.aligner_v2 import Ragged, advance

    tokenizer, model = load_minilm()
    texts = ["a dog", "a man in a red shirt climbs a rock wall", "two girls"]
    ids, mask = tokenizer(texts, 64)
    lengths = mask.sum(1).numpy()
    with torch.no_grad():
        low = minilm_states(model, ids, mask, 0, TEXT_SPLIT)
        full = model(ids, mask)
    np.save(tmp_path / "t.npy", torch.cat([low[i, :n] for i, n in enumerate(lengths)]).half().numpy())
    np.save(tmp_path / "t-offsets.npy", np.r_[0, np.cumsum(lengths)])
    for start in (TEXT_SPLIT + 1, 6):
        states = advance(tmp_path, "t", model, start)
        assert (tmp_path / f"t-L{start}.npy").exists()
        with torch.no_grad():
            top, _ = TextTop(model, start)(states.gather(np.arange(3)), states.lengths(np.arange(3)))
        for i, n in enumerate(lengths):
            np.testing.assert_allclose(top[i, :n].numpy(), full[i, :n].numpy(), atol=0.05)  # float16 cache
    assert isinstance(Ragged(tmp_path, "t"), Ragged)


def test_train_aligner_v2_options_are_checked_in_one_line(tiny_flickr, tmp_path):
    from fgcli import fg

    for args, message in ((["--recipe", "v3"], "--recipe must be v1 or v2"),
                          (["--recipe", "v2", "--text-adapter", "bitfit"], "must be frozen, lora or delta"),
                          (["--recipe", "v2", "--text-layers", "5"], "text_layers must be 0..2")):
        result = fg("train-aligner", "--data", tiny_flickr, "--cache-dir", tmp_path, *args)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_cache_parts_build_only_what_they_name(tiny_flickr, tmp_path):
    """A run without augmented views needs texts, dev and train view 0: each part alone builds only itself."""
    from finegrain.train.cache_v2 import build_cache_v2

    cache = tmp_path / "cache"
    for part, made in (("images:dev", {"dev-v0.npy"}), ("images:0", {"dev-v0.npy", "train-v0.npy"})):
        build_cache_v2(tiny_flickr, cache, views=1, show_progress=False, log=lambda *_: None, only=part)
        assert {p.name for p in cache.glob("*-v?.npy")} == made
    assert not (cache / "manifest.json").exists()  # view 1 and the texts are still missing: not complete
