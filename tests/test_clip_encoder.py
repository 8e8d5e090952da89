"""Tests for the Hugging Face CLIP adapter, on a tiny random CLIP built offline."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.encoders.clip import ALIASES, CLIPEncoder, ModelWeightsMissing

DIM = 16
IMAGE_SIZE = 32
PATCH = 8
WIDTH = 32
HOW_TO_SUPPLY = ("huggingface-cli download", "save_pretrained", "clip:/")


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable characters, one per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tiny_clip(folder: Path) -> Path:
    """Save a random tiny CLIPModel, a byte-level CLIP tokenizer and a preprocessor config."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"] = bos
    vocab["<|endoftext|>"] = eos
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer.from_pretrained(str(folder), local_files_only=True).save_pretrained(str(folder))

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=PATCH),
        projection_dim=DIM,
    )
    CLIPModel(config).eval().save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": {"shortest_edge": IMAGE_SIZE},
    }))
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def encoder(tiny_folder) -> CLIPEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return CLIPEncoder(model=str(tiny_folder))


def _images() -> list[Image.Image]:
    from skimage import data

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (20, 1)), mode="L")
    return [noise, gradient, Image.fromarray(data.astronaut())]


def _assert_unit_rows(x: np.ndarray, n: int, dim: int) -> None:
    assert x.shape == (n, dim)
    assert x.dtype == np.float32
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_attributes(encoder, tiny_folder):
    assert encoder.dim == DIM
    assert encoder.image_size == IMAGE_SIZE
    assert encoder.name == f"clip:{tiny_folder}"
    assert encoder.hub_id is None


def test_preprocess_squash_resize_and_normalise(encoder):
    arr = encoder.preprocess(Image.new("RGB", (100, 30), (255, 0, 128)))
    assert arr.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and arr.dtype == np.float32
    expected = (np.array([1.0, 0.0, 128 / 255]) - encoder.mean.ravel()) / encoder.std.ravel()
    np.testing.assert_allclose(arr[:, 5, 5], expected, atol=1e-5)


def test_encode_texts(encoder):
    texts = ["a photo of an astronaut", "a cat", "x" * 300]  # the last one must be truncated at 77 tokens
    a = encoder.encode_texts(texts)
    b = encoder.encode_texts(texts)
    _assert_unit_rows(a, 3, DIM)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])
    # Order is preserved despite length sorting inside encode_texts.
    np.testing.assert_allclose(encoder.encode_texts(["a cat"])[0], a[1], atol=1e-5)


def test_encode_images(encoder):
    images = _images()
    a = encoder.encode_images(images, batch_size=2)
    b = encoder.encode_images(images, batch_size=3)
    _assert_unit_rows(a, len(images), DIM)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert encoder.encode_images([]).shape == (0, DIM)
    pixels = np.stack([encoder.preprocess(im) for im in images])
    np.testing.assert_allclose(encoder.encode_pixels(pixels), a, atol=1e-5)
    assert "torchvision" not in sys.modules


def test_feature_maps_and_project(encoder):
    images = _images()
    fmap = encoder.feature_maps(images)
    side = IMAGE_SIZE // PATCH
    assert fmap.shape == (len(images), WIDTH, side, side)
    assert fmap.dtype == np.float32
    projected = encoder.project(fmap.mean(axis=(2, 3)))
    _assert_unit_rows(projected, len(images), DIM)


def test_feature_maps_other_size(encoder):
    fmap = encoder.feature_maps(_images()[:1], size=48)
    assert fmap.shape == (1, WIDTH, 48 // PATCH, 48 // PATCH)


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as info:
        CLIPEncoder(model=str(missing))
    assert isinstance(info.value, ModelWeightsMissing)
    msg = str(info.value)
    assert str(missing) in msg
    assert all(hint in msg for hint in HOW_TO_SUPPLY)


def test_folder_without_weights(tmp_path, tiny_folder):
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(tiny_folder / "config.json", folder / "config.json")
    with pytest.raises(ModelWeightsMissing, match="no weights file"):
        CLIPEncoder(model=str(folder))


def test_missing_hub_id(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as info:
        CLIPEncoder(model="someorg/clip-not-cached")
    msg = str(info.value)
    assert "someorg/clip-not-cached" in msg
    assert str(tmp_path / "hf" / "hub") in msg
    assert all(hint in msg for hint in HOW_TO_SUPPLY)


def test_alias_not_cached_names_hub_id(tmp_path):
    assert ALIASES["ViT-B-32/openai"] == "openai/clip-vit-base-patch32"
    assert ALIASES["ViT-B-16/openai"] == "openai/clip-vit-base-patch16"
    assert ALIASES["ViT-L-14/openai"] == "openai/clip-vit-large-patch14"
    with pytest.raises(ModelWeightsMissing) as info:
        CLIPEncoder(model="ViT-B-32/openai", cache_dir=tmp_path / "empty-cache")
    msg = str(info.value)
    assert "ViT-B-32/openai" in msg
    assert "openai/clip-vit-base-patch32" in msg
    assert "huggingface-cli download openai/clip-vit-base-patch32" in msg


def test_hub_id_and_alias_from_cache(tmp_path, monkeypatch, tiny_folder, encoder):
    # Lay out a Hugging Face hub cache by hand, as `huggingface-cli download` would.
    cache = tmp_path / "hub"
    repo = cache / "models--openai--clip-vit-base-patch32"
    shutil.copytree(tiny_folder, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    by_alias = CLIPEncoder(model="ViT-B-32/openai")
    assert by_alias.hub_id == "openai/clip-vit-base-patch32"
    assert by_alias.name == "clip:ViT-B-32/openai"
    np.testing.assert_allclose(by_alias.encode_texts(["a cat"]), encoder.encode_texts(["a cat"]), atol=1e-6)
    assert CLIPEncoder(model="openai/clip-vit-base-patch32").dim == DIM


def test_registry_and_index_with_clip(tiny_folder, tmp_path, photos_dir):
    """The registry name ``clip:<folder>`` builds the adapter, and an index runs on it end to end."""
    from finegrain import Index, encoders

    enc = encoders.create(f"clip:{tiny_folder}", cache=False)
    assert enc.dim == DIM
    with pytest.raises(KeyError, match="name a CLIP model"):
        encoders.create("clip")
    index = Index.create(tmp_path / "clip-index", encoder=f"clip:{tiny_folder}")
    assert index.add([photos_dir]).indexed == 6
    hits = Index.open(tmp_path / "clip-index").search(text="a cat", k=3)
    assert len(hits) == 3 and hits[0].score >= hits[-1].score
