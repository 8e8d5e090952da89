"""The web page in a real browser: Debian's Chromium driven by Playwright, against a live server on loopback."""

from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path

import pytest

from finegrain import Index
from finegrain.decompose.segments import SegmentConfig
from finegrain.service import create_app
from finegrain.service.background import BackgroundServer

CHROMIUM = Path(os.environ.get("FINEGRAIN_CHROMIUM", "/usr/bin/chromium"))
INSTALL = "apt-get install -y chromium (or `make chromium`); Playwright for Python: pip install -e '.[test]'"
# Flags for a closed network, as root, in a container (see the machine notes).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason=f"playwright is not installed; install: {INSTALL}"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium not found at {CHROMIUM}; install: {INSTALL}"),
]


@pytest.fixture(scope="module")
def url(tmp_path_factory, photos_dir):
    root = tmp_path_factory.mktemp("webpage")
    index = Index.create(root / "index", segments=SegmentConfig(levels=(4, 9, 16)))
    index.add([photos_dir])
    index.close()
    with BackgroundServer(create_app(root / "index", reload_interval=0)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # JavaScript errors fail the test; 4xx answers are logged by the browser and shown by the page (tested).
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and "responded with a status of 4" not in msg.text else None)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    yield page
    context.close()
    assert not errors, errors


def test_text_search_results_and_overlay(page, tmp_path):
    expect(page.locator("#index-info")).to_contain_text("6 images")
    assert page.locator("#mode").input_value() == "auto"  # the default: it picks hierarchical (the index has segments)
    page.fill("#k", "4")
    page.fill("#query", "a cat next to a cup of coffee")
    page.press("#query", "Enter")
    cards = page.locator(".result")
    expect(cards).to_have_count(4, timeout=30_000)
    expect(page.locator("#status")).to_contain_text("auto \u2192 hierarchical; sub-queries: a cat | a cup of coffee")
    scores = [float(s) for s in page.locator(".result .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert page.locator(".result .name").first.inner_text().endswith("chelsea.jpg")
    _wait_for_thumbnails(page)

    # The overlay: asked for after the search, so the page searches again with explanations.
    assert page.locator(".box").count() == 0
    page.check("#overlay-toggle")
    expect(page.locator(".result").first.locator(".box")).to_have_count(3, timeout=30_000)
    expect(page.locator("#legend .chip")).to_have_text(["full query", "a cat", "a cup of coffee"])
    first = page.locator(".result").first
    labels = first.locator(".box .label").all_inner_texts()
    assert any(label.startswith("a cat ") for label in labels) and any(label.startswith("a cup of coffee ") for label in labels)
    figure, box = first.locator(".thumb").bounding_box(), first.locator(".box").nth(1).bounding_box()
    assert box["width"] > 5 and box["height"] > 5
    assert figure["x"] - 1 <= box["x"] and box["x"] + box["width"] <= figure["x"] + figure["width"] + 1
    assert figure["y"] - 1 <= box["y"] and box["y"] + box["height"] <= figure["y"] + figure["height"] + 1
    expect(first.locator(".box").first).to_be_visible()
    shot = tmp_path / "overlay.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("FINEGRAIN_SCREENSHOT_DIR"):  # keep a copy to look at
        shutil.copy(shot, Path(os.environ["FINEGRAIN_SCREENSHOT_DIR"]) / "web-page-overlay.png")

    page.uncheck("#overlay-toggle")
    expect(first.locator(".box").first).to_be_hidden()


def test_image_dropped_on_the_page_finds_itself(page, photos_dir):
    data = base64.b64encode((photos_dir / "rocket.jpg").read_bytes()).decode()
    page.select_option("#mode", "global")
    transfer = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "rocket.jpg", {type: "image/jpeg"}));
            return dt;
        }""", data)
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    expect(page.locator(".result").first.locator(".name")).to_contain_text("rocket.jpg", timeout=30_000)
    expect(page.locator("#drop-preview")).to_be_visible()
    page.check("#overlay-toggle")  # global mode: the overlay states the whole-image score
    expect(page.locator(".result").first.locator(".note")).to_contain_text("whole-image match", timeout=30_000)


def test_errors_are_shown(page):
    page.evaluate("document.getElementById('query').removeAttribute('maxlength')")
    page.fill("#query", "a cat " * 100)  # over the server's query length limit
    page.press("#query", "Enter")
    expect(page.locator("#status")).to_have_class("error")
    expect(page.locator("#status")).to_contain_text("limit is 500")


def _wait_for_thumbnails(page, timeout: float = 30.0) -> None:
    """Every result's thumbnail loaded and decoded (polled from here: the page's CSP forbids eval,
    which Playwright's wait_for_function uses to poll)."""
    deadline = time.monotonic() + timeout
    images = page.locator(".result img")
    while not images.evaluate_all("imgs => imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"):
        assert time.monotonic() < deadline, "thumbnails did not load"
        time.sleep(0.05)
