"""HEIC/HEIF (pillow-heif) and AVIF (Pillow's codec): real files made by the libraries, indexed and searched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain import Index
from finegrain.images import IMAGE_SUFFIXES, ImageLoadError, load_image, load_image_sized, load_thumbnail
from fgcli import fg as fg_in_process  # noqa: E402  (tests/ is on sys.path)

pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif is a core dependency; install it")
HAS_AVIF = ".avif" in IMAGE_SUFFIXES
needs_avif = pytest.mark.skipif(not HAS_AVIF, reason="this Pillow is built without AVIF (libavif)")

ORIENTATION = 0x0112
RED, BLUE = np.array([255, 0, 0]), np.array([0, 0, 255])


def two_colour(width: int = 80, height: int = 40) -> Image.Image:
    """Left half red, right half blue: where red ends up says how the image was turned."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = RED
    arr[:, width // 2:] = BLUE
    return Image.fromarray(arr)


def save_rotated_tag(img: Image.Image, path: Path, orientation: int = 6, **kwargs) -> Path:
    """Save ``img`` with an EXIF orientation tag (6: display turned 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    img.save(path, exif=exif.tobytes(), **kwargs)
    return path


def close(pixel, colour) -> bool:
    return bool(np.abs(np.asarray(pixel, float) - colour).max() < 40)


def test_heic_suffixes_are_images_not_unsupported():
    from finegrain.images import UNSUPPORTED_IMAGE_SUFFIXES, unsupported_image_reason

    assert {".heic", ".heif", ".hif"} <= IMAGE_SUFFIXES
    assert ".heic" not in UNSUPPORTED_IMAGE_SUFFIXES
    assert unsupported_image_reason(Path("IMG_0001.HEIC")) is None


def test_heic_pixels_round_trip(tmp_path, photos_dir):
    src = Image.open(photos_dir / "astronaut.jpg").convert("RGB")
    path = tmp_path / "astro.heic"
    src.save(path, quality=95)
    assert path.read_bytes()[4:12] == b"ftypheic"  # a real HEIC container, made by libheif (x265)
    img, size = load_image_sized(path)
    assert img.mode == "RGB" and img.size == size == src.size
    diff = np.abs(np.asarray(img, float) - np.asarray(src, float)).mean()
    assert diff < 8, diff  # lossy, but the same picture


@pytest.mark.parametrize("suffix", [".heic", pytest.param(".avif", marks=needs_avif)])
def test_orientation_applied_once(tmp_path, suffix):
    """A phone photo shot in portrait: stored landscape plus a turn; loaded upright, and not turned twice."""
    path = save_rotated_tag(two_colour(), tmp_path / f"portrait{suffix}", 6, quality=95)
    reference = save_rotated_tag(two_colour(), tmp_path / "portrait.jpg", 6, quality=95)
    expected, expected_size = load_image_sized(reference)  # the JPEG path is tested elsewhere (exif_transpose)
    assert expected_size == (40, 80)
    img, size = load_image_sized(path)
    assert size == img.size == (40, 80)
    arr, ref = np.asarray(img), np.asarray(expected)
    # turned clockwise: the red left half is now on top, blue below
    assert close(arr[5, 20], RED) and close(arr[-5, 20], BLUE), (arr[5, 20], arr[-5, 20])
    assert np.abs(arr.astype(float) - ref).mean() < 10
    thumb = load_thumbnail(path, 20)  # the page's thumbnails take the same turn
    assert thumb.size == (10, 20) and close(np.asarray(thumb)[1, 5], RED)


def test_heic_irot_is_applied_and_tag_neutralised(tmp_path):
    """pillow-heif writes the EXIF turn as a HEIF transform (irot); libheif applies it and the tag reads 1."""
    path = save_rotated_tag(two_colour(), tmp_path / "p.heic", 6)
    raw = Image.open(path)
    assert raw.size == (40, 80)  # already upright when decoded
    assert raw.getexif().get(ORIENTATION) in (None, 1)  # so exif_transpose leaves it alone


@pytest.mark.parametrize("suffix", [".heic", pytest.param(".avif", marks=needs_avif)])
def test_truncated_and_corrupt_files_are_one_line_failures(tmp_path, photos_dir, suffix):
    whole = tmp_path / f"whole{suffix}"
    Image.open(photos_dir / "astronaut.jpg").save(whole)
    data = whole.read_bytes()
    cases = {"half": data[: len(data) // 2], "tail": data[:-16], "header": data[:200],
             "garbage": data[:12] + bytes(range(256)) * 8}
    for name, content in cases.items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        reason = str(info.value)
        assert "\n" not in reason and reason.startswith("cannot decode image"), (name, reason)
    with pytest.raises(ImageLoadError, match="truncated or corrupt HEIF/AVIF"):
        load_image(tmp_path / f"header{suffix}")


def test_heic_pixel_limit_refused_before_decoding(tmp_path):
    path = tmp_path / "big.heic"
    Image.new("RGB", (1200, 1000), (10, 200, 30)).save(path)
    with pytest.raises(ImageLoadError, match="1200x1000 pixels, more than the limit of 1,000,000"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageLoadError, match="more than the limit of 1,000,000"):
        load_thumbnail(path, 64, max_pixels=1_000_000)
    assert load_image(path, max_pixels=1_200_000).size == (1200, 1000)


def test_index_and_search_heic(tmp_path, photos_dir):
    """Index a phone-style folder (HEIC, AVIF, a truncated HEIC), then search it with a HEIC query image."""
    folder = tmp_path / "phone"
    folder.mkdir()
    for name in ("coffee", "chelsea", "camera", "coins"):
        Image.open(photos_dir / f"{name}.jpg").convert("RGB").save(folder / f"{name}.heic", quality=90)
    # stored on its side (427x640) with the turn in EXIF, as phones do
    save_rotated_tag(Image.open(photos_dir / "rocket.jpg").convert("RGB").rotate(90, expand=True),
                     folder / "IMG_0001.HEIC", 6, quality=90)
    if HAS_AVIF:
        Image.open(photos_dir / "astronaut.jpg").convert("RGB").save(folder / "astronaut.avif")
    broken = folder / "broken.heic"
    whole = (folder / "coffee.heic").read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])

    idx = tmp_path / "index"
    out = fg("index", folder, "--index", idx, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["indexed"] == 5 + HAS_AVIF, report
    assert [f["path"] for f in report["failures"]] == [str(broken)]
    assert report["failures"][0]["reason"].startswith("cannot decode image")

    index = Index.open(idx)
    rows = {Path(r.path).name: r for r in index.records.values()}
    index.close()
    assert (rows["IMG_0001.HEIC"].width, rows["IMG_0001.HEIC"].height) == (640, 427)  # upright size

    query = tmp_path / "query.heic"
    Image.open(photos_dir / "chelsea.jpg").convert("RGB").crop((40, 20, 440, 280)).save(query, quality=80)
    out = fg("search", "--index", idx, "--image", query, "--format", "jsonl", "-k", "3")
    assert out.returncode == 0, out.stderr
    hits = [json.loads(line) for line in out.stdout.splitlines()]
    assert Path(hits[0]["path"]).name == "chelsea.heic", hits

    bad = fg("search", "--index", idx, "--image", broken)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "cannot decode image" in bad.stderr + bad.stdout


def fg(*args, timeout=300):
    return fg_in_process(*args)  # in-process: the same command-line code without an interpreter start


def test_service_takes_heic_uploads_and_serves_upright_thumbnails(tmp_path, photos_dir):
    import io

    import httpx

    from finegrain.service import create_app
    from finegrain.service.background import BackgroundServer

    folder = tmp_path / "phone"
    folder.mkdir()
    for name in ("coffee", "coins"):
        Image.open(photos_dir / f"{name}.jpg").convert("RGB").save(folder / f"{name}.heic")
    rocket = Image.open(photos_dir / "rocket.jpg").convert("RGB")  # 640x427, stored on its side plus a turn
    save_rotated_tag(rocket.rotate(90, expand=True), folder / "rocket.heic", 6)
    index = Index.create(tmp_path / "index")
    assert index.add([folder]).indexed == 3
    ids = {Path(r.path).stem: r.id for r in index.records.values()}
    index.close()
    query = io.BytesIO()
    rocket.crop((100, 0, 500, 427)).save(query, format="HEIF")
    with BackgroundServer(create_app(tmp_path / "index", reload_interval=0)) as base, \
            httpx.Client(base_url=base, timeout=60) as client:
        body = client.post("/api/search/image", files={"image": ("q.heic", query.getvalue(), "image/heif")},
                           data={"k": "3"})
        assert body.status_code == 200, body.text
        assert body.json()["results"][0]["id"] == ids["rocket"]
        thumb = client.get(f"/api/thumbnail/{ids['rocket']}")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        w, h = Image.open(io.BytesIO(thumb.content)).size
        assert w > h  # upright: landscape, like the original photo
        bad = client.post("/api/search/image", files={"image": ("q.heic", query.getvalue()[:300], "image/heif")})
        assert bad.status_code == 400 and "truncated or corrupt HEIF" in bad.text
