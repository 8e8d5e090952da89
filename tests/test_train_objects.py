"""`finegrain train-objects` and indexes built with a Stage A object adapter (`index --object-adapter`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fgcli import fg

from finegrain.index import Index
from finegrain.objects.adapter import ADAPTER_FILE, AdapterError, apply_adapter, file_digest, read_adapter
from finegrain.objects.config import ObjectConfig
from finegrain.objects.descriptor import fuse
from finegrain.retrieval import Query
from finegrain.retrieval.objects import embed_object_query
from finegrain.train.stagea import StageAAdapter, save_adapter

TINY = ["--composites", "6", "--val-composites", "4", "--holdout", "2", "--epochs", "2", "--rank", "4",
        "--no-progress"]


@pytest.fixture(scope="module")
def trained(photos_dir, tmp_path_factory) -> tuple[Path, dict]:
    """One tiny training run on the six photos (shared by the tests that read its output)."""
    tmp = tmp_path_factory.mktemp("trainobj")
    out = tmp / "a.safetensors"
    r = fg("train-objects", "--images", photos_dir, "--out", out, "--cache-dir", tmp / "cache", *TINY, "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory) -> Path:
    """A clearly non-identity 1280-d adapter (a trained one may legitimately be the identity)."""
    torch.manual_seed(0)
    model = StageAAdapter(1280, rank=4)
    with torch.no_grad():
        model.up.normal_(0, 0.5)
        model.log_scale.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("adapter") / "rand.safetensors"
    save_adapter(path, model.weights(), {"encoder": "effnet-minilm"})
    return path


@pytest.fixture(scope="module")
def indexes(photos_dir, adapter_file, tmp_path_factory) -> tuple[Path, Path]:
    """The same photos indexed with objects, without and with the adapter."""
    tmp = tmp_path_factory.mktemp("objidx")
    plain, adapted = tmp / "plain", tmp / "adapted"
    for path, extra in ((plain, []), (adapted, ["--object-adapter", adapter_file])):
        r = fg("index", photos_dir, "--index", path, "--objects", "regions", "--json", *extra)
        assert r.returncode == 0, r.stderr
    return plain, adapted


def test_train_objects_on_own_photos_writes_an_adapter_and_its_summary(trained, photos_dir):
    out, summary = trained
    weights, meta = read_adapter(out)
    assert weights["log_scale"].shape == (1280,) and weights["down"].shape == (1280, 4)
    assert meta["encoder"] == "effnet-minilm" and meta["chosen_epoch"] == summary["chosen_epoch"]
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["sha256"] == file_digest(out) == summary["sha256"]
    # Validation = the last two photos by path only; the other four make the training composites.
    last_two = sorted(str(p) for p in photos_dir.iterdir())[-2:]
    assert sorted(summary["val_images"]) == last_two and summary["train_images"] == 4
    assert summary["composites"] == {"train": 6, "val": 4}
    assert summary["epochs_run"] == 2 and 0 <= summary["chosen_epoch"] <= 2
    assert set(summary["val_before"]) == {"objects_mrr", "objects_r1", "objects_max_mrr", "objects_max_r1"}
    assert summary["val_after"] == {k: round(summary["history"][summary["chosen_epoch"]][k], 4)
                                    for k in summary["val_after"]}
    assert summary["source"]["kind"] == "images" and summary["select"] == "objects-max"
    # The paired gain is the MRR difference, per mode; the default rule reads it.
    for mode in ("objects", "objects_max"):
        gain = summary["val_after"][f"{mode}_mrr"] - summary["val_before"][f"{mode}_mrr"]
        assert summary["val_gain"][mode]["gain"] == pytest.approx(gain, abs=2e-3)
    assert isinstance(summary["validation_wins"], bool)


def test_the_default_rule_needs_a_real_objects_max_gain_and_no_objects_loss():
    from finegrain.train.objects import validation_wins

    def paired(g_max, se_max, g_obj):
        return {"objects_max": {"gain": g_max, "se": se_max}, "objects": {"gain": g_obj, "se": 0.01}}

    assert validation_wins(paired(0.03, 0.01, 0.0))
    assert not validation_wins(paired(0.0001, 0.0, 0.01))  # a negligible gain with no spread (rank-0 runs)
    assert not validation_wins(paired(0.015, 0.01, 0.05))  # within twice its standard error
    assert not validation_wins(paired(0.03, 0.01, -0.001))  # objects loses


def test_an_index_with_the_adapter_stores_adapted_vectors_and_adapts_queries(indexes, adapter_file, photos_dir):
    plain, adapted = Index.open(indexes[0]), Index.open(indexes[1])
    weights, _ = read_adapter(adapter_file)
    cfg = adapted.snapshot.object_config
    assert cfg is not None and cfg.adapter == file_digest(adapter_file)
    assert file_digest(indexes[1] / ADAPTER_FILE) == cfg.adapter  # self-contained copy
    assert plain.snapshot.object_config == ObjectConfig()
    assert "adapter" not in plain.snapshot.settings["objects"]  # the no-adapter settings are as before
    by_name = {}
    for idx in (plain, adapted):
        rows, mean = idx.fields["objects"], idx.fields["objects_mean"]
        names = {i: Path(r.path).name for i, r in idx.snapshot.records.items()}
        per = {}
        for i, name in names.items():
            crops = np.asarray(rows.vectors)[np.asarray(rows.owners) == i]
            per[name] = (crops, np.asarray(mean.vectors)[np.asarray(mean.owners) == i][0])
        by_name[idx is adapted] = per
    for name, (raw, _) in by_name[False].items():
        crops, desc = by_name[True][name]
        assert crops.shape == raw.shape
        assert np.allclose(crops, apply_adapter(weights, raw), atol=2e-3)  # fp16-free: both computed the same way
        assert np.allclose(desc, fuse(apply_adapter(weights, raw), cfg.pool_p), atol=2e-3)
        assert not np.allclose(crops, raw, atol=1e-2)
    # Object-mode queries go through the adapter; the rankings' scores differ from the plain index.
    query = photos_dir / "coffee.jpg"
    raw_q = embed_object_query(plain.snapshot, Query(image=query))
    assert np.allclose(embed_object_query(adapted.snapshot, Query(image=query)), apply_adapter(weights, raw_q),
                       atol=1e-4)
    for mode in ("objects", "objects-max"):
        a = adapted.search(image=query, mode=mode, k=6)
        p = plain.search(image=query, mode=mode, k=6)
        assert len(a.hits) == len(p.hits) == 6
        assert [h.score for h in a.hits] != pytest.approx([h.score for h in p.hits], abs=1e-3)
    r = fg("search", "--index", indexes[1], "--image", query, "--bbox", "10", "10", "200", "200",
           "--mode", "objects-max", "--json")
    assert r.returncode == 0, r.stderr


def test_an_index_without_an_adapter_cannot_get_one_and_one_with_it_keeps_it(indexes, adapter_file, photos_dir):
    r = fg("index", photos_dir, "--index", indexes[0], "--objects", "regions", "--object-adapter", adapter_file)
    assert r.returncode == 2 and "created with other settings" in r.stderr and "adapter" in r.stderr
    assert not (indexes[0] / ADAPTER_FILE).exists()
    # Adding to the adapter index with no options (or the same adapter) uses the stored one.
    r = fg("index", photos_dir, "--index", indexes[1], "--objects", "regions", "--object-adapter", adapter_file,
           "--json")
    assert r.returncode == 0, r.stderr
    r = fg("index", photos_dir, "--index", indexes[1], "--objects", "regions", "--json")
    assert r.returncode == 2 and "created with other settings" in r.stderr


def test_bad_adapter_files_give_one_line_errors(photos_dir, tmp_path, adapter_file):
    from safetensors.numpy import save_file

    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(adapter_file.read_bytes()[:1000])
    other = tmp_path / "other.safetensors"
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(other))
    for path, message in ((truncated, "damaged"), (other, "not a Stage A adapter"),
                          (tmp_path / "none.safetensors", "does not exist")):
        with pytest.raises(AdapterError, match=message):
            read_adapter(path)
        r = fg("index", photos_dir, "--index", tmp_path / "idx", "--objects", "regions", "--object-adapter", path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "idx").exists()
    r = fg("index", photos_dir, "--index", tmp_path / "idx", "--object-adapter", adapter_file)
    assert r.returncode == 2 and "needs --objects" in r.stderr
    r = fg("index", photos_dir, "--index", tmp_path / "set", "--objects", "regions", "--object-adapter", adapter_file,
           "--engine", "ray", "--into-set")
    assert r.returncode == 2 and "--into-set" in r.stderr and not (tmp_path / "set").exists()


def test_a_changed_adapter_copy_in_the_index_is_refused(indexes, photos_dir, tmp_path):
    copy = tmp_path / "idx"
    shutil.copytree(indexes[1], copy)
    (copy / ADAPTER_FILE).write_bytes((copy / ADAPTER_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    r = fg("search", "--index", copy, "--image", photos_dir / "coffee.jpg", "--mode", "objects")
    assert r.returncode != 0 and "does not match the index" in r.stderr and "Traceback" not in r.stderr
    (copy / ADAPTER_FILE).unlink()
    r = fg("search", "--index", copy, "--image", photos_dir / "coffee.jpg", "--mode", "objects-max")
    assert r.returncode != 0 and "is missing" in r.stderr


def test_train_objects_option_and_data_errors(photos_dir, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(photos_dir.iterdir())[:3]:
        shutil.copy(p, few / p.name)
    out = tmp_path / "a.safetensors"
    cases = [
        (["--images", few], "too few images: 3"),
        (["--data", tmp_path / "nothing"], "not a Flickr8k folder"),
        (["--images", tmp_path / "nothing"], "no folder"),
        (["--images", photos_dir, "--select", "best"], "--select must be one of"),
        (["--images", photos_dir, "--data", photos_dir], "exactly one of"),
        ([], "exactly one of"),
        (["--images", photos_dir, "--holdout", "5"], "--holdout must leave"),
        (["--images", photos_dir, "--rank", "-1"], "--rank"),
        (["--images", photos_dir, "--encoder", "nope"], "unknown encoder 'nope'"),
    ]
    for args, message in cases:
        r = fg("train-objects", "--out", out, "--cache-dir", tmp_path / "c", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = fg("train-objects", "--out", tmp_path / "a.bin", "--images", photos_dir, "--cache-dir", tmp_path / "c")
    assert r.returncode == 2 and "must end in .safetensors" in r.stderr
    assert not out.exists()


def test_object_config_adapter_setting_is_checked():
    with pytest.raises(ValueError, match="SHA-256"):
        ObjectConfig(adapter="abc")
    with pytest.raises(ValueError, match="raw object space"):
        ObjectConfig(adapter="0" * 64, refine_iters=5)
    assert ObjectConfig(adapter="0" * 64).to_dict()["adapter"] == "0" * 64
    assert ObjectConfig.from_dict(ObjectConfig().to_dict()) == ObjectConfig()


def test_index_source_reads_the_index_photos_and_settings_without_its_adapter(indexes, photos_dir):
    from finegrain.train.objects import index_images, split_pool

    paths, encoder, cfg = index_images(indexes[1])
    assert [p.name for p in paths] == sorted(p.name for p in photos_dir.iterdir())
    assert encoder == "effnet-minilm" and cfg == ObjectConfig()  # composites are encoded without the old adapter
    train, val = split_pool(paths, 0, "here")
    assert len(val) == 2 and train + val == paths
    with pytest.raises(ValueError, match="too few images: 3 in here"):
        split_pool(paths[:3], 0, "here")


def test_an_object_index_made_with_older_defaults_takes_more_images_and_crop_size_is_checked(tmp_path, photos_dir):
    """crop_size and pool_p defaults changed (128 -> 192, 5 -> 8): `index --objects regions` on an index made
    before must add to it, not refuse it; an explicit --object-crop-size that differs is refused."""
    old = tmp_path / "old.fg"
    Index.create(old, objects=ObjectConfig(crop_size=128, pool_p=5.0, max_objects=2))
    first = sorted(photos_dir.iterdir())
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(first[0], src / first[0].name)
    r = fg("index", src, "--index", old, "--objects", "regions", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["indexed"] == 1
    assert Index.open(old).snapshot.settings["objects"]["crop_size"] == 128
    r = fg("index", src, "--index", old, "--objects", "regions", "--object-crop-size", "160")
    assert r.returncode == 2 and "created with other settings" in r.stderr and "crop_size" in r.stderr
    r = fg("index", src, "--index", tmp_path / "new.fg", "--object-crop-size", "160")
    assert r.returncode == 2 and "needs --objects" in r.stderr
