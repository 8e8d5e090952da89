"""The demo that `make demo` runs: sample photos indexed, queries answered, an HTML page written."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from finegrain.demo import IMAGE_QUERY, SAMPLE_PHOTOS, TEXT_QUERIES, run_demo


def test_demo_end_to_end(tmp_path):
    result = run_demo(tmp_path / "demo", console=Console(file=open(tmp_path / "log.txt", "w")))
    assert result["indexed"] == len(SAMPLE_PHOTOS)
    assert len(result["queries"]) == len(TEXT_QUERIES) + 1
    page = (tmp_path / "demo" / "results.html").read_text()
    assert page.count("<section>") == len(TEXT_QUERIES) + 1 and page.count("<img") == 5 * (len(TEXT_QUERIES) + 1)
    for title, hits in result["queries"]:
        for hit in hits:
            assert (tmp_path / "demo" / "images" / Path(hit["path"]).name).exists()
    top = {title: Path(hits[0]["path"]).stem for title, hits in result["queries"]}
    assert top["text: a cat"] == "chelsea"
    assert top[f"image: {IMAGE_QUERY[0]}.png cropped to {IMAGE_QUERY[1]}"] == "chelsea"
    # Running it again replaces the previous index instead of failing.
    again = run_demo(tmp_path / "demo", console=Console(file=open(tmp_path / "log2.txt", "w")))
    assert again["indexed"] == len(SAMPLE_PHOTOS)
