"""Both generations of the bundled model share one plumbing (``EffNetMiniLMBase``); each keeps what differs."""

from __future__ import annotations

import pytest
import torch

from finegrain.encoders.effnet_minilm import EffNetMiniLM, EffNetMiniLMBase
from finegrain.encoders.effnet_minilm_v2 import DEFAULT_WEIGHTS_V2, EffNetMiniLMV2


@pytest.mark.parametrize("cls,what,command", [
    (EffNetMiniLM, "aligner weights", "`finegrain train-aligner --data ../shared/data/flickr8k`"),
    (EffNetMiniLMV2, "effnet-minilm-v2 weights",
     "`finegrain train-aligner --recipe v2 --data ../shared/data/flickr8k`"),
])
def test_missing_weights_name_the_command_that_trains_them(cls, what, command, tmp_path):
    threads = torch.get_num_threads()
    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        cls(weights=missing, threads=threads + 1)
    assert str(err.value) == f"{what} not found at {missing}; train them with {command} or pass weights=PATH"
    assert torch.get_num_threads() == threads  # nothing changed before the check


@pytest.mark.parametrize("cls", [EffNetMiniLM, EffNetMiniLMV2])
def test_both_generations_share_the_plumbing(cls):
    assert issubclass(cls, EffNetMiniLMBase) and cls.image_size == 224
    for hook in ("text_tower", "prepare_image", "feature_map_batch", "embed_image_batch", "pool_regions"):
        assert getattr(cls, hook) is getattr(EffNetMiniLMBase, hook), hook


@pytest.mark.skipif(not DEFAULT_WEIGHTS_V2.exists(), reason="v2 weights not trained yet")
def test_v2_merges_its_text_state_into_minilm_once(monkeypatch):
    """v2 differs in the text tower: MiniLM with the shipped state merged, once, on the first text."""
    import finegrain.encoders.effnet_minilm_v2 as v2

    calls: list[tuple[object, set[str]]] = []
    model = torch.nn.Linear(1, 1).train()
    monkeypatch.setattr(v2, "load_minilm", lambda: ("tokenizer", model))
    monkeypatch.setattr(v2, "apply_text_state", lambda m, state: calls.append((m, set(state))))
    enc = EffNetMiniLMV2(threads=torch.get_num_threads())
    assert not calls  # loaded on the first text, not with the image tower
    assert enc.text_tower() == ("tokenizer", model) and enc.text_tower() == ("tokenizer", model)
    assert calls == [(model, set(v2.load_v2(DEFAULT_WEIGHTS_V2)[1]))] and not model.training
