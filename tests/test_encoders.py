"""The encoder registry and the bundled effnet-minilm model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain import encoders
from finegrain.encoders.effnet_minilm import DEFAULT_WEIGHTS, aligner_config


@pytest.fixture(scope="module")
def enc():
    return encoders.create("effnet-minilm")


def test_registry_lists_and_rejects():
    assert {"effnet-minilm", "clip"} <= set(encoders.list_encoders())
    with pytest.raises(KeyError, match="unknown encoder 'nope'.*available"):
        encoders.create("nope")
    with pytest.raises(FileNotFoundError, match="train-aligner"):
        encoders.create("effnet-minilm:/no/such/weights.safetensors")


def test_shipped_weights_and_model_card():
    cfg = aligner_config(DEFAULT_WEIGHTS)
    assert cfg["dim"] == 512
    assert DEFAULT_WEIGHTS.stat().st_size < 16 * 2**20  # "a few MB"


def test_embeddings_are_unit_float32_and_deterministic(enc, photos_dir):
    paths = sorted(photos_dir.iterdir())
    a = enc.encode_images(paths, batch_size=4)
    b = enc.encode_images([p.read_bytes() for p in paths], batch_size=3)
    # Opened images skip the reduced-size JPEG decode that paths and bytes get: nearly the same.
    c = enc.encode_images([Image.open(p) for p in paths])
    assert (np.sum(a * c, axis=1) > 0.97).all()
    assert a.shape == (len(paths), enc.dim) and a.dtype == np.float32 and a.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    t = enc.encode_texts(["a cat", "a rocket on the launch pad", "a cat"])
    assert t.shape == (3, enc.dim) and t.dtype == np.float32
    np.testing.assert_allclose(t[0], t[2], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert enc.encode_texts([]).shape == (0, enc.dim)
    with pytest.raises(ValueError):
        enc.encode_texts(["ok", ""])


def test_feature_map_pooling_reproduces_global_embedding(enc, photos_dir):
    """Region embeddings pool the same map: pooling the whole map must equal the image embedding."""
    paths = sorted(photos_dir.iterdir())[:2]
    fmap = enc.feature_maps(paths)
    assert fmap.shape == (2, 1280, 7, 7)
    assert enc.feature_maps(paths[:1], size=320).shape == (1, 1280, 10, 10)
    with torch.no_grad():
        pooled = np.stack([enc.pool_regions(torch.from_numpy(f), torch.ones(1, 7, 7))[0].numpy() for f in fmap])
    np.testing.assert_allclose(enc.project(pooled), enc.encode_images(paths), atol=1e-4)


def test_text_finds_the_right_sample_photo(enc, photos_dir):
    """A real quality check of the trained heads on photos they never saw."""
    paths = sorted(photos_dir.iterdir())
    names = [p.stem for p in paths]
    img = enc.encode_images(paths)
    # In-domain queries for a Flickr8k-trained model (it does not know rockets or astronauts).
    queries = {"a cat": "chelsea", "a man taking a picture": "camera", "coins on a table": "coins",
               "a grey cat with stripes": "chelsea"}
    hits = 0
    for text, expected in queries.items():
        best = names[int(np.argmax(img @ enc.encode_texts([text])[0]))]
        hits += best == expected
    assert hits >= 3, f"only {hits}/4 sample queries found their photo"


def test_v2_weights_file_of_another_kind_says_what_it_holds(tmp_path):
    import json

    from finegrain.encoders.effnet_minilm_v2 import load_v2

    (tmp_path / "objects.json").write_text(json.dumps({"kind": "object-adapter"}))  # e.g. a train-objects file
    with pytest.raises(ValueError, match="holds no encoder weights .*train-aligner --recipe v2"):
        load_v2(tmp_path / "objects.safetensors")
    (tmp_path / "v1.json").write_text(json.dumps({"model": "effnet-minilm"}))
    with pytest.raises(ValueError, match="holds 'effnet-minilm' weights, not effnet-minilm-v2"):
        load_v2(tmp_path / "v1.safetensors")
