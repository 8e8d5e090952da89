"""Index fields as extractors: the registry, a toy field added from this file alone, failures, pickling."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from finegrain import fields
from finegrain.decompose.segments import SegmentConfig
from finegrain.fields import Decoded, FieldExtractor
from finegrain.fields.local import LocalField
from finegrain.index import Index
from finegrain.local.store import LocalConfig
from finegrain.objects.config import ObjectConfig
from finegrain.store.vectors import FieldRows, read_chunk

TINY_LOCAL = LocalConfig("cnn", {"image_size": 160, "scales": [1.0, 0.707], "max_features": 60, "threads": 1},
                         fit_images=3)


class ToyColour(FieldExtractor):
    """A toy field: each image's mean colour (3-d), with its brightness as a row attribute."""

    key = "toy"
    label = "toy colour"

    def __init__(self, side: int):
        self.side = side

    @classmethod
    def from_config(cls, config, root: Path) -> ToyColour:
        return cls(int(config["side"]))

    def config_dict(self) -> dict:
        return {"side": self.side}

    @property
    def fields(self) -> tuple[str, ...]:
        return ("toy_colour",)

    def prepare(self, decoded: Decoded, encoder) -> np.ndarray:
        if "coins" in decoded.path:
            raise ValueError("no coins, please")  # one file this field refuses: one skipped file
        small = decoded.image.convert("RGB").resize((self.side, self.side))
        return np.asarray(small, np.float32).reshape(-1, 3).mean(0) / 255.0

    def encode(self, encoder, payloads: list[np.ndarray]) -> list[np.ndarray]:
        return [p / max(float(np.linalg.norm(p)), 1e-6) for p in payloads]

    def rows(self, results: list[np.ndarray], owners: np.ndarray) -> dict[str, FieldRows]:
        if not results:
            return {}
        v = np.stack(results)
        return {"toy_colour": FieldRows(v, owners, {"brightness": v.mean(1).astype(np.float32)})}


class FailsToEncode(ToyColour):
    """Encodes every image but one (the batch fails; retried one image at a time, only that one is skipped)."""

    key = "toy_fragile"
    label = "fragile toy"

    @property
    def fields(self) -> tuple[str, ...]:
        return ("toy_fragile",)

    def prepare(self, decoded: Decoded, encoder) -> tuple[str, np.ndarray]:
        return decoded.path, np.zeros(3, np.float32)

    def encode(self, encoder, payloads):
        if any("rocket" in path for path, _ in payloads):
            raise RuntimeError("rockets are too fast")
        return [np.ones(3, np.float32) for _ in payloads]

    def rows(self, results, owners):
        return {"toy_fragile": FieldRows(np.stack(results), owners)} if results else {}


@pytest.fixture
def toy():
    fields.register(ToyColour)
    yield ToyColour
    fields.unregister(ToyColour.key)


def test_toy_field_registered_from_a_test_file_is_indexed_end_to_end(tmp_path, photos_dir, toy):
    index = Index.create(tmp_path / "idx")
    index.catalog.set_meta("toy", {"side": 8})  # the index's setting that turns the field on
    report = index.add([photos_dir], batch_size=2)
    assert report.indexed == 5
    assert report.failed == [(str(photos_dir / "coins.jpg"), "toy colour failed: no coins, please")]
    assert [f.path for f in index.failures()] == [str(photos_dir / "coins.jpg")]
    chunks = index.catalog.chunks("toy_colour")
    assert chunks and sum(n for _, _, n in chunks) == 5
    stored = FieldRows.concat([read_chunk(index.path, "toy_colour", name) for name, _, _ in chunks], 3)
    assert sorted(stored.owners.tolist()) == sorted(index.records)
    by_id = {int(i): v for i, v in zip(stored.owners, stored.vectors, strict=True)}
    for image_id, rec in index.records.items():  # each row is what the extractor computes for that image
        from PIL import Image

        img = Image.open(rec.path).convert("RGB").resize((8, 8))
        want = np.asarray(img, np.float32).reshape(-1, 3).mean(0) / 255.0
        np.testing.assert_allclose(by_id[image_id], want / np.linalg.norm(want), atol=2e-2)  # decode draft differs
    np.testing.assert_allclose(stored.attrs["brightness"], stored.vectors.mean(1), atol=1e-6)
    assert "toy_colour" in index.fields and len(index.fields["toy_colour"]) == 5  # readable through the index


def test_an_encode_failure_skips_only_the_image_that_caused_it(tmp_path, photos_dir):
    fields.register(FailsToEncode)
    try:
        index = Index.create(tmp_path / "idx")
        index.catalog.set_meta("toy_fragile", {"side": 1})
        report = index.add([photos_dir], batch_size=3)
    finally:
        fields.unregister(FailsToEncode.key)
    assert report.failed == [(str(photos_dir / "rocket.jpg"), "fragile toy failed: rockets are too fast")]
    assert report.indexed == len(index) == 5
    assert len(index.fields["toy_fragile"]) == len(index.fields["global"]) == 5
    np.testing.assert_array_equal(np.sort(index.fields["toy_fragile"].owners), np.sort(index.global_rows.owners))


def test_build_follows_the_index_settings_and_configs_round_trip(tmp_path):
    seg = SegmentConfig(levels=(1, 4))
    obj = ObjectConfig(max_objects=3)
    settings = {"encoder": "effnet-minilm", "segments": seg.to_dict(), "objects": obj.to_dict(),
                "local": TINY_LOCAL.to_dict()}
    built = fields.build(settings, tmp_path)
    assert [ex.key for ex in built] == ["global", "segments", "objects", "local"]
    assert [f for ex in built for f in ex.fields] == ["global", "segments", "objects", "objects_mean", "local",
                                                      "instance"]
    for ex in built:
        again = type(ex).from_config(ex.config_dict(), tmp_path)
        assert again.config_dict() == ex.config_dict()
    assert [ex.key for ex in fields.build({}, tmp_path)] == ["global"]
    assert [ex.key for ex in fields.build(lambda key: None, tmp_path)] == ["global"]  # e.g. catalog.get_meta


def test_two_extractors_writing_one_field_are_refused(tmp_path, toy):
    class Clash(ToyColour):
        key = "clash"

    fields.register(Clash)
    try:
        with pytest.raises(ValueError, match="'toy_colour' is written by both"):
            fields.build({"toy": {"side": 2}, "clash": {"side": 2}}, tmp_path)
    finally:
        fields.unregister("clash")


def test_local_field_pickles_without_the_fit_cache_and_encodes_the_same(tmp_path, photos_dir):
    """What the Ray engine ships to workers: no raw features, no network; same vectors as the driver's copy."""
    from PIL import Image

    from finegrain import encoders

    photos = sorted(str(p) for p in photos_dir.iterdir())
    ex = LocalField(TINY_LOCAL, tmp_path)
    assert ex.needs_fit
    ex.fit(photos)
    assert not ex.needs_fit and (tmp_path / "local" / "extractor.safetensors").exists()
    sample = sorted(ex.store.fit_sample)
    assert len(sample) == 3
    blob = pickle.dumps(ex)
    assert len(blob) < 10_000  # the fit's raw features stay on the driver
    worker = pickle.loads(blob)
    enc = encoders.create("effnet-minilm")

    def run(extractor: LocalField):
        payloads = []
        for p in photos:
            data = Path(p).read_bytes()
            img = Image.open(p)
            payloads.append(extractor.prepare(Decoded(p, data, img, *img.size), enc))
        return extractor.rows(extractor.encode(enc, payloads), np.arange(len(photos)))

    here, there = run(ex), run(worker)  # ``ex`` uses the cached raw features of the fit sample
    for f in ("local", "instance"):
        np.testing.assert_array_equal(here[f].owners, there[f].owners)
        np.testing.assert_array_equal(here[f].vectors, there[f].vectors)
        for a in here[f].attrs:
            np.testing.assert_array_equal(here[f].attrs[a], there[f].attrs[a])


def test_local_engine_builds_every_field_in_one_pass(tmp_path, photos_dir):
    """Global + segments + objects + local: every field has rows for every image, and a re-run changes nothing."""
    root = tmp_path / "photos"
    shutil.copytree(photos_dir, root)
    index = Index.create(tmp_path / "idx", segments=SegmentConfig(levels=(1, 4)), objects=ObjectConfig(max_objects=3),
                         local=TINY_LOCAL)
    with pytest.raises(ValueError, match="not fitted"):  # the search side holds an unfitted extractor now
        index.search(image=root / "coffee.jpg", k=1, mode="local")
    report = index.add([root], batch_size=4)  # fits with its own extractor: the search side must see the state
    assert report.indexed == len(index) == 6 and not report.failed
    ids = set(index.records)
    for f in ("global", "segments", "objects", "objects_mean", "local", "instance"):
        assert set(index.fields[f].owners.tolist()) == ids, f
    assert index.add([root]).unchanged == 6
    assert index.search(image=root / "coffee.jpg", k=1, mode="local")[0].path == str(root / "coffee.jpg")
