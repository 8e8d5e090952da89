"""Safe image loading: every decoder error becomes an :class:`ImageLoadError`.

Indexing and querying both go through :func:`load_image`, so a corrupt,
truncated, hostile or simply non-image file is reported with a reason
instead of crashing a run. Images come back as upright RGB ``PIL.Image``.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse anything that decodes to more pixels than this (decompression bombs).
MAX_PIXELS = 64_000_000
# File suffixes treated as images when walking folders.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey patch

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image]


class ImageLoadError(ValueError):
    """An image could not be read; ``str(err)`` is a one-line reason."""


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
        A path, raw bytes, a binary file object, or an already opened image.
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
    if isinstance(source, Image.Image):
        img = _to_rgb(ImageOps.exif_transpose(source))
        return img, img.size
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            width, height = img.size
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise ImageLoadError(f"image is {width}x{height} pixels, more than the limit of {max_pixels}")
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
        raise ImageLoadError("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"decompression bomb: {exc}") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot decode image: {exc}") from None
    except (ValueError, SyntaxError, EOFError, MemoryError, RecursionError, TypeError) as exc:
        # Pillow plugins raise a zoo of exception types on hostile input.
        raise ImageLoadError(f"cannot decode image: {type(exc).__name__}: {exc}") from None


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
