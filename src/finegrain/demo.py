"""The ``finegrain demo``: real sample photos bundled with scikit-image, indexed and searched.

Writes ``<out>/images/*.png`` (the photos), ``<out>/index`` (a fresh index)
and ``<out>/results.html`` (every query with its ranked thumbnails).
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from .index import Index, remove_index

if TYPE_CHECKING:
    from .retrieval import SearchResponse

SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field",
                 "immunohistochemistry", "moon", "page", "retina", "clock", "brick", "grass", "gravel",
                 "text", "colorwheel", "horse")
# The bundled model learned from Flickr8k (people, animals, everyday scenes): these queries are
# in its domain. Rare objects (rockets, astronauts) are beyond it; see the model card.
TEXT_QUERIES = ("a cat", "a man taking a picture", "a horse", "green grass", "a brick wall",
                "coins on a table", "stars in the night sky")
IMAGE_QUERY = ("chelsea", (120, 20, 300, 200))  # the cat's face, as an image query with a box


def write_sample_photos(folder: Path) -> list[Path]:
    """Save scikit-image's bundled photographs as PNG files (no download needed)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SAMPLE_PHOTOS:
        arr = getattr(data, name)()
        if arr.dtype == bool:
            arr = (~arr).astype(np.uint8) * 255
        path = folder / f"{name}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def run_demo(out: Path, console: Console | None = None, k: int = 5) -> dict:
    """Run the demo end to end; returns the queries and their results."""
    console = console or Console()
    out = Path(out)
    write_sample_photos(out / "images")
    index_dir = out / "index"
    if index_dir.exists():
        remove_index(index_dir)
    t0 = time.perf_counter()
    index = Index.create(index_dir)
    report = index.add([out / "images"])
    console.print(f"indexed {report.indexed} sample photos in {time.perf_counter() - t0:.1f}s "
                  f"(model load included) -> {index_dir}")

    results: list[tuple[str, SearchResponse]] = []
    for text in TEXT_QUERIES:
        results.append((f"text: {text}", index.search(text=text, k=k)))
    name, box = IMAGE_QUERY
    results.append((f"image: {name}.png cropped to {box}",
                    index.search(image=out / "images" / f"{name}.png", bbox=box, k=k)))

    for title, hits in results:
        table = Table("rank", "score", "image", title=title, title_justify="left")
        for h in hits:
            table.add_row(str(h.rank + 1), f"{h.score:.3f}", Path(h.path).name)
        console.print(table)
    page = out / "results.html"
    page.write_text(render_html(results, page.parent))
    console.print(f"wrote {page}")
    return {"indexed": report.indexed, "queries": [(t, [h.as_dict() for h in hits]) for t, hits in results]}


def render_html(results: Sequence[tuple[str, Sequence[Any]]], base: Path) -> str:
    """A self-contained page: one row of thumbnails per query (paths relative to the page)."""
    rows = []
    for title, hits in results:
        cells = "".join(
            f'<figure><img src="{html.escape(_relative(h.path, base))}" alt=""><figcaption>#{h.rank + 1} '
            f'{html.escape(Path(h.path).name)}<br>score {h.score:.3f}</figcaption></figure>' for h in hits)
        rows.append(f"<section><h2>{html.escape(title)}</h2><div class=row>{cells}</div></section>")
    return ("<!doctype html><meta charset=utf-8><title>finegrain demo</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}h2{font-size:1.1em}.row{display:flex;gap:12px}"
            "figure{margin:0;width:160px}img{width:160px;height:120px;object-fit:cover;border-radius:4px}"
            "figcaption{font-size:12px;color:#444}</style><h1>finegrain demo</h1>" + "".join(rows))


def _relative(path: str, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return Path(path).as_uri()
