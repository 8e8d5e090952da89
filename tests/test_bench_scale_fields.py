"""`bench scale --fields`: synthetic images copy every field of a real source (segments, objects, local features),
and every mode of each family answers on them (text modes with captions, the local modes with example images)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from finegrain.bench.scale import FieldStorage, Source, build_synthetic, run_scale
from finegrain.cli import app
from finegrain.compress import storage
from finegrain.index import Index
from finegrain.local.store import STATE_FILE

runner = CliRunner()
QUERIES = ["an astronaut", "a cup of coffee"]
MODES = ("global", "hierarchical", "objects", "objects-max", "objects-refined", "instance", "global+local",
         "local", "l2g")


@pytest.fixture(scope="module")
def every_field_source(tmp_path_factory, photos_dir):
    """The six sample photos indexed with segments, objects (with Stage B refinement) and CNN local features."""
    path = tmp_path_factory.mktemp("fields") / "source"
    res = runner.invoke(app, ["index", str(photos_dir), "--index", str(path), "--segments", "4",
                              "--objects", "regions", "--refine-iters", "2", "--local", "cnn",
                              "--local-scales", "1.0", "--local-features", "30", "--local-image-size", "160",
                              "--json"])
    assert res.exit_code == 0, res.output
    return path


def test_source_holds_every_family(every_field_source):
    src = Source.from_index(every_field_source)
    assert src.families() == ["segments", "objects", "local"]
    assert {"segments", "objects", "objects_mean", "objects_refined", "local", "instance"} <= set(src.rows)
    assert all(len(src.rows[name]) == 6 for name in src.rows)  # one entry per source image
    assert src.local_state is not None and src.objects is not None and src.local is not None


def test_every_field_is_copied_and_every_mode_answers(every_field_source, tmp_path, photos_dir):
    src = Source.from_index(every_field_source)
    images = sorted(str(p) for p in photos_dir.iterdir())
    path = tmp_path / "syn"
    build_synthetic(path, src, 40, noise=0.3, seed=1, fields=src.families())
    assert (path / STATE_FILE).read_bytes() == src.local_state  # queries are whitened as the copies were
    with Index.open(path) as index:
        snap = index.snapshot
        for name, per_image in src.rows.items():  # rows per image as in the source image each one copies
            rows = snap.field(name)
            assert len(rows) > 0 and set(np.unique(rows.owners)) <= set(snap.ids.tolist())
            assert rows.vectors.shape[1] == per_image[0].vectors.shape[1]
        for mode in MODES:
            query = {"text": QUERIES[0]} if mode in ("global", "hierarchical") else {"image": images[0]}
            assert len(index.search(**query, k=5, mode=mode).hits) == 5, mode


def test_run_scale_every_field_rows(every_field_source, tmp_path, photos_dir):
    images = sorted(str(p) for p in photos_dir.iterdir())[:2]
    rows = run_scale(every_field_source, [30], tmp_path / "cache", QUERIES, modes=MODES, fields=["all"],
                     images=images, show_progress=False, log=lambda _: None, isolate=False,
                     storage={"objects": FieldStorage.parse("pca:8:int8"), "local": FieldStorage.parse("none::int8")})
    by = {r["mode"]: r for r in rows}
    assert list(by) == list(MODES)
    assert {r["query_kind"] for r in rows if r["mode"] not in ("global", "hierarchical")} == {"image"}  # raw objects
    assert by["objects-max"]["reference"] == "objects-max:candidates=0" and by["objects-max"]["agreement_at_10"] > 0
    assert by["l2g"]["agreement_at_10"] is None  # no exact reference: not scored
    assert all(r["p50_ms"] > 0 and r["fields"] == ["segments", "objects", "local"] for r in rows)
    assert rows[0]["storage"] == {"objects": "pca:8:int8", "local": "none::int8"}


def test_compact_fields_are_stored_compact(every_field_source, tmp_path, monkeypatch):
    from finegrain.bench import scale

    monkeypatch.setattr(scale, "STORAGE_FIT_IMAGES", 20)
    monkeypatch.setattr(scale, "BUILD_BATCH", 10)
    src = Source.from_index(every_field_source)
    build_synthetic(tmp_path / "c", src, 40, fields=["objects", "local"],
                    storage={"objects": FieldStorage.parse("pca:8:int8"), "local": FieldStorage.parse("none::int8")})
    with Index.open(tmp_path / "c") as index:
        assert storage.scoring(index.snapshot, "objects")[0].vectors.dtype == np.int8
        assert storage.field_info(index.snapshot.settings, "local")["originals"] == "dropped"
        assert not index.snapshot.has_field("segments")


def test_append_synthetic_commits_more_images_in_the_index_own_storage(every_field_source, tmp_path, monkeypatch):
    from finegrain.bench import scale

    monkeypatch.setattr(scale, "STORAGE_FIT_IMAGES", 20)
    monkeypatch.setattr(scale, "BUILD_BATCH", 10)
    src = Source.from_index(every_field_source)
    build_synthetic(tmp_path / "c", src, 30, fields=["local"], storage={"local": FieldStorage.parse("none::int8")})
    with Index.open(tmp_path / "c") as index:
        generation, rows = index.snapshot.rows_generation, len(storage.scoring(index.snapshot, "local")[0])
    assert scale.append_synthetic(tmp_path / "c", src, 15) >= 0
    with Index.open(tmp_path / "c") as index:
        snap = index.snapshot
        assert len(index) == 45 and snap.rows_generation > generation
        local, _ = storage.scoring(snap, "local")
        assert local.vectors.dtype == np.int8 and len(local) > rows  # the index's int8 codec, no originals
        assert not snap.has_field("local") and len(snap.field("instance")) == 45
        assert len({r.path for r in index.records.values()}) == 45  # new paths, none reused


def test_field_errors(every_field_source, tmp_path):
    src = Source.from_index(every_field_source)
    with pytest.raises(ValueError, match="does not store"):
        build_synthetic(tmp_path / "a", src, 10, fields=["segments"], storage={"objects": FieldStorage.parse("none::int8")})
    with pytest.raises(ValueError, match="unknown field family"):
        run_scale(every_field_source, [10], tmp_path, QUERIES, modes=("global",), fields=["colour"],
                  show_progress=False)
    with pytest.raises(ValueError, match="example images"):
        run_scale(every_field_source, [10], tmp_path, QUERIES, modes=("l2g",), show_progress=False)
    with pytest.raises(ValueError, match="FIELD=METHOD"):
        FieldStorage.parse_fields("colour=pca:8:int8")


def test_local_features_keeps_the_strongest(every_field_source, tmp_path):
    src = Source.from_index(every_field_source)
    fewer = src.with_local_features(5)
    for full, cut in zip(src.rows["local"], fewer.rows["local"]):
        assert len(cut) == min(5, len(full))
        if len(full) > 5:  # the five strongest, in their stored order
            assert sorted(cut.attrs["strength"].tolist()) == sorted(full.attrs["strength"].tolist())[-5:]
    assert fewer.rows["segments"] is src.rows["segments"]  # other fields untouched
    with pytest.raises(ValueError, match="positive"):
        src.with_local_features(0)


def test_local_copies_keep_their_near_duplicates_and_the_noise_cosine():
    """Synthetic local descriptors: each image's rows through one near-identity map (not independent noise),
    so clumps of near-duplicates stay clumps while a copy's cosine to its source is as for other fields."""
    from finegrain.bench import scale
    from finegrain.local.chamfer import LocalDatabase, representative_rows

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, 10, axis=0) + 0.06 * rng.standard_normal((400, 64)).astype(np.float32)  # cosine ~0.8
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    owners = np.repeat(np.arange(4), 100)  # four images of ten clumps each
    warped = scale._warped(np.random.default_rng(1), x, owners, 0.5)
    independent = scale._noisy(np.random.default_rng(1), x, 0.5)
    cos = np.einsum("ij,ij->i", warped, x)
    assert abs(float(cos.mean()) - 1 / np.sqrt(1.25)) < 0.03
    assert abs(float(np.einsum("ij,ij->i", independent, x).mean()) - float(cos.mean())) < 0.03
    offsets = np.arange(0, 401, 100)
    kept = [len(representative_rows(LocalDatabase(v, offsets), 0.7)) for v in (x, warped, independent)]
    assert kept[0] <= 60 and kept[1] <= 1.5 * kept[0] < kept[2], kept
