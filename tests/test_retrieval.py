"""The retrieval core: one registry of modes, validated parameters and queries, one response type, snapshots.

Includes the "add a mode" and "add a field" contracts: a toy retriever and a toy field defined in this file
alone, searched end to end through the Python API, the CLI and the HTTP service.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from finegrain import Index, fields, retrieval
from finegrain.cli import app as cli_app
from finegrain.decompose.segments import SegmentConfig
from finegrain.fields import FieldExtractor
from finegrain.retrieval import Params, Query, Retriever, SearchResponse, SearchStats
from finegrain.retrieval.base import number
from finegrain.retrieval.dense import hits_from
from finegrain.service import create_app
from finegrain.service.background import BackgroundServer
from finegrain.store.pages import is_mapped
from finegrain.store.vectors import FieldRows


@pytest.fixture(scope="module")
def seg_index(tmp_path_factory, photos_dir) -> Index:
    root = tmp_path_factory.mktemp("core")
    index = Index.create(root / "index", segments=SegmentConfig(levels=(1, 4)))
    index.add([photos_dir], commit_every=2)  # several chunks: the gathered (copied) layout
    return index


# ------------------------------------------------------------------ registry and validation
def test_registry_lists_every_family():
    modes = retrieval.modes()
    for mode in ("global", "single", "exhaustive", "hierarchical", "instance", "global+local", "local", "l2g",
                 "objects", "objects-max", "objects-refined"):
        assert mode in modes
    assert retrieval.get("l2g").name == "local" and retrieval.get("hierarchical").name == "multivector"
    with pytest.raises(ValueError, match="unknown search mode 'nope'; available: auto, global, "):
        retrieval.get("nope")


def test_available_modes_follow_the_fields(seg_index):
    assert seg_index.available_modes() == ["auto", "global", "single", "exhaustive", "hierarchical"]
    with pytest.raises(ValueError, match="needs an index with local features"):
        seg_index.search(image=seg_index.records[1].path, mode="l2g")
    with pytest.raises(ValueError, match="needs an index built with objects"):
        seg_index.search(image=seg_index.records[1].path, mode="objects")


@pytest.mark.parametrize("mode, options, message", [
    ("global", {"T": 0.5}, r"unknown search option\(s\) of mode 'global': T; known: breadth, dim"),
    ("global", {"kk": 3}, r"unknown search option\(s\) of mode 'global': kk"),
    ("hierarchical", {"knn": 5}, r"unknown search option\(s\) of mode 'hierarchical': knn; known: T, alpha"),
    ("hierarchical", {"T": 5.0}, r"T must be in \[0.0, 1.0\], not 5.0"),
    ("hierarchical", {"tau": -3}, r"tau must be in \[-1.0, inf\]"),
    ("hierarchical", {"top_k": 0}, r"top_k must be in \[1"),
    ("single", {"single_level": 7}, r"single_level must be from 0 to 1 for this index"),
    ("hierarchical", {"decomposer": "magic"}, r"unknown decomposer spec 'magic'"),
    ("global", {"dim": 8}, r"this index is not compressed"),
])
def test_bad_options_are_refused_before_any_work(seg_index, mode, options, message):
    with pytest.raises(ValueError, match=message):
        seg_index.search(text="a cat", mode=mode, **options)


def test_local_and_object_options_are_validated_too():
    from finegrain.retrieval.local import LocalParams

    with pytest.raises(ValueError, match=r"unknown local search option\(s\) \['T'\]"):
        LocalParams.from_options({"T": 0.5})
    with pytest.raises(ValueError, match="knn must be in"):
        LocalParams.from_options({"knn": 0})
    assert LocalParams.from_options({"w": 0.5, "shortlist": 7}).options() == {"shortlist": 7, "global_field": "instance",
                                                                             "w": 0.5}
    with pytest.raises(ValueError, match=r"unknown search option\(s\) of mode 'objects': k; known: candidates"):
        retrieval.get("objects").params_type.from_options({"k": 3}, mode="objects")


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give exactly one of text= or image="),
    ({"text": "a", "image": "x.jpg", "terms": (1,)}, "terms must be Term objects"),  # text+image: combined query
    ({"text": "   "}, "the text query is empty"),
    ({"text": "a cat", "bbox": (0, 0, 5, 5)}, "bbox applies to image queries only"),
    ({"image": "x.jpg", "bbox": (0, 0, 5)}, "bbox needs four numbers"),
    ({"image": "x.jpg", "bbox": (0, 0, float("nan"), 5)}, "not a finite number"),
    ({"image": "x.jpg", "bbox": (5, 0, 5, 5)}, "is empty: need x0 < x1"),
])
def test_query_is_validated_once(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Query(**kwargs)


def test_one_bbox_policy_for_every_mode(seg_index, photos_dir):
    """A box is clipped to the image in every mode; one that misses the image is an error in every mode."""
    image = photos_dir / "chelsea.jpg"
    for mode in seg_index.available_modes():
        inside = seg_index.search(image=image, bbox=(0, 0, 300, 300), mode=mode, k=3)
        overhanging = seg_index.search(image=image, bbox=(-50, -20, 300, 300), mode=mode, k=3)
        assert [h.id for h in inside] == [h.id for h in overhanging], mode
        with pytest.raises(ValueError, match="is empty inside the"):
            seg_index.search(image=image, bbox=(5000, 5000, 6000, 6000), mode=mode)


def test_every_mode_answers_one_response_type(seg_index):
    for mode in seg_index.available_modes():
        r = seg_index.search(text="a cat on a rug", mode=mode, k=3)
        ran = "hierarchical" if mode == "auto" else mode  # auto says which mode ran
        assert isinstance(r, SearchResponse) and r.mode == ran and len(r) == 3 and r.generation == seg_index.generation
        assert r.requested_mode == (mode if mode == "auto" else None)
        assert [h.rank for h in r] == [0, 1, 2] and r[0] is r.hits[0]
        assert r.subqueries[0] == "a cat on a rug"
        assert json.loads(json.dumps(r.as_dict()))["results"][0]["id"] == r[0].id


# ------------------------------------------------------------------ create / settings
def test_create_exist_ok_with_other_settings_says_what_differs(seg_index):
    same = Index.create(seg_index.path, segments=SegmentConfig(levels=(1, 4)), exist_ok=True)
    assert len(same) == len(seg_index)
    with pytest.raises(ValueError, match=r"segments: stored .* asked None"):
        Index.create(seg_index.path, exist_ok=True)
    with pytest.raises(ValueError, match=r"objects: stored None, asked"):
        Index.create(seg_index.path, segments=SegmentConfig(levels=(1, 4)), objects="regions", exist_ok=True)


def test_cli_refuses_new_fields_on_an_existing_index(seg_index, photos_dir):
    result = CliRunner().invoke(cli_app, ["index", str(photos_dir), "--index", str(seg_index.path), "--objects",
                                          "regions"])
    assert result.exit_code == 2
    assert "created with other settings (objects: stored None" in " ".join(result.output.split())


def test_bad_ann_kind_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="unknown index kind 'bogus'"):
        Index.create(tmp_path / "x", ann="bogus")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ snapshots


def test_compacted_segments_are_mapped_not_copied(tmp_path, photos_dir):
    index = Index.create(tmp_path / "i", segments=SegmentConfig(levels=(1, 4)))
    index.add([photos_dir], commit_every=2)
    before = {m: [(h.id, round(h.score, 5)) for h in index.search(text="a rocket", mode=m, k=6)]
              for m in index.available_modes()}
    index.compact()
    seg = index.fields["segments"]
    assert is_mapped(seg.vectors)  # mapped, not read
    levels = np.asarray(seg.attrs["level"])
    assert np.all(np.diff(levels) >= 0)  # stored level-major
    table = index.segment_table
    assert len(table.pieces) == 1
    for vecs in table.pieces[0].vectors:
        assert is_mapped(vecs)  # each level is a view of the mapped file, not a copy
    after = {m: [(h.id, round(h.score, 5)) for h in index.search(text="a rocket", mode=m, k=6)]
             for m in index.available_modes()}
    assert after == before


def test_a_reader_survives_a_compaction_under_it(tmp_path, photos_dir):
    index = Index.create(tmp_path / "i", segments=SegmentConfig(levels=(1, 4)))
    index.add([photos_dir], commit_every=2)
    reader = Index.open(tmp_path / "i")
    expected = [h.id for h in reader.search(text="a cat", mode="exhaustive", k=6)]
    reader2 = Index.open(tmp_path / "i")  # has not read any vector yet
    index.remove([expected[-1]])
    index.compact()  # deletes the chunk files reader2's snapshot lists
    hits = reader2.search(text="a cat", mode="exhaustive", k=6)
    assert [h.id for h in hits] == expected[:-1] and reader2.generation == index.generation


# ------------------------------------------------------------------ add a mode, add a field
@dataclass(frozen=True)
class BrightParams(Params):
    """The toy mode's one option."""

    gamma: float = 1.0

    def __post_init__(self) -> None:
        number("gamma", self.gamma, 0.0, 10.0, lo_open=True)


class BrightnessRetriever(Retriever):
    """Ranks images by the toy ``brightness`` field (a one-number vector per image), for image queries."""

    name = "toy"
    modes = ("bright",)
    params_type = BrightParams
    descriptions = {"bright": "toy: brightest images first"}

    def missing(self, snapshot, mode):
        return None if snapshot.has_field("brightness") else "needs the brightness field"

    def search(self, snapshot, mode, query, k, params):
        rows = snapshot.field("brightness")
        scores = np.asarray(rows.vectors[:, 0], np.float32) ** params.gamma
        order = np.argsort(-scores, kind="stable")[:k]
        return SearchResponse(hits_from(snapshot, rows.owners[order], scores[order]), mode,
                              SearchStats(sim_ops=len(rows)), [query.text] if query.text else [],
                              generation=snapshot.generation)


class BrightnessField(FieldExtractor):
    """A toy field: each image's mean brightness (a one-number vector), computed at indexing time."""

    key = "toy_brightness"
    label = "toy brightness"

    @classmethod
    def from_config(cls, config, root: Path) -> "BrightnessField":
        return cls()

    def config_dict(self) -> dict:
        return {}

    @property
    def fields(self) -> tuple[str, ...]:
        return ("brightness",)

    def prepare(self, decoded, encoder) -> float:
        return float(np.asarray(decoded.image.convert("L"), np.float32).mean() / 255)

    def encode(self, encoder, payloads: list[float]) -> list[float]:
        return payloads

    def rows(self, results: list[float], owners: np.ndarray) -> dict[str, FieldRows]:
        return {"brightness": FieldRows(np.asarray(results, np.float32)[:, None], owners)} if results else {}


@pytest.fixture()
def toy_index(tmp_path, photos_dir):
    """An index whose extra ``brightness`` field a toy extractor, registered from this file, fills at indexing."""
    fields.register(BrightnessField)
    retriever = retrieval.register(BrightnessRetriever())
    try:
        index = Index.create(tmp_path / "toy")
        with index.writer() as w:
            w.set_meta(BrightnessField.key, {})  # the setting that turns the toy field on for this index
        index.add([photos_dir])
        rows = index.fields["brightness"]
        yield index, dict(zip(rows.owners.tolist(), rows.vectors[:, 0].tolist()))
    finally:
        retrieval.unregister(retriever)
        fields.unregister(BrightnessField.key)


def test_a_toy_mode_plugs_into_api_cli_and_service(toy_index, photos_dir):
    index, bright = toy_index
    expected = sorted(bright, key=lambda i: -bright[i])[:3]
    assert "bright" in retrieval.modes() and "bright" in index.available_modes()
    # Python API, with its option validated by its own Params
    assert [h.id for h in index.search(text="anything", mode="bright", k=3)] == expected
    with pytest.raises(ValueError, match=r"gamma must be in \(0.0, 10.0\]"):
        index.search(text="anything", mode="bright", gamma=0)
    # CLI
    result = CliRunner().invoke(cli_app, ["search", "--index", str(index.path), "--text", "x", "--mode", "bright",
                                          "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in json.loads(result.output)["results"]] == expected
    # Service: the schema, the index's modes and a search
    with BackgroundServer(create_app(index.path, warm=False, reload_interval=0)) as base, \
            httpx.Client(base_url=base, timeout=60) as c:
        schema = c.get("/openapi.json").json()
        assert "bright" in json.dumps(schema)
        assert "bright" in c.get("/api/stats").json()["modes"]
        r = c.post("/api/search", json={"text": "x", "mode": "bright", "k": 3})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["results"]] == expected
        assert c.post("/api/search", json={"text": "x", "mode": "nope"}).status_code == 422


def test_registering_a_taken_mode_is_refused():
    class Clash(BrightnessRetriever):
        modes = ("global",)

    with pytest.raises(ValueError, match="search mode\\(s\\) global already registered"):
        retrieval.register(Clash())


def test_shard_set_answers_the_same_response(tmp_path, photos_dir):
    from finegrain.shards import ShardedIndex

    a, b = tmp_path / "a", tmp_path / "b"
    names = sorted(photos_dir.iterdir())
    for folder, part in ((a, names[:3]), (b, names[3:])):
        (folder / "p").mkdir(parents=True)
        for p in part:
            shutil.copy(p, folder / "p")
        Index.create(folder / "idx", segments=SegmentConfig(levels=(1, 4))).add([folder / "p"])
    shards = ShardedIndex.create(tmp_path / "set", [a / "idx", b / "idx"])
    for mode in ("global", "hierarchical"):
        r = shards.search(text="a cat", mode=mode, k=4)
        assert isinstance(r, SearchResponse) and r.mode == mode and len(r) == 4
        assert {h.shard for h in r} <= {0, 1} and all(h.shard is not None for h in r)
    with pytest.raises(ValueError, match="unknown search option"):
        shards.search(text="a cat", mode="global", T=0.3)
    assert Path(shards.path).exists()


def test_a_damaged_ann_cache_is_rebuilt(tmp_path, photos_dir):
    index = Index.create(tmp_path / "h", ann="hnsw")
    index.add([photos_dir])
    expected = [h.id for h in index.search(text="a cat", k=6)]
    caches = list((index.path / "ann").glob("global-*.faiss"))
    assert len(caches) == 1
    caches[0].write_bytes(caches[0].read_bytes()[:100])  # truncated
    again = Index.open(index.path)
    assert [h.id for h in again.search(text="a cat", k=6)] == expected
    assert again.info()["ann"] == "hnsw"


def test_a_replaced_index_is_picked_up_by_the_server(tmp_path, photos_dir):
    """Delete a served index and build a new one at the same path: /api/reload sees it (issue 20, item 3)."""
    first, second = tmp_path / "first", tmp_path / "second"
    names = sorted(photos_dir.iterdir())
    for folder, part in ((first, names[:2]), (second, names[2:])):
        folder.mkdir()
        for p in part:
            shutil.copy(p, folder)
    Index.create(tmp_path / "idx").add([first])
    with BackgroundServer(create_app(tmp_path / "idx", warm=False, reload_interval=0)) as base, \
            httpx.Client(base_url=base, timeout=60) as c:
        assert c.get("/api/stats").json()["images"] == 2
        shutil.rmtree(tmp_path / "idx")
        Index.create(tmp_path / "idx").add([second])  # generation 1 again, like the one it replaced
        assert c.post("/api/reload").json()["reloaded"] is True
        assert c.get("/api/stats").json()["images"] == 4
        names_now = {h["name"] for h in c.post("/api/search", json={"text": "a cat", "k": 4}).json()["results"]}
        assert names_now == {p.name for p in names[2:]}


def test_concurrent_creates_never_mix_settings(tmp_path):
    """Two creators of one new index with different fields: one wins, the other gets a clear error, and the
    settings are one creator's, whole (issue 20, item 4)."""
    import threading

    from finegrain.index import IndexLockedError

    from finegrain import encoders

    encoders.create("effnet-minilm")  # imported once first: two threads' first `import transformers` can race
    target = tmp_path / "race"
    outcomes: list = []
    barrier = threading.Barrier(2)

    def create(kwargs: dict) -> None:
        barrier.wait()
        try:
            Index.create(target, exist_ok=True, **kwargs).close()
            outcomes.append(("ok", kwargs))
        except (ValueError, IndexLockedError, FileExistsError) as exc:
            outcomes.append(("error", str(exc)))

    threads = [threading.Thread(target=create, args=(kw,)) for kw in ({"local": "cnn"},
                                                                      {"segments": SegmentConfig(levels=(1, 4))})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [kw for status, kw in outcomes if status == "ok"]
    assert len(outcomes) == 2 and len(winners) >= 1, outcomes
    settings = Index.open(target).snapshot.settings
    if len(winners) == 1:
        wanted = winners[0]
        assert (settings["local"] is not None) == ("local" in wanted)
        assert (settings["segments"] is not None) == ("segments" in wanted)
        assert any(status == "error" for status, _ in outcomes)
