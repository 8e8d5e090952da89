"""Contact sheets for the model card: text queries and their top-5 images, v1 ("before") and v2 ("after").

Four JPEGs in ``--out`` (docs/img): for each bundled encoder, the demo photos
(``finegrain demo``'s queries plus a few harder ones, fixed before any
result was seen) and Flickr8k dev (12 captions: every 400th of the 5,000 dev
captions in split-file order, caption positions 0, 400, ..., 4400, searched
over the 1,000 dev images). One row per query: the query, its top 5 (the
expected image outlined green), and, when the expected image is not in the
top 5, that image with its rank. Everything goes through the product's API:
``Index.create`` / ``add`` / ``search``; demo queries in the demo's mode
(``auto``), dev captions in ``global`` (the mode of the model card's dev
numbers). Prints the ranks as JSON.

    nice -n 19 .venv/bin/python -m experiments.model_card_pictures --data ../shared/data/flickr8k \\
        --cache /work/cache/cardpics --v1-dev-index /work/cache/himir17/dev.fg --out docs/img

``--v1-dev-index`` reuses an existing ``effnet-minilm`` index of exactly the
dev images (checked); without it each encoder's dev index is built under
``--cache`` (resumable: ``add`` skips what is indexed).
"""

from __future__ import annotations

import argparse
import io
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from finegrain import demo
from finegrain.datasets import load_flickr8k
from finegrain.index import Index, remove_index

ENCODERS = (("effnet-minilm", "v1", "before"), ("effnet-minilm-v2", "v2", "after"))
# The photo each demo query is about (a demo query missing here stops the script: no silent drop).
DEMO_EXPECTED = {"a cat": "chelsea", "a man taking a picture": "camera", "a horse": "horse",
                 "green grass": "grass", "a brick wall": "brick", "coins on a table": "coins",
                 "stars in the night sky": "hubble_deep_field"}
# Harder ones, outside Flickr8k's vocabulary or about textures (chosen before looking at results).
HARDER = (("an astronaut", "astronaut"), ("a rocket", "rocket"), ("a cup of coffee", "coffee"),
          ("a clock", "clock"), ("the moon", "moon"), ("gravel", "gravel"))
DEV_EVERY, DEV_N = 400, 12  # caption positions 0, 400, ..., 4400: 12 different images

THUMB, GAP, TEXT_W, MARGIN = 96, 8, 230, 12
MAX_BYTES = 240_000
GREEN, ORANGE, GREY, INK = (22, 160, 60), (230, 120, 0), (236, 236, 236), (30, 30, 30)


@dataclass
class Row:
    query: str
    expected: str  # path of the expected image
    top: list[tuple[str, float]]  # (path, score) of the top 5
    rank: int  # 1-based rank of the expected image
    mode: str
    crop: tuple[str, tuple[int, int, int, int]] | None = None  # an image query: (path, box)


def demo_queries() -> list[tuple[str, str]]:
    missing = [q for q in demo.TEXT_QUERIES if q not in DEMO_EXPECTED]
    if missing:
        raise SystemExit(f"demo queries without an expected photo here: {missing}")
    return [(q, DEMO_EXPECTED[q]) for q in demo.TEXT_QUERIES] + list(HARDER)


def ranked(index: Index, query: str, expected: str, mode: str, **kw: Any) -> Row:
    response = index.search(k=len(index), mode=mode, **kw)
    hits = list(response)
    rank = [Path(h.path).name for h in hits].index(Path(expected).name) + 1
    return Row(query, expected, [(h.path, float(h.score)) for h in hits[:5]], rank, response.mode)


def demo_rows(encoder: str, cache: Path) -> list[Row]:
    photos = cache / "demo" / "images"
    demo.write_sample_photos(photos)
    path = cache / "demo" / f"{encoder}.fg"
    if path.exists():
        remove_index(path)
    with Index.create(path, encoder=encoder) as index:
        index.add([photos])
        rows = [ranked(index, q, str(photos / f"{name}.png"), "auto", text=q) for q, name in demo_queries()]
        name, box = demo.IMAGE_QUERY
        image = photos / f"{name}.png"
        row = ranked(index, f"image: {name}.png, box {box}", str(image), "auto", image=image, bbox=box)
        row.crop = (str(image), box)
        rows.append(row)
    return rows


def dev_index(encoder: str, data: Path, cache: Path, reuse: Path | None) -> Index:
    images = load_flickr8k(data, "dev").image_paths()
    if reuse is not None:
        index = Index.open(reuse)
        have = sorted(Path(r.path).name for r in index.records.values())
        if index.snapshot.settings["encoder"] != encoder or have != sorted(p.name for p in images):
            raise SystemExit(f"{reuse} is not an {encoder} index of exactly the {len(images)} dev images")
        return index
    index = Index.create(cache / f"dev-{encoder}.fg", encoder=encoder, exist_ok=True)
    index.add([str(p) for p in images], show_progress=True)
    return index


def dev_rows(index: Index, data: Path) -> list[Row]:
    ds = load_flickr8k(data, "dev")
    paths = ds.image_paths()
    picked = range(0, DEV_N * DEV_EVERY, DEV_EVERY)
    return [ranked(index, ds.captions[c], str(paths[ds.caption_image[c]]), "global", text=ds.captions[c])
            for c in picked]


def thumb(path: str, box: tuple[int, int, int, int] | None = None, side: int = THUMB) -> Image.Image:
    with Image.open(path) as opened:
        im = opened.convert("RGB")
    if box is not None:
        im = im.crop(box)
    return ImageOps.pad(im, (side, side), color=GREY)  # the whole picture, letterboxed


def wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
         width: int) -> list[str]:
    for chars in range(60, 8, -2):
        lines = textwrap.wrap(text, chars)
        if all(draw.textlength(line, font=font) <= width for line in lines):
            return lines
    return textwrap.wrap(text, 8)


def render(title: str, rows: list[Row], out: Path, names: bool) -> None:
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    label_h = 30 if names else 16
    row_h = THUMB + label_h + GAP
    width = MARGIN * 2 + TEXT_W + 6 * (THUMB + GAP) + GAP
    head = 46
    sheet = Image.new("RGB", (width, head + row_h * len(rows) + MARGIN), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, 8), title, fill=INK, font=ImageFont.load_default(size=15))
    draw.text((MARGIN, 28), "green outline: the expected image in the top 5; orange, right: the expected image "
              "and its rank when it is not", fill=(90, 90, 90), font=small)
    for i, row in enumerate(rows):
        y = head + i * row_h
        draw.line((MARGIN, y - 3, width - MARGIN, y - 3), fill=(215, 215, 215))
        lines = wrap(draw, row.query, font, TEXT_W - 8)
        for n, line in enumerate(lines[:6]):
            draw.text((MARGIN, y + 2 + 16 * n), line, fill=INK, font=font)
        if row.crop is not None:
            sheet.paste(thumb(row.crop[0], row.crop[1], 48), (MARGIN, y + 6 + 16 * len(lines)))
        x0 = MARGIN + TEXT_W
        cells: list[tuple[str, float | None, str]] = [(p, s, f"#{r + 1}") for r, (p, s) in enumerate(row.top)]
        if row.rank > 5:
            cells.append((row.expected, None, f"expected: #{row.rank}"))
        for c, (path, score, label) in enumerate(cells):
            x = x0 + c * (THUMB + GAP) + (GAP if c == 5 else 0)
            sheet.paste(thumb(path), (x, y))
            if Path(path).name == Path(row.expected).name:
                colour = GREEN if c < 5 else ORANGE
                draw.rectangle((x - 3, y - 3, x + THUMB + 2, y + THUMB + 2), outline=colour, width=4)
            text = label if score is None else f"{label}  {score:.3f}"
            draw.text((x, y + THUMB + 3), text, fill=ORANGE if score is None else INK, font=small)
            if names:
                draw.text((x, y + THUMB + 16), Path(path).stem[:16], fill=(90, 90, 90), font=small)
    out.parent.mkdir(parents=True, exist_ok=True)
    for quality in range(80, 40, -5):  # the best quality under the size cap (noisy textures compress badly)
        buf = io.BytesIO()
        sheet.save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
        if buf.tell() <= MAX_BYTES:
            break
    out.write_bytes(buf.getvalue())


def summary(rows: list[Row]) -> dict:
    return {"queries": [{"query": r.query, "expected": Path(r.expected).name, "rank": r.rank, "mode": r.mode,
                         "top5": [Path(p).name for p, _ in r.top]} for r in rows],
            "top1": sum(r.rank == 1 for r in rows), "top5": sum(r.rank <= 5 for r in rows), "n": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the Flickr8k folder (../shared/data/flickr8k)")
    parser.add_argument("--cache", type=Path, required=True, help="where the demo and dev indexes are built")
    parser.add_argument("--v1-dev-index", type=Path, default=None, help="an existing effnet-minilm dev index")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    report = {}
    for encoder, version, when in ENCODERS:
        rows = demo_rows(encoder, args.cache)
        render(f"{encoder} ({version}, {when}): demo photos, {len(rows) - 1} text queries and the demo's image "
               f"query, top 5 of {len(demo.SAMPLE_PHOTOS)}", rows, args.out / f"card-demo-{version}.jpg", names=True)
        reuse = args.v1_dev_index if encoder == "effnet-minilm" else None
        with dev_index(encoder, args.data, args.cache, reuse) as index:
            dev = dev_rows(index, args.data)
            last = (DEV_N - 1) * DEV_EVERY
            render(f"{encoder} ({version}, {when}): Flickr8k dev, captions 0, {DEV_EVERY}, ..., {last}, top 5 of "
                   f"{len(index)} images", dev, args.out / f"card-dev-{version}.jpg", names=False)
        report[encoder] = {"demo": summary(rows), "dev": summary(dev)}
        print(json.dumps({encoder: report[encoder]}), flush=True)


if __name__ == "__main__":
    main()
