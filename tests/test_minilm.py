"""The bundled text tower in plain torch equals transformers' BertModel on the same weights and texts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finegrain.encoders.effnet_minilm import TEXT_MAX_TOKENS
from finegrain.encoders.minilm import load_minilm, model_path

TEXTS = ["a cat", "A dog runs on the BEACH, near two children.", "", "café crème brûlée 東京 🙂",
         " ".join(["word"] * 200)]  # empty, accents, CJK, emoji, and one over the token limit


def test_token_ids_and_states_equal_transformers():
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    tokenizer, model = load_minilm()
    ids, mask = tokenizer(TEXTS, TEXT_MAX_TOKENS)
    hf_tok = AutoTokenizer.from_pretrained(str(path))
    enc = hf_tok(TEXTS, padding=True, truncation=True, max_length=TEXT_MAX_TOKENS, return_tensors="pt")
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
    assert ids.shape == (len(TEXTS), TEXT_MAX_TOKENS)  # the long text is truncated
    hf = AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()  # padded positions are never read (masked pooling), so compare the real tokens
    assert (ours[real] - theirs[real]).abs().max().item() < 1e-4


def test_batching_does_not_change_a_text():
    tokenizer, model = load_minilm()
    with torch.no_grad():
        alone = model(*tokenizer(["a cat"], TEXT_MAX_TOKENS))[0]
        batched = model(*tokenizer(["a cat", "a much longer caption about a cat on a sofa"], TEXT_MAX_TOKENS))[0]
    assert (alone - batched[: alone.shape[0]]).abs().max().item() < 1e-5


def test_the_text_precision_comes_from_the_environment(monkeypatch):
    from finegrain.encoders import minilm

    monkeypatch.setenv(minilm.PRECISION_ENV, "float32")
    assert minilm.query_dtype() == torch.float32
    monkeypatch.setenv(minilm.PRECISION_ENV, "bfloat16")
    assert minilm.query_dtype() == torch.bfloat16
    monkeypatch.setenv(minilm.PRECISION_ENV, "auto")
    assert minilm.query_dtype() == (torch.bfloat16 if minilm.native_bf16() else torch.float32)
    monkeypatch.setenv(minilm.PRECISION_ENV, "float16")
    with pytest.raises(ValueError, match=minilm.PRECISION_ENV):
        minilm.query_dtype()


def test_query_embeddings_in_bfloat16_stay_close_to_float32(monkeypatch):
    """The same texts through the encoder with the tower in each precision: same order of candidates."""
    from finegrain import encoders
    from finegrain.encoders import minilm

    texts = ["a black dog runs across the sandy beach", "a black dog", "the sandy beach",
             "two children play football in a park"]
    out = {}
    for precision in ("float32", "bfloat16"):
        monkeypatch.setenv(minilm.PRECISION_ENV, precision)
        enc = encoders.create("effnet-minilm", cache=False)  # a new encoder loads its own tower
        out[precision] = enc.encode_texts(texts)
        assert out[precision].dtype == np.float32
    cos = (out["float32"] * out["bfloat16"]).sum(axis=1)
    assert cos.min() > 0.995 and not np.array_equal(out["float32"], out["bfloat16"])
