"""The page's features (issue 16, item 8) and the endpoints behind them, against one live server on loopback.

API: ``GET /api/images/{id}`` (details), ``/api/images/{id}/file`` (the full image), ``like`` in
``POST /api/search`` (more like this), with their 4xx answers. Browser (Debian's Chromium driven by
Playwright): every state of the page with a screenshot and a person-like look at it (the elements that
matter are visible and inside the viewport, captions clear of each other and of the overlay boxes, text
not clipped). And one test driving the CLI, the Python API, the service and the page with the same
filters, threshold, offset and k: the same ordered results.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finegrain import Index
from finegrain.cli import app as cli_app
from finegrain.decompose.segments import SegmentConfig
from finegrain.service import create_app
from finegrain.service.background import BackgroundServer

CHROMIUM = Path(os.environ.get("FINEGRAIN_CHROMIUM", "/usr/bin/chromium"))
INSTALL = "apt-get install -y chromium (or `make chromium`); Playwright for Python: pip install -e '.[test]'"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1280, "height": 900}

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

#: name -> (folder, size (w, h), EXIF DateTimeOriginal or None (then the file's mtime dates it), make, model)
PHOTOS = {
    "astronaut": ("trip", (240, 180), "2021:07:14 10:30:00", "Canon", "Canon EOS R5"),
    "coffee": ("trip", (180, 240), "2022:01:02 08:00:00", "NIKON CORPORATION", "NIKON Z 6"),
    "chelsea": ("home", (240, 180), "2023:06:01 12:00:00", "Canon", "Canon EOS 80D"),
    "rocket": ("home", (240, 160), None, None, None),
    "camera": ("home", (200, 200), "2023:12:31 23:59:59", "Apple", "iPhone 12"),
    "coins": ("trip", (240, 180), "2019:03:03 03:03:03", "Canon", "Canon EOS R5"),
    "clock": ("trip", (180, 240), "2021:07:15 16:45:00", "NIKON CORPORATION", "NIKON D750"),
    "hubble_deep_field": ("home", (240, 200), "2022:11:11 11:11:11", "Apple", "iPhone 14 Pro"),
    "immunohistochemistry": ("trip", (200, 240), "2020:02:29 06:00:00", "Canon", "Canon EOS R5"),
}
CANON = {"astronaut", "chelsea", "coins", "immunohistochemistry"}


def _photo(name: str, size) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return Image.fromarray(arr[..., :3]).convert("RGB").resize(size)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pagelib")
    for name, (folder, size, taken, make, model) in PHOTOS.items():
        (root / folder).mkdir(exist_ok=True)
        exif = Image.Exif()
        if make:
            exif[271], exif[272] = make, model
        exif[274] = 1
        if taken:
            exif.get_ifd(0x8769)[36867] = taken
        _photo(name, size).save(root / folder / f"{name}.jpg", quality=90, exif=exif.tobytes())
    _photo("page", (160, 120)).save(root / "home" / "page.tif")  # not a web format: re-encoded when opened
    return root


@pytest.fixture(scope="module")
def index_path(tmp_path_factory, library) -> Path:
    path = tmp_path_factory.mktemp("pageidx") / "index"
    index = Index.create(path, segments=SegmentConfig(levels=(4,)))
    report = index.add([library])
    assert report.indexed == len(PHOTOS) + 1 and not report.failed
    index.close()
    return path


@pytest.fixture(scope="module")
def index(index_path):
    idx = Index.open(index_path)
    yield idx
    idx.close()


@pytest.fixture(scope="module")
def url(index_path):
    with BackgroundServer(create_app(index_path, reload_interval=0)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def _ids(index: Index) -> dict[str, int]:
    return {Path(r.path).stem: r.id for r in index.records.values()}


# ------------------------------------------------------------------ the endpoints
def test_image_details_say_where_the_file_is_and_what_exif_says(client, index, library):
    ids = _ids(index)
    d = client.get(f"/api/images/{ids['coffee']}").json()
    assert d["path"] == str(library / "trip" / "coffee.jpg") and d["name"] == "coffee.jpg"
    assert (d["width"], d["height"], d["orientation"]) == (180, 240, "portrait")
    assert (d["taken"], d["taken_source"]) == ("2022-01-02T08:00:00", "exif")
    assert (d["make"], d["model"], d["exif_orientation"]) == ("NIKON CORPORATION", "NIKON Z 6", 1)
    assert d["file"] == f"/api/images/{ids['coffee']}/file" and d["bytes"] > 1000
    rocket = client.get(f"/api/images/{ids['rocket']}").json()  # no EXIF date: the file's mtime, said so
    assert rocket["taken_source"] == "mtime" and rocket["taken"] and rocket["make"] is None
    assert client.get(f"/api/images/{ids['camera']}").json()["orientation"] == "square"
    r = client.get(f"/api/images/{ids['camera']}?shard=0")  # one index, not a shard set
    assert r.status_code == 400 and "shard sets only" in r.json()["message"]
    for bad, status in (("999999", 404), ("-1", 422), ("abc", 422)):
        r = client.get(f"/api/images/{bad}")
        assert r.status_code == status and r.json()["error"] in ("not_found", "invalid_request"), r.text
        assert "Traceback" not in r.text


def test_full_image_is_the_stored_file_or_a_jpeg(client, index, library):
    ids = _ids(index)
    r = client.get(f"/api/images/{ids['chelsea']}/file")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == (library / "home" / "chelsea.jpg").read_bytes()  # the original bytes, EXIF and all
    assert r.headers["x-content-type-options"] == "nosniff" and "chelsea.jpg" in r.headers["content-disposition"]
    tif = client.get(f"/api/images/{ids['page']}/file")  # TIFF: browsers cannot show it, so a JPEG of it
    assert tif.status_code == 200 and tif.headers["content-type"] == "image/jpeg"
    assert "page.jpg" in tif.headers["content-disposition"]
    with Image.open(__import__("io").BytesIO(tif.content)) as img:
        assert img.format == "JPEG" and img.size == (160, 120)
    assert client.get("/api/images/999999/file").json()["error"] == "not_found"


def test_a_vanished_file_is_image_unavailable(client, index, library):
    ids = _ids(index)
    path = library / "trip" / "clock.jpg"
    moved = path.with_suffix(".away")
    path.rename(moved)
    try:
        r = client.get(f"/api/images/{ids['clock']}/file")
        assert r.status_code == 404 and r.json()["error"] == "image_unavailable"
        like = client.post("/api/search", json={"like": ids["clock"], "k": 3})
        assert like.status_code == 404 and like.json()["error"] == "image_unavailable"
        assert client.get(f"/api/images/{ids['clock']}").status_code == 200  # details come from the catalog
    finally:
        moved.rename(path)


def test_more_like_this_searches_with_the_indexed_file(client, index, library):
    ids = _ids(index)
    r = client.post("/api/search", json={"like": ids["chelsea"], "k": 4, "mode": "global"})
    assert r.status_code == 200, r.text
    got = [h["id"] for h in r.json()["results"]]
    assert got[0] == ids["chelsea"]  # finds itself first
    assert got == [h.id for h in index.search(like=ids["chelsea"], k=4, mode="global")]
    assert got == [h.id for h in index.search(image=library / "home" / "chelsea.jpg", k=4, mode="global")]
    auto = client.post("/api/search", json={"like": ids["chelsea"], "k": 2, "filters": {"make": "canon"},
                                            "explain": True}).json()
    assert auto["requested_mode"] == "auto" and auto["results"][0]["explanation"]["id"] == ids["chelsea"]
    for body, status, words in (
            ({"like": 999999}, 404, "no indexed image with id 999999"),
            ({"like": ids["chelsea"], "text": "a cat"}, 422, "exactly one of text"),
            ({"like": -3}, 422, "greater than or equal to 0"),
            ({"like": "chelsea"}, 422, "valid integer"),
            ({"like": ids["chelsea"], "negative": [""]}, 400, "empty")):
        bad = client.post("/api/search", json=body)
        assert bad.status_code == status and words in bad.json()["message"], (body, bad.text)
    with pytest.raises(ValueError, match="no indexed image with id 999999"):
        index.search(like=999999)
    with pytest.raises(ValueError, match="instead of text="):
        index.search(like=ids["chelsea"], text="a cat")
    with pytest.raises(ValueError, match="an integer"):
        index.search(like="3")


def test_cli_more_like_this(index_path, index):
    ids = _ids(index)
    ok = CliRunner().invoke(cli_app, ["search", "--index", str(index_path), "--like", str(ids["coins"]),
                                      "-k", "3", "--json"])
    assert ok.exit_code == 0, ok.output
    assert [h["id"] for h in json.loads(ok.output)["results"]] == [h.id for h in index.search(like=ids["coins"], k=3)]
    for args, words in ((["--like", "999999"], "no indexed image with id 999999"),
                        (["--like", str(ids["coins"]), "--text", "x"], "instead of --text")):
        bad = CliRunner().invoke(cli_app, ["search", "--index", str(index_path), *args])
        assert bad.exit_code == 2 and words in bad.output and "Traceback" not in bad.output, bad.output


# ------------------------------------------------------------------ the page
@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None or not CHROMIUM.exists():
        pytest.skip(f"Chromium and Playwright are needed; install: {INSTALL}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, url):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and "responded with a status of 4" not in msg.text else None)
    page.base = url  # type: ignore[attr-defined]
    yield page
    context.close()
    assert not errors, errors


def _open(page, query: dict | None = None) -> None:
    page.goto(page.base + "/" + ("?" + urlencode(query) if query else ""))
    page.seen = 0  # type: ignore[attr-defined]  # searches finished in this document
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)


def _search(page, text: str, k: int = 6) -> None:
    page.fill("#k", str(k))
    page.fill("#query", text)
    page.press("#query", "Enter")
    _wait_results(page)


def _wait_results(page, timeout: float = 30.0) -> None:
    """The next search since the last wait finished (the page counts finished searches in body[data-searches])."""
    deadline = time.monotonic() + timeout
    while True:
        done = int(page.evaluate("() => document.body.dataset.searches || '0'"))
        if done > page.seen:
            page.seen = done
            return
        assert time.monotonic() < deadline, "the search did not finish"
        time.sleep(0.05)


def _names(page) -> list[str]:
    return [n.split(" ", 1)[1] for n in page.locator(".result .name").all_inner_texts()]


def _card_ids(page) -> list[int]:
    return [int(i) for i in page.locator(".result").evaluate_all("cs => cs.map(c => c.dataset.id)")]


def _wait_images(page, selector: str = ".result img", timeout: float = 30.0) -> None:
    """Every matching image loaded and decoded (polled from here: the page's CSP forbids eval)."""
    deadline = time.monotonic() + timeout
    images = page.locator(selector)
    while not images.evaluate_all("imgs => imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"):
        assert time.monotonic() < deadline, f"{selector} did not load"
        time.sleep(0.05)


def _overlaps(a: dict, b: dict, slack: float = 0.5) -> bool:
    return (a["x"] + slack < b["x"] + b["width"] and b["x"] + slack < a["x"] + a["width"]
            and a["y"] + slack < b["y"] + b["height"] and b["y"] + slack < a["y"] + a["height"])


def _inside(inner: dict, outer: dict, slack: float = 1.0) -> bool:
    x, y = outer["x"] - slack, outer["y"] - slack
    right, bottom = outer["x"] + outer["width"] + slack, outer["y"] + outer["height"] + slack
    return x <= inner["x"] and inner["x"] + inner["width"] <= right and y <= inner["y"] \
        and inner["y"] + inner["height"] <= bottom


def _look(page, tmp_path: Path, state: str, must_see: list[str]) -> None:
    """A person's look at one state: a screenshot, the elements that matter visible in the viewport,
    the result cards' parts inside their cards and clear of each other and of the overlay, no clipped text."""
    screen = {"x": 0, "y": 0, **page.viewport_size}
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), \
        f"{state}: the page scrolls sideways"
    for selector in must_see:
        loc = page.locator(selector).first
        expect(loc).to_be_visible()
        loc.scroll_into_view_if_needed()
        box = loc.bounding_box()
        assert box and box["width"] > 2 and box["height"] > 2, (state, selector, box)
        assert _inside(box, screen), f"{state}: {selector} is outside the viewport: {box}"
    page.evaluate("() => window.scrollTo(0, 0)")
    cards = page.locator(".result")
    captions = []
    for i in range(min(cards.count(), 8)):
        card = cards.nth(i)
        if not card.is_visible():
            continue
        cbox = card.bounding_box()
        parts = {p: card.locator(p).bounding_box() for p in (".thumb", ".caption .name", ".caption .score", ".actions")}
        for part, box in parts.items():
            assert box and _inside(box, cbox), f"{state}: card {i} {part} sticks out of its card"
        assert not _overlaps(parts[".caption .name"], parts[".caption .score"]), f"{state}: name over score"
        caption = card.locator(".caption").bounding_box()
        captions.append(caption)
        for b in card.locator(".overlay .box, .overlay .label, .overlay .note").all():
            if b.is_visible():
                bb = b.bounding_box()
                assert not _overlaps(bb, caption), f"{state}: card {i}: the overlay covers the caption"
                assert _inside(bb, parts[".thumb"], 3), f"{state}: card {i}: an overlay box outside the image"
        actions = card.locator(".action").all()
        for a, b in zip(actions, actions[1:]):
            assert not _overlaps(a.bounding_box(), b.bounding_box()), f"{state}: card {i}: actions overlap"
        for a in actions:  # buttons' words fit (no ellipsis needed at this width)
            assert a.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), f"{state}: clipped {a.inner_text()!r}"
    for i, a in enumerate(captions):
        for b in captions[i + 1:]:
            assert not _overlaps(a, b), f"{state}: two captions overlap"
    clipped = page.evaluate("""() => [...document.querySelectorAll(
            '#status, #page-info, .empty li, .welcome p, #details dd, #details dt, #details h2')]
        .filter(e => e.offsetParent !== null && (e.scrollWidth > e.clientWidth + 1))
        .map(e => e.id || e.className || e.tagName)""")
    assert not clipped, f"{state}: clipped text in {clipped}"
    shot = tmp_path / f"page-{state}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5_000
    if os.environ.get("FINEGRAIN_SCREENSHOT_DIR"):  # keep a copy to look at
        shutil.copy(shot, Path(os.environ["FINEGRAIN_SCREENSHOT_DIR"]) / shot.name)


def _query(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def test_first_visit_results_overlay_details_and_more_like_this(page, tmp_path, index):
    _open(page)
    expect(page.locator(".welcome")).to_contain_text("Search 10 images")
    _look(page, tmp_path, "first-visit", [".welcome", "#query", "#filters", ".welcome .example"])

    _search(page, "a cat next to a cup of coffee")
    assert _names(page)[0] == "chelsea.jpg" and page.locator(".result").count() == 6
    assert _query(page) == {"q": "a cat next to a cup of coffee", "k": "6"}
    _wait_images(page)
    page.check("#overlay-toggle")
    _wait_results(page)
    expect(page.locator(".result").first.locator(".box")).to_have_count(3)
    assert _query(page) == {"q": "a cat next to a cup of coffee", "k": "6"}  # re-fetched explained, same URL
    _wait_images(page)
    _look(page, tmp_path, "results-overlay", [".result", "#pager", "#status", ".result .box"])
    page.uncheck("#overlay-toggle")

    ids = _ids(index)
    first = page.locator(".result").first
    first.locator(".info").click()
    expect(page.locator("#details[data-ready='1']")).to_be_visible(timeout=30_000)
    expect(page.locator("#details")).to_contain_text(str(Path(index.get(ids["chelsea"]).path)))
    expect(page.locator("#details")).to_contain_text("Canon \u00b7 Canon EOS 80D")
    expect(page.locator("#details")).to_contain_text("2023-06-01 12:00:00 (EXIF)")
    _wait_images(page, "#details-image")
    _look(page, tmp_path, "details", ["#details", "#details-list", "#details-like", "#details-open", "#details-close"])
    assert page.locator("#details-open").get_attribute("href") == f"api/images/{ids['chelsea']}/file"
    page.keyboard.press("Escape")
    expect(page.locator("#details")).to_be_hidden()

    page.locator(".result").nth(1).locator(".like").click()  # more like the second result
    _wait_results(page)
    second = ids[_names(page)[0].rsplit(".", 1)[0]]
    assert _query(page)["like"] == str(second) and "q" not in _query(page)
    expect(page.locator("#status")).to_contain_text(f"more like image {second}")
    assert _card_ids(page) == [h.id for h in index.search(like=second, k=6)]
    href = page.locator(".result").first.locator(".open").get_attribute("href")
    r = page.request.get(page.base + "/" + href)
    assert r.status == 200 and r.headers["content-type"].startswith("image/")
    page.go_back()  # back to the text search, restored and run again
    _wait_results(page)
    assert page.input_value("#query") == "a cat next to a cup of coffee" and _names(page)[0] == "chelsea.jpg"


def test_filters_pages_empty_states_and_the_back_button(page, tmp_path, index, library):
    _open(page)
    page.fill("#f-make", "canon")
    _search(page, "a photo", k=2)
    assert set(_names(page)) <= {f"{n}.jpg" for n in CANON} and len(_names(page)) == 2
    expect(page.locator("#status")).to_contain_text("4 images pass the filters")
    assert _query(page) == {"q": "a photo", "k": "2", "make": "canon"}
    _look(page, tmp_path, "filters", [".result", "#f-make", "#status", "#pager"])
    page1 = _card_ids(page)
    expected = [h.id for h in index.search(text="a photo", k=4, filters={"make": "canon"})]
    assert page1 == expected[:2]

    page.click("#next-page")  # page 2: the next two of the same ranking
    _wait_results(page)
    assert _card_ids(page) == expected[2:] and _query(page)["offset"] == "2"
    expect(page.locator("#page-info")).to_have_text("page 2 \u00b7 results 3\u20134")
    expect(page.locator("#prev-page")).to_be_enabled()
    expect(page.locator("#next-page")).to_be_enabled()  # a full page: there may be more
    _look(page, tmp_path, "page-2", [".result", "#page-info", "#prev-page"])
    page.click("#next-page")  # past the last match: the empty state says so and offers the first page
    _wait_results(page)
    expect(page.locator(".empty")).to_contain_text("past the last match")
    expect(page.locator("#next-page")).to_be_disabled()
    _look(page, tmp_path, "past-the-end", [".empty", "#empty-first", "#page-info"])

    page.go_back()  # back: page 2 again, run again from the URL
    _wait_results(page)
    assert _card_ids(page) == expected[2:] and page.input_value("#f-make") == "canon"
    page.go_back()
    _wait_results(page)
    assert _card_ids(page) == expected[:2] and _query(page).get("offset") is None
    page.go_forward()
    _wait_results(page)
    assert _card_ids(page) == expected[2:]
    _look(page, tmp_path, "back-forward", [".result", "#page-info"])

    page.fill("#threshold", "0.99")  # nothing scores that high: the empty state names the threshold
    page.press("#threshold", "Enter")
    _wait_results(page)
    empty = page.locator(".empty")
    expect(empty).to_contain_text("The minimum score 0.99 drops every result")
    expect(empty).to_contain_text("4 images pass the filters (make canon)")
    _look(page, tmp_path, "empty-threshold", [".empty", "#empty-clear"])
    page.fill("#threshold", "")
    page.fill("#f-make", "leica")  # no image passes: says so
    page.select_option("#f-orientation", "portrait")
    page.press("#f-make", "Enter")
    _wait_results(page)
    expect(empty).to_contain_text("No image passes the filters (make leica, orientation portrait)")
    _look(page, tmp_path, "empty-filters", [".empty", "#empty-clear"])
    page.click("#empty-clear")  # clears them and searches again
    _wait_results(page)
    assert page.locator(".result").count() == 2 and page.input_value("#f-make") == ""
    assert "make" not in _query(page) and "orientation" not in _query(page)

    page.fill("#f-taken_after", "yesterday")  # a bad value: the server's one-line reason, no results
    page.press("#f-taken_after", "Enter")
    _wait_results(page)
    expect(page.locator("#status")).to_have_class("error")
    expect(page.locator("#status")).to_contain_text("taken_after must be a date")


def test_a_shared_link_runs_its_search_and_keys_drive_the_page(page, tmp_path, index, library):
    ids = _ids(index)
    link = {"q": '"a cat" - "a cup of coffee"', "k": "3", "mode": "global", "orientation": "landscape",
            "sort": "-date"}
    _open(page, link)  # a shared URL: the form shows it and the search runs
    _wait_results(page)
    expected = index.search(query=link["q"], k=3, mode="global", filters={"orientation": "landscape"}, sort="-date")
    assert _card_ids(page) == [h.id for h in expected]
    assert page.input_value("#query") == link["q"] and page.input_value("#mode") == "global"
    assert page.input_value("#f-orientation") == "landscape" and page.input_value("#sort") == "-date"
    expect(page.locator("#expr-badge")).to_be_visible()  # quotes and a lone -: an expression
    expect(page.locator("#status")).to_contain_text("expression: 3 results")
    _look(page, tmp_path, "shared-link", [".result", "#expr-badge", "#f-orientation"])
    page.check("#literal")  # the same words taken literally: a plain text query
    expect(page.locator("#expr-badge")).to_be_hidden()
    page.click("#search-button")
    _wait_results(page)
    assert _query(page)["literal"] == "1" and "expression" not in page.inner_text("#status")
    assert _card_ids(page) == [h.id for h in index.search(text=link["q"], k=3, mode="global",
                                                          filters={"orientation": "landscape"}, sort="-date")]

    _open(page)
    page.keyboard.press("/")
    assert page.evaluate("() => document.activeElement.id") == "query"
    page.keyboard.type("a cat next to a cup of coffee")
    page.keyboard.press("Enter")
    _wait_results(page)
    assert page.locator(".result").count() >= 6
    page.keyboard.press("ArrowDown")  # from the box into the results
    focused = "() => document.activeElement.dataset.id"
    cards = _card_ids(page)
    assert page.evaluate(focused) == str(cards[0])
    outline = page.locator(".result").first.evaluate("e => getComputedStyle(e).outlineStyle")
    assert outline != "none"  # the focus is visible
    page.keyboard.press("ArrowRight")
    assert page.evaluate(focused) == str(cards[1])
    columns = page.locator(".result").evaluate_all("cs => cs.filter(c => c.offsetTop === cs[0].offsetTop).length")
    page.keyboard.press("ArrowDown")
    assert page.evaluate(focused) == str(cards[min(1 + columns, len(cards) - 1)])
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("Enter")  # details of the focused result
    expect(page.locator("#details[data-ready='1']")).to_be_visible(timeout=30_000)
    shown = page.locator("#details").get_attribute("data-id")
    _look(page, tmp_path, "keyboard-details", ["#details", "#details-close"])
    page.keyboard.press("Escape")  # closed, the focus back on that result
    expect(page.locator("#details")).to_be_hidden()
    assert page.evaluate(focused) == shown
    page.keyboard.press("m")  # more like the focused result
    _wait_results(page)
    assert _query(page)["like"] == shown and _card_ids(page)[0] == int(shown)
    assert int(shown) in ids.values()


def test_cli_api_service_and_page_give_the_same_page(page, index, index_path, library, client):
    """The same filters, threshold, offset and k through all four surfaces: the same ordered results."""
    text, filters = "a photo of an object", {"path_prefix": str(library) + os.sep, "taken_after": "2020-01-01",
                                              "taken_before": "2024"}
    ranking = index.search(text=text, k=20, filters=filters)
    assert len(ranking) >= 7
    threshold = round((ranking[5].score + ranking[6].score) / 2, 6)  # keeps six: the threshold bites
    k, offset = 2, 2
    api = [h.id for h in index.search(text=text, k=k, offset=offset, threshold=threshold, filters=filters)]
    assert api == [h.id for h in ranking][offset:offset + k]

    cli = CliRunner().invoke(cli_app, [
        "search", "--index", str(index_path), "--text", text, "-k", str(k), "--offset", str(offset),
        "--threshold", str(threshold), "--path-prefix", filters["path_prefix"], "--taken-after", "2020-01-01",
        "--taken-before", "2024", "--json"])
    assert cli.exit_code == 0, cli.output
    service = client.post("/api/search", json={"text": text, "k": k, "offset": offset, "threshold": threshold,
                                               "filters": filters})
    assert service.status_code == 200, service.text

    _open(page)  # the page, driven like a person: filters, minimum score, k, search, then the next page
    page.fill("#f-path_prefix", filters["path_prefix"])
    page.fill("#f-taken_after", "2020-01-01")
    page.fill("#f-taken_before", "2024")
    page.fill("#threshold", str(threshold))
    _search(page, text, k=k)
    assert _card_ids(page) == [h.id for h in ranking][:k], page.inner_text("#status")
    page.click("#next-page")
    _wait_results(page)
    assert _query(page)["offset"] == str(offset) and _query(page)["threshold"] == str(threshold)
    names = {h.id: Path(h.path).name for h in index.search(text=text, k=20, filters=filters)}

    assert [h["id"] for h in json.loads(cli.output)["results"]] == api
    assert [h["id"] for h in service.json()["results"]] == api
    assert _card_ids(page) == api and _names(page) == [names[i] for i in api]


def test_a_narrow_window(browser, url, tmp_path, index):
    """A phone-sized window: the same states stay inside the screen, nothing overlaps or is cut."""
    context = browser.new_context(viewport={"width": 400, "height": 800})
    page = context.new_page()
    page.base = url  # type: ignore[attr-defined]
    try:
        _open(page, {"q": "a cat next to a cup of coffee", "k": "4"})
        _wait_results(page)
        assert page.locator(".result").count() == 4
        _wait_images(page)
        _look(page, tmp_path, "narrow-results", ["#query", "#search-button", ".result", "#filters"])
        page.locator(".result").first.locator(".info").click()
        expect(page.locator("#details[data-ready='1']")).to_be_visible(timeout=30_000)
        _look(page, tmp_path, "narrow-details", ["#details", "#details-close", "#details-list"])
    finally:
        context.close()
