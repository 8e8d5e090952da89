"""The SigLIP adapter on tiny random SiglipModels built offline (a tokenizer.json one and a SentencePiece one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain import Index, encoders
from finegrain.encoders.clip import ModelWeightsMissing
from finegrain.encoders.siglip import SiglipEncoder
from fgcli import fg as fg_in_process  # noqa: E402  (tests/ is on sys.path)

DIM = 32
IMAGE_SIZE = 32
PATCH = 8
CONTEXT = 16
WORDS = ("a an the photo of cat dog astronaut cup coffee rocket coins man with camera red blue car beach sunset "
         "people picture").split()
HOW_TO_SUPPLY = ("huggingface-cli download", "SiglipModel", "save_pretrained", "siglip:/")


def _save_tiny_model(folder: Path, vocab_size: int, pad_id: int, eos_id: int) -> None:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CONTEXT, pad_token_id=pad_id,
                         eos_token_id=eos_id),
        vision_config=dict(hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=PATCH),
    )
    SiglipModel(config).eval().save_pretrained(str(folder))


def build_tiny_siglip(folder: Path) -> Path:
    """A random tiny SiglipModel with a word-level ``tokenizer.json`` (the SigLIP 2 layout: no sentencepiece)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                            model_max_length=CONTEXT).save_pretrained(str(folder))
    _save_tiny_model(folder, len(vocab), 0, 1)
    return folder


def build_tiny_siglip_spiece(folder: Path) -> Path:
    """A random tiny SiglipModel with a SentencePiece ``spiece.model`` trained here (the SigLIP 1 layout)."""
    spm = pytest.importorskip("sentencepiece", reason="the siglip extra (sentencepiece) is not installed")
    from transformers import SiglipTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    corpus.unlink()
    (folder / "spiece.vocab").unlink()
    tokenizer = SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=CONTEXT)
    tokenizer.save_pretrained(str(folder))
    _save_tiny_model(folder, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"))


@pytest.fixture(scope="module")
def encoder(tiny_folder) -> SiglipEncoder:
    return SiglipEncoder(model=str(tiny_folder))


def _images() -> list[Image.Image]:
    from skimage import data

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    return [noise, Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]


def _assert_unit_rows(x: np.ndarray, n: int) -> None:
    assert x.shape == (n, DIM) and x.dtype == np.float32 and np.all(np.isfinite(x))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_registry_and_attributes(encoder, tiny_folder):
    assert "siglip" in encoders.list_encoders()
    made = encoders.create(f"siglip:{tiny_folder}", cache=False)
    assert isinstance(made, SiglipEncoder) and made.name == f"siglip:{tiny_folder}"
    assert (encoder.dim, encoder.image_size, encoder.max_text_tokens) == (DIM, IMAGE_SIZE, CONTEXT)
    with pytest.raises(KeyError, match="name a SigLIP model"):
        encoders.create("siglip")


def test_preprocess_uses_siglip_normalisation(encoder):
    arr = encoder.preprocess(Image.new("RGB", (100, 30), (255, 0, 128)))
    assert arr.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(arr[:, 5, 5], [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-5)  # mean = std = 0.5


def test_text_is_padded_to_the_full_context(encoder):
    """SigLIP pools the last position: an embedding must not depend on the other texts in its batch."""
    alone = encoder.encode_texts(["a cat"])
    with_long = encoder.encode_texts(["a cat", "a photo of an astronaut with a red car on the beach"])
    _assert_unit_rows(with_long, 2)
    np.testing.assert_allclose(with_long[0], alone[0], atol=1e-5)
    # and it matches the model run by hand on max_length padding without a mask (the reference usage)
    ids = encoder.tokenizer(["a cat"], padding="max_length", max_length=CONTEXT, return_tensors="pt")["input_ids"]
    assert ids.shape == (1, CONTEXT)
    with torch.inference_mode():
        ref = encoder.model.text_model(input_ids=ids).pooler_output.numpy()
    np.testing.assert_allclose(alone[0], ref[0] / np.linalg.norm(ref[0]), atol=1e-5)
    assert not np.allclose(with_long[0], with_long[1])
    long_text = " ".join(["cat"] * 100)  # truncated at the context
    _assert_unit_rows(encoder.encode_texts([long_text]), 1)


def test_images_regions_and_feature_maps(encoder):
    images = _images()
    a = encoder.encode_images(images, batch_size=2)
    _assert_unit_rows(a, len(images))
    np.testing.assert_allclose(a, encoder.encode_images(images, batch_size=3), atol=1e-5)
    with torch.inference_mode():
        pixels = torch.from_numpy(np.stack([encoder.preprocess(im) for im in images]))
        ref = encoder.model.vision_model(pixel_values=pixels).pooler_output.numpy()
    np.testing.assert_allclose(a, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    fmap = encoder.feature_maps(images)
    assert fmap.shape == (len(images), DIM, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH)  # no CLS token to drop
    _assert_unit_rows(encoder.project(fmap.mean(axis=(2, 3))), len(images))
    assert encoder.feature_maps(images[:1], size=48).shape[-2:] == (6, 6)
    assert "torchvision" not in sys.modules


def test_match_probability_is_the_sigmoid_of_the_scaled_cosine(encoder):
    scale, bias = float(encoder.model.logit_scale.detach().exp()), float(encoder.model.logit_bias.detach())
    cos = np.array([-0.5, 0.0, 0.1, 0.9])
    expected = 1 / (1 + np.exp(-(scale * cos + bias)))
    np.testing.assert_allclose(encoder.match_probability(cos), expected, rtol=1e-6)
    assert np.all(np.diff(encoder.match_probability(cos)) > 0)  # monotone: ranking by cosine is the same


def test_sentencepiece_tokenizer_checkpoint(tmp_path):
    folder = build_tiny_siglip_spiece(tmp_path / "spiece")
    assert (folder / "spiece.model").is_file() and not (folder / "tokenizer.json").exists()
    enc = SiglipEncoder(model=str(folder))
    assert type(enc.tokenizer).__name__ == "SiglipTokenizer"
    _assert_unit_rows(enc.encode_texts(["a photo of a cat", "coffee"]), 2)


def test_missing_weights_say_how_to_supply_them(tmp_path, tiny_folder, monkeypatch):
    missing = tmp_path / "no-such-siglip"
    with pytest.raises(ModelWeightsMissing) as info:
        encoders.create(f"siglip:{missing}", cache=False)
    msg = str(info.value)
    assert msg.startswith("SigLIP model") and str(missing) in msg
    assert all(hint in msg for hint in HOW_TO_SUPPLY), msg

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_folder / "config.json", partial / "config.json")
    with pytest.raises(ModelWeightsMissing, match="no weights file.*no tokenizer files .tokenizer.json or spiece"):
        SiglipEncoder(model=str(partial))

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelWeightsMissing) as info:
        SiglipEncoder(model="google/siglip-base-patch16-224")
    msg = str(info.value)
    assert "is not in the cache" in msg and str(tmp_path / "hf" / "hub") in msg
    assert "huggingface-cli download google/siglip-base-patch16-224" in msg


def test_cli_missing_model_is_one_line(tmp_path, photos_dir):
    out = fg("index", photos_dir, "--index", tmp_path / "idx", "--encoder", f"siglip:{tmp_path / 'nothing'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "SigLIP model" in out.stderr and "finegrain never downloads weights" in out.stderr


def test_index_and_search_end_to_end(tmp_path, tiny_folder, photos_dir):
    """finegrain index/search with siglip:<folder>: text and image queries, through the CLI and the API."""
    idx = tmp_path / "idx"
    spec = f"siglip:{tiny_folder}"
    out = fg("index", photos_dir, "--index", idx, "--encoder", spec, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["indexed"] == 6
    out = fg("search", "--index", idx, "--image", photos_dir / "coffee.jpg", "--format", "jsonl", "-k", "2")
    assert out.returncode == 0, out.stderr
    hits = [json.loads(line) for line in out.stdout.splitlines()]
    assert Path(hits[0]["path"]).name == "coffee.jpg" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    out = fg("search", "--index", idx, "--text", "a photo of a cat", "--format", "jsonl", "-k", "6")
    assert out.returncode == 0, out.stderr
    cli_paths = [json.loads(line)["path"] for line in out.stdout.splitlines()]

    index = Index.open(idx)
    try:
        assert index.info()["encoder"] == spec
        api = index.search(text="a photo of a cat", k=6)
        assert [h.path for h in getattr(api, "hits", api)] == cli_paths
        enc = encoders.create(spec)
        vectors = enc.encode_images(sorted(photos_dir.iterdir()))
        scores, _ = index.search_vectors(enc.encode_texts(["a photo of a cat"]), k=6)
        np.testing.assert_allclose(sorted(scores[0], reverse=True),
                                   sorted((vectors @ enc.encode_texts(["a photo of a cat"])[0]), reverse=True),
                                   atol=1e-4)
    finally:
        index.close()


def fg(*args, timeout=300):
    # in-process: the same command-line code without an interpreter start
    return fg_in_process(*args, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
