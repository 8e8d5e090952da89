"""One indexed image, by id: its details (path, size, capture date, camera) and its full file.

``GET /api/images/{id}`` answers what the page's details panel shows;
``GET /api/images/{id}/file`` the image itself: the original bytes for the
formats every browser shows (JPEG, PNG, WebP, GIF; recognised from the
bytes, not the file name), anything else (HEIC, TIFF, BMP, AVIF...) decoded
and re-encoded as JPEG with its longer side capped. Files are read with the
safe reader (:func:`finegrain.images.read_file_safely`) on the service's
decode threads; a file that is gone or no longer an image is 404
``image_unavailable``. Images are still named by catalog id only.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, Field

from ..images import ImageLoadError, load_thumbnail, read_file_safely
from ..retrieval.filters import iso
from ..store import meta as meta_table

log = logging.getLogger("finegrain.service")

#: Formats served as stored (recognised by Pillow from the bytes), with their content type.
WEB_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}

__all__ = ["ImageDetails", "WEB_FORMATS", "full_image", "image_router"]


class ImageDetails(BaseModel):
    id: int
    name: str = Field(description="File name.")
    path: str = Field(description="The path the index stores (on the server's machine).")
    width: int | None = Field(description="Upright width, pixels.")
    height: int | None = Field(description="Upright height, pixels.")
    orientation: str | None = Field(description="landscape, portrait or square (the upright image; as filters use).")
    exif_orientation: int | None = Field(description="EXIF Orientation tag (1-8), when the file has one.")
    taken: str | None = Field(description="Capture date, wall clock (ISO).")
    taken_source: str | None = Field(description="exif (DateTimeOriginal) or mtime (the file's modification time).")
    make: str | None = Field(description="Camera make (EXIF).")
    model: str | None = Field(description="Camera model (EXIF).")
    bytes: int | None = Field(description="File size when indexed.")
    file: str = Field(description="URL of the full image.")
    thumbnail: str = Field(description="URL of the thumbnail.")


def _shape(width: int | None, height: int | None) -> str | None:
    if not width or not height:
        return None
    return "landscape" if width > height else "portrait" if height > width else "square"


def full_image(path: str, max_side: int) -> tuple[bytes, str]:
    """``(bytes, content type)`` of the image file at ``path`` as a browser can show it; ``ImageLoadError`` else."""
    from PIL import Image, UnidentifiedImageError

    data = read_file_safely(path)
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            fmt = img.format or ""
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(f"not an image any more: {type(exc).__name__}") from None
    if fmt in WEB_FORMATS:
        return data, WEB_FORMATS[fmt]
    upright = load_thumbnail(path, max_side)  # upright RGB, decoded at reduced size where the format allows
    buf = io.BytesIO()
    try:
        upright.save(buf, "JPEG", quality=90)
    except OSError as exc:
        raise ImageLoadError(f"cannot encode the image: {exc}") from None
    return buf.getvalue(), "image/jpeg"


SHARD_HELP = "Shard sets: the image's shard (a hit's `shard`); ids are per shard."


def shard_of(index: Any, shard: int, api_error: Callable[[int, str, str], Exception]) -> Any:
    """Shard ``shard`` of a served shard set, as a local index (400 for a single index or a set on Ray)."""
    pick = getattr(index, "shard", None)
    if pick is None:
        raise api_error(400, "bad_request", "shard applies to shard sets only; this service serves one index")
    try:
        target = pick(shard)
    except (KeyError, IndexError):
        raise api_error(404, "not_found", f"no shard {shard} in this shard set") from None
    if not hasattr(target, "catalog"):  # a remote shard: its catalog and files are on another node
        raise api_error(400, "bad_request", "image details, files and 'more like this' by id are not available on "
                                             "a shard set served on Ray (the files are on the shards' nodes)")
    return target


def image_router(holder: Any, run_decode: Callable[..., Any], max_side: int, count: Callable[[], None],
                 api_error: Callable[[int, str, str], Exception]) -> APIRouter:
    """The routes, to include in the service's ``/api`` router (which adds the API key check).

    ``holder`` is the service's :class:`~finegrain.service.holder.IndexHolder`, ``run_decode`` runs a
    function on its decode threads, ``max_side`` caps a re-encoded image's longer side.
    """
    router = APIRouter()
    catalog_access: Callable[[], AbstractContextManager[Any]] = holder.catalog_access
    use: Callable[[], AbstractContextManager[Any]] = holder.use

    def record(index: Any, image_id: int) -> Any:
        try:
            return index.get(image_id)
        except KeyError:
            raise api_error(404, "not_found", f"no indexed image with id {image_id}") from None

    def locate(index: Any, shard: int | None) -> Any:
        """The index holding the image: ``index`` itself, or shard ``shard`` of a shard set (ids are per shard)."""
        if shard is None:
            return index
        return shard_of(index, shard, api_error)

    @router.get("/images/{image_id}", response_model=ImageDetails, tags=["images"])
    def image_details(request: Request, image_id: int = PathParam(ge=0, le=2**62),
                      shard: int | None = Query(None, ge=0, description=SHARD_HELP)) -> dict:
        """An indexed image's path, size, capture date (and whether EXIF or the file's mtime gave it), camera."""
        count()
        with catalog_access() as served:
            index = locate(served, shard)
            rec = record(index, image_id)
            row = meta_table.row(index.catalog.db, image_id) or {}
        taken, source = row.get("taken"), row.get("taken_source")
        if taken is None and rec.mtime_ns is not None:  # no EXIF row yet: dated like filters date it
            taken, source = meta_table.mtime_wall_clock(rec.mtime_ns), "mtime"
        root = request.scope.get("root_path", "")
        where = "" if shard is None else f"?shard={shard}"
        return {"id": rec.id, "name": os.path.basename(rec.path), "path": rec.path, "width": rec.width,
                "height": rec.height, "orientation": _shape(rec.width, rec.height),
                "exif_orientation": row.get("orientation"), "taken": iso(taken) if taken is not None else None,
                "taken_source": source, "make": row.get("make"), "model": row.get("model"), "bytes": rec.size,
                "file": f"{root}/api/images/{rec.id}/file{where}", "thumbnail": f"{root}/api/thumbnail/{rec.id}{where}"}

    @router.get("/images/{image_id}/file", tags=["images"], response_class=Response, responses={200: {
        "content": {t: {} for t in WEB_FORMATS.values()},
        "description": "The image: the stored bytes (JPEG, PNG, WebP, GIF), else re-encoded as JPEG."}})
    def image_file(image_id: int = PathParam(ge=0, le=2**62),
                   shard: int | None = Query(None, ge=0, description=SHARD_HELP)) -> Response:
        """The full image of an indexed file (by id; never by path)."""
        count()
        with use() as served:
            path = record(locate(served, shard), image_id).path
        try:
            data, media = run_decode(full_image, path, max_side)
        except ImageLoadError as exc:
            log.warning("full image %d: %s", image_id, exc)
            raise api_error(404, "image_unavailable", f"image {image_id} is indexed but its file can no longer "
                                                      "be read") from None
        name = os.path.basename(path)
        if media == "image/jpeg" and not name.lower().endswith((".jpg", ".jpeg")):
            name = os.path.splitext(name)[0] + ".jpg"  # re-encoded (HEIC, TIFF...): a save keeps the right suffix
        name = quote(name)
        return Response(data, media_type=media, headers={
            "Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'", "Content-Disposition": f"inline; filename*=UTF-8''{name}"})

    return router
