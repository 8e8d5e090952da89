"""Safe image loading: every decoder error becomes an :class:`ImageLoadError`.

Indexing and querying both go through :func:`load_image`, so a corrupt,
truncated, hostile or simply non-image file is reported with a reason
instead of crashing a run. Images come back as upright RGB ``PIL.Image``.
"""

from __future__ import annotations

import io
import os
import re
import stat
import time
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse anything that decodes to more pixels than this (decompression bombs).
MAX_PIXELS = 64_000_000
# Files larger than this are refused before reading (indexing, thumbnails and query images alike).
MAX_FILE_BYTES = 256 * 1024 * 1024
# Seconds a read of one file may take (checked between blocks: a slow network mount, not a hung one).
READ_TIMEOUT_S = 30.0
_BLOCK = 4 * 2**20


# HEIF brands (ISO-BMFF ``ftyp`` major brand) of HEIC/HEIF/AVIF files: a file that starts with one of them
# but does not open is a damaged HEIF, not "an unknown format".
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1",
                          b"avif", b"avis"})


def _register_heif() -> frozenset[str]:
    """Register pillow-heif's HEIF decoder with Pillow (once, at import); the suffixes it adds.

    Without pillow-heif installed, ``.heic`` files stay reported as unsupported.
    libheif applies the HEIF transforms (``irot``/``imir``) while decoding and
    pillow-heif then sets the EXIF orientation to 1, so ``exif_transpose`` below
    does not rotate a second time. Thumbnails, depth and auxiliary images stored
    in the file are not decoded (never used; they cost memory per open).
    """
    try:
        import pillow_heif
    except ImportError:
        return frozenset()
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    return frozenset({".heic", ".heif", ".hif"})


def _optional_suffixes() -> frozenset[str]:
    """Suffixes of formats decoded only when the codec is installed (Pillow's AVIF build, pillow-heif)."""
    from PIL import features

    found = set(_register_heif())
    if features.check("avif"):  # Pillow >= 11.2 built with libavif
        found.add(".avif")
    return frozenset(found)


# File suffixes treated as images when walking folders.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}) | _optional_suffixes()
# Image formats finegrain knows but cannot decode: reported as skipped when walking folders, not silently ignored.
# (.heic/.heif/.avif move to IMAGE_SUFFIXES when pillow-heif and Pillow's AVIF codec are installed.)
UNSUPPORTED_IMAGE_SUFFIXES = frozenset({
    ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".svg", ".psd",
    ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2",
}) - IMAGE_SUFFIXES

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey patch

ImageSource = str | os.PathLike | bytes | BinaryIO | Image.Image


class ImageLoadError(ValueError):
    """An image could not be read; ``str(err)`` is a one-line reason.

    ``path`` is the file it was read from (None for bytes, streams and opened
    images), so a caller reading several images can say which one failed.
    """

    path: str | None = None

    def with_path(self) -> str:
        """The reason, after the file's path where there is one."""
        return f"{self.path}: {self}" if self.path else str(self)


def read_file_safely(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES,
                     timeout_s: float = READ_TIMEOUT_S) -> bytes:
    """The bytes of the regular file at ``path``; :class:`ImageLoadError` for anything else.

    The file is opened with ``O_NONBLOCK`` and checked with ``fstat`` on the
    open descriptor, so a FIFO, socket or device put in place of an image
    (after any earlier check) is refused at once instead of blocking the
    thread in ``open()`` or ``read()``. Files over ``max_bytes`` are refused
    before reading; a read still going after ``timeout_s`` is abandoned.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ImageLoadError("file not found") from None
    except IsADirectoryError:
        raise ImageLoadError("is a directory") from None
    except PermissionError:
        raise ImageLoadError("permission denied") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageLoadError("is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ImageLoadError("not a regular file")
        if st.st_size == 0:
            raise ImageLoadError("empty file")
        if st.st_size > max_bytes:
            raise ImageLoadError(f"file is larger than {max_bytes // 2**20} MiB")
        deadline = time.monotonic() + timeout_s
        parts: list[bytes] = []
        total = 0
        while True:
            block = os.read(fd, _BLOCK)
            if not block:
                break
            total += len(block)
            if total > max_bytes:  # grew while being read
                raise ImageLoadError(f"file is larger than {max_bytes // 2**20} MiB")
            parts.append(block)
            if time.monotonic() > deadline:
                raise ImageLoadError(f"reading the file took more than {timeout_s:g} s")
        if not total:
            raise ImageLoadError("empty file")
        return b"".join(parts)
    except OSError as exc:
        raise ImageLoadError(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open ``source`` (path, bytes, file object or PIL image) as an upright RGB image.

    See :func:`load_image_sized` for the parameters; this drops the size.
    """
    return load_image_sized(source, max_pixels, draft_size)[0]


def load_image_sized(
    source: ImageSource, max_pixels: int = MAX_PIXELS, draft_size: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Open ``source`` as an upright RGB image; also return its full (width, height) upright.

    Parameters
    ----------
    source:
        A path (read with :func:`read_file_safely`), raw bytes, a binary file
        object, or an already opened image.
    max_pixels:
        Images whose header declares more pixels are rejected before decoding.
    draft_size:
        If given, JPEGs are decoded at a reduced scale that is still at least
        this many pixels on the shorter side (much faster for large photos).

    Raises
    ------
    ImageLoadError
        For missing, unreadable, truncated, oversized or non-image input.
    """
    try:
        return _load_sized(source, max_pixels, draft_size)
    except ImageLoadError as exc:
        if isinstance(source, (str, os.PathLike)):
            exc.path = os.fspath(source)
        raise


def _load_sized(source: ImageSource, max_pixels: int, draft_size: int | None) -> tuple[Image.Image, tuple[int, int]]:
    if isinstance(source, Image.Image):
        img = _to_rgb(ImageOps.exif_transpose(source))
        return img, img.size
    if isinstance(source, (str, os.PathLike)):
        source = read_file_safely(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            width, height = img.size
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise ImageLoadError(f"image is {width}x{height} pixels, more than the limit of {max_pixels:,}")
            if draft_size and img.format == "JPEG":
                scale = min(width, height) / draft_size
                if scale >= 2:
                    img.draft("RGB", (int(width / scale) + 1, int(height / scale) + 1))
            img.load()
            transposed = ImageOps.exif_transpose(img)
            if transposed.size != img.size:  # rotated by 90 degrees: swap the full size too
                width, height = height, width
            return _to_rgb(transposed), (width, height)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError("file not found") from None
    except IsADirectoryError:
        raise ImageLoadError("is a directory") from None
    except PermissionError:
        raise ImageLoadError("permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(_unidentified_reason(source)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(_bomb_message(exc, max_pixels)) from None
    except OSError as exc:
        raise ImageLoadError(f"cannot decode image: {_one_line(exc)}") from None
    except (ValueError, SyntaxError, EOFError, MemoryError, RecursionError, TypeError) as exc:
        # Pillow plugins raise a zoo of exception types on hostile input.
        raise ImageLoadError(f"cannot decode image: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (libheif's end with newlines)."""
    return " ".join(str(exc).split())


def _unidentified_reason(source: object) -> str:
    """Why Pillow could not identify ``source``: a damaged HEIF/AVIF file is named as such."""
    head = source[:12] if isinstance(source, (bytes, bytearray)) else b""
    if head[4:8] == b"ftyp" and bytes(head[8:12]) in _HEIF_BRANDS:
        brand = bytes(head[8:12]).decode("ascii")
        return f"cannot decode image: truncated or corrupt HEIF/AVIF file (brand {brand!r})"
    return "not a recognised image format"


def _bomb_message(exc: Exception, max_pixels: int) -> str:
    """Pillow's bomb check fired first (its own, larger limit): quote finegrain's limit instead."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return f"decompression bomb: the image declares {size}, more than the limit of {max_pixels:,}"


def load_thumbnail(path: str | os.PathLike, size: int, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An upright RGB thumbnail (longer side at most ``size``) of the image file at ``path``.

    Decodes at reduced size where the format allows (JPEG DCT scaling), then
    shrinks the decoded image in place before any colour or orientation
    conversion, so a large image costs one decoded copy, not three.
    """
    data = read_file_safely(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise ImageLoadError(f"image is {width}x{height} pixels, more than the limit of {max_pixels:,}")
            # palette, 1-bit, 16-bit: resized badly or not at all
            if img.mode not in ("RGB", "RGBA", "L", "LA", "CMYK"):
                img.load()
                exif = img.getexif()
                img = _to_rgb(img)
                img.info["exif"] = exif.tobytes()  # the conversion drops it; the orientation is applied below
            img.thumbnail((size, size))  # in place: draft() for JPEG, then reduce(); keeps the EXIF orientation
            return _to_rgb(ImageOps.exif_transpose(img))
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(_unidentified_reason(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(_bomb_message(exc, max_pixels)) from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, RecursionError, TypeError) as exc:
        raise ImageLoadError(f"cannot decode image: {type(exc).__name__}: {_one_line(exc)}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode (palette, alpha, CMYK, 16-bit, greyscale) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (hi if hi > 0 else 1.0) * 255.0).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def is_image_path(path: Path) -> bool:
    """True if ``path`` has an image file suffix (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def unsupported_image_reason(path: Path) -> str | None:
    """Why ``path`` is skipped if its suffix names an image format finegrain cannot decode, else None."""
    suffix = path.suffix.lower()
    if suffix not in UNSUPPORTED_IMAGE_SUFFIXES:
        return None
    return f"unsupported image format {suffix} (finegrain reads {', '.join(sorted(IMAGE_SUFFIXES))})"
