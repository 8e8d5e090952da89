"""The bundled text tower in plain torch equals transformers' BertModel on the same weights and texts."""

from __future__ import annotations

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
