"""Photo metadata read at indexing time: capture date, camera make and model, EXIF orientation.

:func:`read_meta` parses only the file's header (Pillow opens images lazily:
no pixel is decoded). A missing, corrupt or partial EXIF block is never an
error: the capture date falls back to the file's mtime (``taken_source``
``"mtime"``) and the other fields are left empty. :func:`backfill` gives
images indexed before the ``image_meta`` table existed their row, on the next
``finegrain index`` run, without re-indexing them.
"""

from __future__ import annotations

import io
import os
import warnings
from datetime import datetime
from typing import TYPE_CHECKING, Any

from PIL import Image

from .progress import progress_bar
from .store import meta as meta_table

if TYPE_CHECKING:  # pragma: no cover
    from .store.writer import Writer

EXIF_IFD = 0x8769
DATETIME_ORIGINAL = 36867
MAKE, MODEL, ORIENTATION = 271, 272, 274
MAX_TEXT = 128  # longer make/model strings are cut: they are labels, not documents

__all__ = ["read_meta", "parse_exif_datetime", "backfill"]


def parse_exif_datetime(value: Any) -> datetime | None:
    """``"YYYY:MM:DD HH:MM:SS"`` (EXIF) as a naive datetime; None for blanks, zeros or garbage."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    text = value.strip("\x00 ").strip()
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M", "%Y:%m:%d"):
        try:
            dt = datetime.strptime(text[:19] if fmt.count("%") == 6 else text, fmt)
        except ValueError:
            continue
        return dt if dt.year >= 1800 else None
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", " ").strip()
    return value[:MAX_TEXT] or None


def read_meta(source: bytes | str | os.PathLike, mtime_ns: int | None) -> dict[str, Any]:
    """``{taken, taken_source, make, model, orientation}`` of an image file (bytes or path); never raises.

    ``taken`` is EXIF DateTimeOriginal when present and valid, else the mtime
    (see :mod:`finegrain.store.meta` for how both are stored).
    """
    taken: datetime | None = None
    make = model = None
    orientation: int | None = None
    try:
        if not isinstance(source, (bytes, bytearray)) and not os.path.isfile(source):
            raise FileNotFoundError(source)  # gone, or a FIFO/device that a read would block on
        fp: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a corrupt EXIF block warns; it is just absent here
            with Image.open(fp) as im:
                exif = im.getexif()
                make, model = _text(exif.get(MAKE)), _text(exif.get(MODEL))
                raw_orientation = exif.get(ORIENTATION)
                if isinstance(raw_orientation, int) and 1 <= raw_orientation <= 8:
                    orientation = raw_orientation
                taken = parse_exif_datetime(exif.get_ifd(EXIF_IFD).get(DATETIME_ORIGINAL))
    except Exception:  # noqa: BLE001 - any parser failure means "no EXIF": the mtime is used
        pass
    if taken is not None:
        return {"taken": meta_table.wall_clock_seconds(taken), "taken_source": "exif", "make": make, "model": model,
                "orientation": orientation}
    return {"taken": None if mtime_ns is None else meta_table.mtime_wall_clock(int(mtime_ns)),
            "taken_source": None if mtime_ns is None else "mtime", "make": make, "model": model,
            "orientation": orientation}


def backfill(writer: Writer, show_progress: bool = False, commit_every: int = 1000) -> int:
    """Give every indexed image without an ``image_meta`` row its row (EXIF header only); returns how many.

    A file that is gone or unreadable gets its catalog mtime as its date.
    Rows are committed every ``commit_every`` images, so an interrupted run keeps its work.
    """
    todo = meta_table.lacking(writer.catalog.db)
    if not todo:
        return 0
    done = 0
    with progress_bar(len(todo), "reading EXIF of indexed images", show_progress) as bar:
        for start in range(0, len(todo), commit_every):
            part = todo[start:start + commit_every]
            rows = []
            for image_id, path, mtime_ns in part:
                rows.append((image_id, read_meta(path, mtime_ns)))
                bar.advance(1)
            done += writer.add_image_meta(rows)
    return done
