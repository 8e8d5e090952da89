"""v1's recipe (``train-aligner --recipe v1``) with v2's selection protocol: first N train images train, the last
``val_images`` choose the epoch, dev is only reported (docs/benchmarks.md, the learning curve of issue 19)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from finegrain.train.aligner import TrainConfig, build_cache, selection_items, train_aligner


def test_selection_items_split_the_train_file_in_order():
    train, val = selection_items(6000, TrainConfig(val_images=500, train_images=1000))
    assert train.tolist() == list(range(1000)) and val is not None and val.tolist() == list(range(5500, 6000))
    train, val = selection_items(6000, TrainConfig(val_images=500))
    assert len(train) == 5500 and train[-1] == 5499 and len(val) == 500
    train, val = selection_items(6000, TrainConfig())  # the shipped recipe: every image trains, dev chooses
    assert len(train) == 6000 and val is None
    with pytest.raises(ValueError, match="train_images must be at most 5500"):
        selection_items(6000, TrainConfig(val_images=500, train_images=5501))
    with pytest.raises(ValueError, match="val_images must be below the 6000 train images"):
        selection_items(6000, TrainConfig(val_images=6000))
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(train_images=-1)


def test_v1_chooses_on_the_validation_slice_and_never_trains_on_other_rows(tiny_flickr, tmp_path):
    # tiny_flickr: 18 train images. Rows 6..11 are neither trained on (train_images=6) nor validating (the last 6):
    # poisoned with NaN, any step that read them would make the saved weights NaN.
    cache = tmp_path / "cache"
    build_cache(tiny_flickr, cache, show_progress=False)
    for view in ("orig", "flip"):
        arr = np.load(cache / f"train-{view}.npy")
        arr[6:12] = np.nan
        np.save(cache / f"train-{view}.npy", arr)
    out = tmp_path / "curve.safetensors"
    cfg = TrainConfig(epochs=3, batch_size=4, warmup_steps=1, train_images=6, val_images=6)
    result = train_aligner(tiny_flickr, out, cache, cfg, show_progress=False, log=lambda *_: None)
    assert all(np.isfinite(v).all() for v in load_file(str(out)).values())
    assert result["train_images"] == 6 and {"t2i_r1", "i2t_r1"} <= set(result["val_metrics"])
    assert {"t2i_r1", "t2i_r10"} <= set(result["dev_metrics"])
    # Dev chose nothing: the history holds validation numbers only, and the kept epoch is their best.
    history = result["history"]
    assert all(not any(k.startswith(("t2i", "i2t")) for k in h) for h in history)
    scores = [h["val_t2i_r1"] + h["val_t2i_r5"] + h["val_t2i_r10"] for h in history]
    assert result["best_epoch"] == 1 + int(np.argmax(scores))
    assert "last 6 train images" in json.loads(out.with_suffix(".json").read_text())["selection"]


def test_train_aligner_v1_selection_options_are_checked_in_one_line(tiny_flickr, tmp_path):
    from fgcli import fg

    for args, message in ((["--train-images", "13", "--val-images", "6"], "train_images must be at most 12"),
                          (["--val-images", "18"], "val_images must be below the 18 train images"),
                          (["--train-images", "-2"], ">= 0")):
        result = fg("train-aligner", "--recipe", "v1", "--data", tiny_flickr, "--cache-dir", tmp_path, *args)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # refused before any tower ran


def test_train_aligner_without_a_flickr8k_folder_is_one_line(tmp_path):
    from fgcli import fg

    for recipe in ("v1", "v2"):
        result = fg("train-aligner", "--recipe", recipe, "--data", tmp_path / "nothing", "--cache-dir", tmp_path / "c",
                    "--out", tmp_path / "a.safetensors")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert lines[0].startswith("error: --data: no split 'train' in"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing made
