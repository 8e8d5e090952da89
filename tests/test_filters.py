"""Filters, threshold, pagination and date order (docs/filters.md), on real photos with real EXIF and mtimes.

The property every mode family must hold: a filtered search ranks exactly the
allowed images, as the unfiltered ranking restricted to them (``k`` hits when
``k`` allowed images exist), not the unfiltered top ``k`` filtered afterwards.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finegrain import Index
from finegrain.cli import app as cli_app
from finegrain.retrieval.filters import Filters
from finegrain.service import create_app
from finegrain.store import meta as meta_table

#: name -> (folder, size (w, h), EXIF DateTimeOriginal or None, make, model, mtime "YYYY-MM-DD HH:MM" or None)
PHOTOS = {
    "astronaut": ("trip", (256, 192), "2021:07:14 10:30:00", "Canon", "Canon EOS R5", None),
    "coffee": ("trip", (192, 256), "2022:01:02 08:00:00", "NIKON CORPORATION", "NIKON Z 6", None),
    "chelsea": ("home", (224, 224), "2023:06:01 12:00:00", "Canon", "Canon EOS 80D", None),
    "rocket": ("home", (256, 160), None, None, None, "2020-05-17 09:15"),
    "camera": ("home", (160, 256), "2023:12:31 23:59:59", "Apple", "iPhone 12", None),
    "coins": ("trip", (240, 180), "garbage:not a date", "Canon", "Canon EOS R5", "2019-03-03 03:03"),
    "page": ("home", (200, 200), None, None, None, "2022-08-20 18:00"),
    "clock": ("trip", (180, 240), "2021:07:15 16:45:00", "NIKON CORPORATION", "NIKON D750", None),
    "hubble_deep_field": ("home", (256, 200), "2022:11:11 11:11:11", "Apple", "iPhone 14 Pro", None),
    "immunohistochemistry": ("trip", (200, 256), "2020:02:29 06:00:00", "Canon", "Canon EOS R5", None),
}


def _local_ts(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").timestamp()


def _write_photo(path: Path, name: str, size, taken, make, model) -> None:
    from skimage import data

    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    img = Image.fromarray(arr[..., :3]).convert("RGB").resize(size)
    exif = Image.Exif()
    if make:
        exif[271] = make
    if model:
        exif[272] = model
    exif[274] = 1  # upright
    if taken:
        exif.get_ifd(0x8769)[36867] = taken
    img.save(path, quality=90, exif=exif.tobytes())


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("library")
    for name, (folder, size, taken, make, model, mtime) in PHOTOS.items():
        (root / folder).mkdir(exist_ok=True)
        path = root / folder / f"{name}.jpg"
        _write_photo(path, name, size, taken, make, model)
        if mtime:
            os.utime(path, (_local_ts(mtime), _local_ts(mtime)))
    return root


@pytest.fixture(scope="module")
def full_index(tmp_path_factory, library) -> Index:
    """Every field: segments (multivector modes), objects, local features (local modes)."""
    from finegrain.decompose.segments import SegmentConfig
    from finegrain.local.store import LocalConfig

    index = Index.create(tmp_path_factory.mktemp("idx") / "index", segments=SegmentConfig(levels=(1, 4)),
                         objects="regions",
                         local=LocalConfig("cnn", {"image_size": 160, "scales": [1.0], "max_features": 80,
                                                   "threads": 1}, fit_images=6))
    report = index.add([library])
    assert report.indexed == len(PHOTOS) and not report.failed
    return index


def _ids(index: Index, **filters) -> set[int]:
    mask = Filters.from_options(filters).allowed(index.snapshot)
    assert mask is not None
    return {int(i) for i in index.snapshot.ids[mask]}


def _by_name(index: Index) -> dict[str, int]:
    return {Path(r.path).stem: r.id for r in index.records.values()}


def test_photo_metadata_is_read_at_indexing(full_index, library):
    with sqlite3.connect(full_index.path / "finegrain.sqlite") as db:
        rows = {Path(p).stem: r for p, *r in db.execute(
            "SELECT i.path, m.taken, m.taken_source, m.make, m.model, m.orientation "
            "FROM images i JOIN image_meta m ON m.id = i.id")}
    assert len(rows) == len(PHOTOS)
    assert rows["astronaut"] == [meta_table.wall_clock_seconds(datetime(2021, 7, 14, 10, 30)), "exif", "Canon",
                                 "Canon EOS R5", 1]
    # no EXIF date, or a corrupt one: the file's mtime (as a local wall-clock time), never an error
    assert rows["rocket"][:2] == [meta_table.wall_clock_seconds(datetime(2020, 5, 17, 9, 15)), "mtime"]
    assert rows["coins"][:4] == [meta_table.wall_clock_seconds(datetime(2019, 3, 3, 3, 3)), "mtime", "Canon",
                                 "Canon EOS R5"]
    assert full_index.info()["capture_dates"] == {"exif": 7, "mtime": 3, "missing": 0}


def test_each_filter_selects_what_it_says(full_index, library):
    ids = _by_name(full_index)

    def names(**f) -> set[str]:
        return {n for n, i in ids.items() if i in _ids(full_index, **f)}

    assert names(path_prefix=str(library / "trip") + os.sep) == {n for n, v in PHOTOS.items() if v[0] == "trip"}
    assert names(glob="c*.JPG") == {"coffee", "chelsea", "camera", "coins", "clock"}  # file name, case-insensitive
    assert names(glob="*/home/*") == {n for n, v in PHOTOS.items() if v[0] == "home"}  # with "/": the whole path
    assert names(taken_after="2022", taken_before="2023") == {"coffee", "page", "hubble_deep_field"}
    assert names(taken_after="2023-06-01") == {"chelsea", "camera"}  # inclusive lower bound
    assert names(taken_before="2023-06-01T12:00") == set(PHOTOS) - {"chelsea", "camera"}  # exclusive upper
    assert names(taken_after="2019-03-03", taken_before="2019-03-04") == {"coins"}  # corrupt EXIF date: mtime
    assert names(make="nikon") == {"coffee", "clock"}
    assert names(make="canon", model="r5") == {"astronaut", "coins", "immunohistochemistry"}
    assert names(orientation="portrait") == {"coffee", "camera", "clock", "immunohistochemistry"}
    assert names(orientation="square") == {"chelsea", "page"}
    assert names(orientation="landscape", min_width=250) == {"astronaut", "rocket", "hubble_deep_field"}
    assert names(max_height=192, max_width=240) == {"coins"}
    assert names(ids=[ids["rocket"], ids["page"], 10**6]) == {"rocket", "page"}
    assert names(ids=[]) == set()


@pytest.mark.parametrize("options, message", [
    ({"taken_after": "2023-13-01"}, "taken_after must be a date"),
    ({"taken_after": "2023-06-01", "taken_before": "2023-01-01"}, "earlier than taken_before"),
    ({"taken_before": "2023-06-01T12:00+02:00"}, "has a time zone"),
    ({"orientation": "diagonal"}, "orientation must be one of landscape, portrait, square"),
    ({"glob": " "}, "glob must be a non-empty pattern"),
    ({"path_prefix": ""}, "path_prefix must be a non-empty string"),
    ({"ids": ["1", 2]}, "ids must be integers"),
    ({"ids": "1,2"}, "ids must be a list"),
    ({"min_width": 0}, "min_width must be in"),
    ({"min_height": 300, "max_height": 200}, "min_height \\(300\\) is larger than max_height"),
    ({"make": ""}, "make must be a non-empty string"),
    ({"colour": "red"}, "unknown filter\\(s\\): colour; known: path_prefix"),
])
def test_bad_filters_are_refused_with_one_line(full_index, options, message):
    with pytest.raises(ValueError, match=message):
        Filters.from_options(options)
    with pytest.raises(ValueError, match=message):  # through the API, before any model runs
        full_index.search(text="a cat", filters=options)


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": float("nan")}, "threshold must be a finite number"),
    ({"offset": -1}, "offset must be in"),
    ({"offset": 9995}, "offset \\+ k must be at most 10000"),
    ({"sort": "name"}, "sort must be one of score, date, -date"),
])
def test_bad_page_options_are_refused(full_index, kwargs, message):
    with pytest.raises(ValueError, match=message):
        full_index.search(text="a cat", **kwargs)


QUERIES = {"text": {"text": "a photo of a cat"}, "image": None}


def _query(kind: str, library: Path) -> dict:
    return {"text": "a photo of a cat"} if kind == "text" else {"image": library / "home" / "chelsea.jpg"}


@pytest.mark.parametrize("mode, kind, options", [
    ("global", "text", {}),
    ("global", "image", {}),
    ("single", "text", {}),
    ("exhaustive", "text", {}),
    ("objects", "image", {}),
    ("objects-max", "image", {}),
    ("instance", "image", {}),
    ("global+local", "image", {"shortlist": 100}),
])
def test_filtered_ranking_is_the_ranking_restricted_to_the_allowed_images(full_index, library, mode, kind, options):
    query = _query(kind, library)
    everything = full_index.search(**query, k=len(PHOTOS), mode=mode, **options)
    assert len(everything) == len(PHOTOS)
    # exclude the best two unfiltered hits: a post-filter of the top k would come back short
    top2 = {everything[0].id, everything[1].id}
    allowed = {i for i in full_index.records if i not in top2}
    for k in (3, len(allowed)):
        got = full_index.search(**query, k=k, mode=mode, filters={"ids": sorted(allowed)}, **options)
        want = [h for h in everything if h.id in allowed][:k]
        assert [h.id for h in got] == [h.id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-5, atol=1e-6)
        assert [h.rank for h in got] == list(range(k)) and got.allowed == len(allowed)


def test_hierarchical_starts_from_the_allowed_images(full_index):
    # With no more candidates than its top_k, the scheduler prunes nothing: it must equal the exhaustive
    # ranking restricted to the allowed set (the unfiltered hierarchical search pruned among all images).
    everything = full_index.search(text="a rocket", k=len(PHOTOS), mode="exhaustive")
    allowed = [h.id for h in everything][3:9]
    got = full_index.search(text="a rocket", k=4, mode="hierarchical", filters={"ids": allowed})
    want = [h for h in everything if h.id in set(allowed)][:4]
    assert [h.id for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-5, atol=1e-6)
    assert got.stats.candidates_per_level[0] == len(allowed)


@pytest.mark.parametrize("mode", ["local", "l2g"])
def test_local_modes_rank_only_allowed_images(full_index, library, mode):
    by_name = _by_name(full_index)
    allowed = {by_name[n] for n in ("astronaut", "coffee", "chelsea", "rocket", "camera")}
    query = library / "home" / "chelsea.jpg"
    got = full_index.search(image=query, k=4, mode=mode, filters={"ids": sorted(allowed)})
    assert len(got) == 4 and {h.id for h in got} <= allowed
    if mode == "local":  # a small allowed set is scored with the exact Chamfer similarity
        exact = full_index.search(image=query, k=len(PHOTOS), mode="global+local", shortlist=100)
        assert [h.id for h in got] == [h.id for h in exact if h.id in allowed][:4]


def test_threshold_offset_and_pages(full_index):
    everything = full_index.search(text="a photo of a cat", k=len(PHOTOS))
    pages = [full_index.search(text="a photo of a cat", k=3, offset=o) for o in (0, 3, 6, 9)]
    assert [h.id for p in pages for h in p] == [h.id for h in everything]
    assert [h.rank for p in pages for h in p] == list(range(len(PHOTOS)))
    cut = (everything[3].score + everything[4].score) / 2
    above = full_index.search(text="a photo of a cat", k=10, threshold=cut)
    assert [h.id for h in above] == [h.id for h in everything[:4]]
    assert len(full_index.search(text="a photo of a cat", k=3, offset=3, threshold=cut)) == 1


def test_sort_by_date_orders_the_matches_and_pages_through_them(full_index):
    everything = full_index.search(text="a photo", k=len(PHOTOS))
    cut = everything[6].score  # the best seven by score are the matches
    matches = {h.id for h in everything[:7]}
    taken = {h.id: h for h in full_index.search(text="a photo", k=len(PHOTOS), sort="date")}
    assert all(h.taken for h in taken.values())
    newest = full_index.search(text="a photo", k=7, sort="-date", threshold=cut)
    assert {h.id for h in newest} == matches
    dates = [h.taken for h in newest]
    assert dates == sorted(dates, reverse=True) and [h.rank for h in newest] == list(range(7))
    oldest = full_index.search(text="a photo", k=7, sort="date", threshold=cut)
    assert [h.id for h in oldest] == [h.id for h in newest][::-1]
    pages = [full_index.search(text="a photo", k=2, sort="date", threshold=cut, offset=o) for o in (0, 2, 4, 6)]
    assert [h.id for p in pages for h in p] == [h.id for h in oldest]


def test_nothing_allowed_answers_no_hits(full_index):
    response = full_index.search(text="a cat", filters={"taken_after": "2030"})
    assert len(response) == 0 and response.allowed == 0


def test_an_old_index_is_backfilled_by_the_next_index_run(tmp_path, library):
    index = Index.create(tmp_path / "old")
    index.add([library])
    index.close()
    with sqlite3.connect(tmp_path / "old" / "finegrain.sqlite") as db:  # as written before the table existed
        db.execute("DROP TABLE image_meta")
    index = Index.open(tmp_path / "old")
    assert index.info()["capture_dates"] == {"exif": 0, "mtime": 0, "missing": len(PHOTOS)}
    by_name = _by_name(index)
    # Readable at once: dates fall back to the mtime the catalog recorded, camera fields are unknown.
    assert _ids(index, taken_after="2020-05-17", taken_before="2020-05-18") == {by_name["rocket"]}
    assert _ids(index, make="canon") == set()
    report = index.add([library])  # nothing to re-index: only the metadata is read
    assert report.indexed == 0 and report.unchanged == len(PHOTOS)
    assert index.info()["capture_dates"] == {"exif": 7, "mtime": 3, "missing": 0}
    assert {n for n, i in by_name.items() if i in _ids(index, make="canon")} == \
        {"astronaut", "chelsea", "coins", "immunohistochemistry"}
    assert _ids(index, taken_after="2021-07-14", taken_before="2021-07-15") == {by_name["astronaut"]}


def test_cli_api_and_service_give_the_same_page(full_index, library):
    from finegrain.service.background import BackgroundServer

    filters = {"path_prefix": str(library) + os.sep, "orientation": "portrait", "taken_after": "2020-01-01"}
    api = full_index.search(text="a photo", k=2, offset=1, sort="-date", threshold=-1.0, filters=filters)
    assert len(api) == 2
    cli = CliRunner().invoke(cli_app, [
        "search", "--index", str(full_index.path), "--text", "a photo", "-k", "2", "--offset", "1", "--sort", "-date",
        "--threshold", "-1", "--path-prefix", filters["path_prefix"], "--orientation", "portrait",
        "--taken-after", "2020-01-01", "--json"])
    assert cli.exit_code == 0, cli.output
    cli_hits = json.loads(cli.output)["results"]
    with BackgroundServer(create_app(full_index.path, warm=False, reload_interval=0)) as base, \
            httpx.Client(base_url=base, timeout=60) as c:
        r = c.post("/api/search", json={"text": "a photo", "k": 2, "offset": 1, "sort": "-date", "threshold": -1.0,
                                        "filters": filters})
        assert r.status_code == 200, r.text
        service_hits = r.json()["results"]
        by_image = c.post("/api/search/image", files={"image": (library / "home" / "chelsea.jpg").read_bytes()},
                          data={"k": "3", "filters": json.dumps({"orientation": "landscape"})})
        assert by_image.status_code == 200, by_image.text
        assert [h["id"] for h in by_image.json()["results"]] == \
            [h.id for h in full_index.search(image=library / "home" / "chelsea.jpg", k=3,
                                             filters={"orientation": "landscape"})]
        assert c.post("/api/search/image", files={"image": (library / "home" / "chelsea.jpg").read_bytes()},
                      data={"filters": "[1, 2]"}).status_code == 400
        bad = c.post("/api/search", json={"text": "a photo", "filters": {"orientation": "diagonal"}})
        assert bad.status_code == 400 and "orientation must be one of" in bad.json()["message"]
        assert c.post("/api/search", json={"text": "a photo", "sort": "name"}).status_code == 400
    for hits in (cli_hits, service_hits):
        assert [h["id"] for h in hits] == [h.id for h in api]
        assert [h["rank"] for h in hits] == [1, 2]
        assert [h["taken"] for h in hits] == [h.taken for h in api]
        np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in api], atol=1e-5)


def test_cli_refuses_bad_filter_values_with_one_line(full_index):
    result = CliRunner().invoke(cli_app, ["search", "--index", str(full_index.path), "--text", "x",
                                          "--taken-after", "yesterday"])
    assert result.exit_code == 2 and "taken_after must be a date" in result.output
    assert "Traceback" not in result.output
    for ids, says in (("3,x", "--ids must be image ids"), ("", "--ids is empty"), (" , ", "--ids is empty")):
        result = CliRunner().invoke(cli_app, ["search", "--index", str(full_index.path), "--text", "x", "--ids", ids])
        assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, (ids, result.output)


def test_shard_set_filters_like_one_index(tmp_path, library):
    from finegrain.shards import ShardedIndex

    whole = Index.create(tmp_path / "whole")
    whole.add([library])
    for part in ("trip", "home"):
        Index.create(tmp_path / part).add([library / part])
    shards = ShardedIndex.create(tmp_path / "set", [tmp_path / "trip", tmp_path / "home"])
    for kwargs in ({"filters": {"orientation": "landscape"}, "k": 3},
                   {"filters": {"make": "canon"}, "k": 2, "offset": 1},
                   {"k": 4, "sort": "-date", "threshold": -1.0}):
        one = whole.search(text="a photo of a cat", **kwargs)
        many = shards.search(text="a photo of a cat", **kwargs)
        assert [h.path for h in many] == [h.path for h in one]
        assert [h.rank for h in many] == [h.rank for h in one] and [h.taken for h in many] == [h.taken for h in one]
        np.testing.assert_allclose([h.score for h in many], [h.score for h in one], atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_ann_search_over_selected_rows(kind):
    from finegrain.store.ann import VectorIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = np.sort(rng.choice(3000, 400, replace=False))
    queries = vectors[:5]
    scores, found = VectorIndex(vectors, kind).search_rows(queries, 10, rows)
    assert np.isin(found[found >= 0], rows).all()
    if kind == "flat":  # exact over the rows
        exact = np.argsort(-(queries @ vectors[rows].T), axis=1)[:, :10]
        np.testing.assert_array_equal(found, rows[exact])


def test_global_mode_through_the_id_selector(full_index, monkeypatch):
    from finegrain.retrieval import dense

    monkeypatch.setattr(dense, "EXACT_ALLOWED_ROWS", 0)  # what a large allowed set takes: FAISS with a selector
    everything = full_index.search(text="a rocket", k=len(PHOTOS))
    allowed = [h.id for h in everything][2:]
    got = full_index.search(text="a rocket", k=5, filters={"ids": allowed})
    assert [h.id for h in got] == allowed[:5]


def test_a_plugin_mode_without_filter_support_is_filtered_too(full_index):
    from finegrain import retrieval
    from finegrain.retrieval.dense import hits_from

    class ByIdRetriever(retrieval.Retriever):
        name = "by-id"
        modes = ("by-id",)

        def search(self, snapshot, mode, query, k, params):
            ids = snapshot.ids[::-1][:k]
            return retrieval.SearchResponse(hits_from(snapshot, ids, ids.astype(np.float32)), mode)

    plugin = retrieval.register(ByIdRetriever())
    try:
        ids = sorted(full_index.records)
        got = full_index.search(text="x", mode="by-id", k=3, filters={"ids": ids[:5]}, offset=1)
        assert [h.id for h in got] == ids[:5][::-1][1:4] and [h.rank for h in got] == [1, 2, 3]
    finally:
        retrieval.unregister(plugin)
