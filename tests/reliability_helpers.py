"""Builders shared by the reliability tests and the bench/ scripts: folders of good and hostile image files."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

#: The files of :func:`make_hostile_folder` that must be indexed, and the ones that must be skipped.
GOOD_EXTRA = ("cmyk.jpg", "gray16.png", "palette.png", "palette_transparent.png", "alpha.png", "upright.png",
              "rotated_exif.png", "rotated_exif.jpg", "animated.gif", "gray.jpg", "unicode_café_日本.jpg")
BAD = ("empty.jpg", "truncated.jpg", "bomb.png", "text_as.jpg", "text_as.png", "html_as.gif",
       "unreadable.jpg", "broken_link.jpg", "loop_a.jpg", "loop_b.jpg")
LONG_NAME = "l" * 240 + ".jpg"  # 244 bytes: near NAME_MAX (255)
NON_UTF8_NAME = b"latin1_\xe9t\xe9.jpg"  # a valid Latin-1 name, invalid UTF-8
NON_UTF8_SHOWN = NON_UTF8_NAME.decode("utf-8", "backslashreplace")  # how reports and the catalog name it


def png_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    # A small stream of zeros: it would inflate to width*height bytes if anyone decoded it.
    idat = zlib.compress(b"\0" * 65536, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated(upright: Image.Image) -> tuple[Image.Image, Image.Exif]:
    """Pixels stored rotated plus EXIF orientation 6, so that an EXIF-aware reader recovers ``upright`` exactly."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 is undone by ROTATE_270
    exif = Image.Exif()
    exif[0x0112] = 6
    return stored, exif


def make_hostile_folder(folder: Path, photo: Path) -> dict[str, str]:
    """Fill ``folder`` with the good-but-unusual and the bad files of the reliability test.

    ``photo`` is a real JPEG photograph the variants are made from. Returns
    ``{name: "good" | "bad"}`` for every file created (the non-UTF-8 name as
    :data:`NON_UTF8_SHOWN`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, str] = {}
    base = Image.open(photo).convert("RGB")
    small = base.resize((base.width // 2, base.height // 2))

    def good(name: str, img: Image.Image, fmt: str, **kw) -> None:
        img.save(folder / name, fmt, **kw)
        kinds[name] = "good"

    good("cmyk.jpg", small.convert("CMYK"), "JPEG", quality=90)
    g16 = (np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    good("gray16.png", Image.fromarray(g16), "PNG")
    good("palette.png", small.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG")
    pal_t = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    good("palette_transparent.png", pal_t, "PNG", transparency=0)
    rgba = small.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(small.size))
    good("alpha.png", rgba, "PNG")
    good("upright.png", small, "PNG")
    stored, exif = exif_rotated(small)
    good("rotated_exif.png", stored, "PNG", exif=exif)
    good("rotated_exif.jpg", stored, "JPEG", exif=exif, quality=95)
    frames = [small.rotate(a) for a in (0, 10, 20)]
    frames[0].save(folder / "animated.gif", "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    kinds["animated.gif"] = "good"
    good("gray.jpg", small.convert("L"), "JPEG")
    good("unicode_café_日本.jpg", small, "JPEG")
    good(LONG_NAME, small, "JPEG")

    data = photo.read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (folder / "text_as.jpg").write_text("just some text, not a picture\n" * 20)
    (folder / "text_as.png").write_bytes(b"%PDF-1.4\n" + b"x" * 500)
    (folder / "html_as.gif").write_text("<html><body>hello</body></html>")
    unreadable = folder / "unreadable.jpg"
    unreadable.write_bytes(data)
    unreadable.chmod(0)
    (folder / "broken_link.jpg").symlink_to(folder / "does_not_exist.jpg")
    (folder / "loop_a.jpg").symlink_to(folder / "loop_b.jpg")
    (folder / "loop_b.jpg").symlink_to(folder / "loop_a.jpg")
    for name in BAD:
        kinds[name] = "bad"
    with open(os.path.join(os.fsencode(folder), NON_UTF8_NAME), "wb") as fh:
        small.save(fh, "JPEG")
    kinds[NON_UTF8_SHOWN] = "bad"  # cannot be stored in the (UTF-8) catalog: skipped with a reason
    return kinds


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    """``img`` encoded as JPEG."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()
