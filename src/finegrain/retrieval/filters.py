"""Filters, a score threshold, pagination and date order: what restricts and shapes every mode's results.

:class:`Filters` (path prefix and glob, capture date range, camera make and
model, size and orientation, explicit ids) is validated once
(:meth:`Filters.from_options` raises ``ValueError`` with one clear line)
and resolved once per search to the set of *allowed* images
(:meth:`Filters.allowed`), a boolean mask over the snapshot's positions.
Every built-in mode family scores only allowed images (dense: exact search
over the allowed rows, or FAISS with an ID selector; multivector: the
scheduler starts from the allowed candidates; local and objects: the first
stage ranks allowed images only), so a filtered search returns ``k`` hits
whenever ``k`` allowed images exist: it is the search of an index holding
only the allowed images, not a post-filter of the unfiltered top ``k``.

Then, in this order: ``threshold`` drops hits scoring below it; ``sort``
orders what is left; ``offset`` skips that many hits and ``k`` are returned.

* ``sort="score"`` (default): best first; page ``offset // k`` of the ranking.
* ``sort="date"`` (oldest first) or ``"-date"`` (newest first): the best
  :data:`DATE_SORT_DEPTH` hits by score that pass the filters and the
  threshold, ordered by capture date (ties by score; images without a date
  last), then paged by ``offset``/``k``. The set being ordered does not depend
  on ``offset`` or ``k``, so pages never overlap; use a threshold to keep
  only relevant images, since without one the set is simply the best
  :data:`DATE_SORT_DEPTH` by score.

Capture dates are EXIF DateTimeOriginal, else the file's mtime; both are
wall-clock times (see :mod:`finegrain.store.meta`), and so are the bounds:
``taken_after`` is inclusive, ``taken_before`` exclusive, and a bare date
means midnight at the start of that day (``2023``, ``2023-06``,
``2023-06-01`` and ``2023-06-01T14:30`` are accepted).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from fnmatch import translate
from typing import TYPE_CHECKING, Any

import numpy as np

from ..store import meta as meta_table
from .base import MAX_K, SearchResponse, number

if TYPE_CHECKING:  # pragma: no cover
    from ..store.snapshot import Snapshot
    from .base import Params, Query, Retriever

ORIENTATIONS = ("landscape", "portrait", "square")
SORTS = ("score", "date", "-date")
#: How many hits (best by score) a date-sorted search orders.
DATE_SORT_DEPTH = MAX_K

__all__ = ["Filters", "PhotoTable", "photo_table", "check_page", "run", "parse_date", "ORIENTATIONS", "SORTS",
           "DATE_SORT_DEPTH"]


def parse_date(name: str, value: Any) -> float:
    """A filter bound as stored wall-clock seconds: ``YYYY``, ``YYYY-MM``, ISO date or datetime, date or datetime."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)  # already stored wall-clock seconds (a Filters re-validated)
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        try:
            if re.fullmatch(r"\d{4}", text):
                dt = datetime(int(text), 1, 1)
            elif re.fullmatch(r"\d{4}-\d{2}", text):
                dt = datetime(int(text[:4]), int(text[5:]), 1)
            else:
                dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{name} must be a date such as 2023-06-01 or 2023-06-01T14:30 "
                             f"(or 2023, 2023-06), not {value!r}") from None
    else:
        raise ValueError(f"{name} must be an ISO date string such as 2023-06-01, not {value!r}")
    if dt.tzinfo is not None:
        raise ValueError(f"{name} {value!r} has a time zone; capture dates are camera wall-clock times "
                         "(EXIF has no time zone): give the local date and time without an offset")
    return meta_table.wall_clock_seconds(dt)


def _size(name: str, value: Any) -> int | None:
    if value is None:
        return None
    number(name, value, 1, integer=True)
    return int(value)


def _label(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    return value.strip()


@dataclass(frozen=True)
class Filters:
    """Which images a search may return (every given condition must hold; see the module docstring).

    ``path_prefix``: the stored absolute path starts with this string.
    ``glob``: a shell pattern, case-insensitive; without ``/`` it matches the
    file name (``*.jpg``, ``IMG_2023*``), with ``/`` the whole path
    (``*/holidays/*``; ``*`` also crosses folders). ``taken_after`` /
    ``taken_before``: capture date bounds (dates or ISO strings; stored as
    wall-clock seconds). ``make`` / ``model``: case-insensitive substring of
    the EXIF camera make / model. ``min_width`` ... ``max_height``: upright
    pixel size bounds (inclusive). ``orientation``: ``landscape`` (wider than
    tall), ``portrait`` or ``square`` (equal sides), of the upright image.
    ``ids``: only these image ids.
    """

    path_prefix: str | None = None
    glob: str | None = None
    taken_after: Any = None
    taken_before: Any = None
    make: str | None = None
    model: str | None = None
    orientation: str | None = None
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.path_prefix is not None and (not isinstance(self.path_prefix, str) or not self.path_prefix):
            raise ValueError(f"path_prefix must be a non-empty string, not {self.path_prefix!r}")
        if self.glob is not None and (not isinstance(self.glob, str) or not self.glob.strip()):
            raise ValueError(f"glob must be a non-empty pattern such as '*.jpg', not {self.glob!r}")
        for name in ("taken_after", "taken_before"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, parse_date(name, value))
        if self.taken_after is not None and self.taken_before is not None and self.taken_after >= self.taken_before:
            raise ValueError("taken_after must be earlier than taken_before (taken_after is inclusive, "
                             "taken_before exclusive)")
        set_(self, "make", _label("make", self.make))
        set_(self, "model", _label("model", self.model))
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, not {self.orientation!r}")
        for name in ("min_width", "max_width", "min_height", "max_height"):
            set_(self, name, _size(name, getattr(self, name)))
        for lo, hi in (("min_width", "max_width"), ("min_height", "max_height")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo} ({a}) is larger than {hi} ({b})")
        if self.ids is not None:
            if isinstance(self.ids, (str, bytes)) or not isinstance(self.ids, (Sequence, set, frozenset, np.ndarray)):
                raise ValueError(f"ids must be a list of image ids (integers), not {self.ids!r}")
            bad = [i for i in self.ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
            if bad:
                raise ValueError(f"ids must be integers; got {bad[0]!r}")
            set_(self, "ids", tuple(sorted({int(i) for i in self.ids})))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: Filters | Mapping[str, Any] | None = None, **kwargs: Any) -> Filters:
        """Validated filters from a mapping (JSON, CLI) and/or keywords; None values mean "not given"."""
        if isinstance(options, Filters) and not kwargs:
            return options
        if options is not None and not isinstance(options, (Mapping, Filters)):
            raise ValueError(f"filters must be an object of filter names and values, not {options!r}")
        given = dataclasses.asdict(options) if isinstance(options, Filters) else dict(options or {})
        given = {k: v for k, v in {**given, **kwargs}.items() if v is not None}
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown filter(s): {', '.join(map(str, unknown))}; known: {', '.join(cls.names())}")
        return cls(**given)

    @property
    def empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.names())

    def to_dict(self) -> dict[str, Any]:
        """The given filters, JSON-ready (dates as ISO wall-clock strings)."""
        out: dict[str, Any] = {}
        for name in self.names():
            value = getattr(self, name)
            if value is None:
                continue
            if name.startswith("taken_"):
                value = iso(value)
            elif name == "ids":
                value = list(value)
            out[name] = value
        return out

    def allowed(self, snapshot: Snapshot) -> np.ndarray | None:
        """Boolean mask over the snapshot's positions (ids ascending) of the images that pass; None: no filter."""
        if self.empty:
            return None
        table = photo_table(snapshot)
        mask = np.ones(len(snapshot), bool)
        if self.ids is not None:
            mask &= np.isin(snapshot.ids, np.asarray(self.ids, np.int64))
        for bound, values, keep in ((self.min_width, table.width, np.greater_equal),
                                    (self.max_width, table.width, np.less_equal),
                                    (self.min_height, table.height, np.greater_equal),
                                    (self.max_height, table.height, np.less_equal)):
            if bound is not None:
                mask &= keep(values, bound)
        if self.orientation is not None:
            w, h = table.width, table.height
            mask &= {"landscape": w > h, "portrait": h > w, "square": (w == h) & (w > 0)}[self.orientation]
        if self.taken_after is not None:
            mask &= table.taken >= self.taken_after  # NaN (no date) compares False: excluded
        if self.taken_before is not None:
            mask &= table.taken < self.taken_before
        # String conditions last, on the images still in: a Python loop over fewer of them.
        checks = []
        if self.path_prefix is not None:
            prefix = self.path_prefix
            checks.append(lambda p: table.paths[p].startswith(prefix))
        if self.glob is not None:
            pattern = re.compile(translate(self.glob), re.IGNORECASE)
            if "/" in self.glob or os.sep in self.glob:
                checks.append(lambda p: pattern.match(table.paths[p]) is not None)
            else:
                checks.append(lambda p: pattern.match(os.path.basename(table.paths[p])) is not None)
        if self.make is not None:
            make = self.make.lower()
            checks.append(lambda p: make in table.make[p])
        if self.model is not None:
            model = self.model.lower()
            checks.append(lambda p: model in table.model[p])
        for check in checks:
            at = np.flatnonzero(mask)
            mask[at] = np.fromiter((check(int(p)) for p in at), bool, len(at))
        return mask


def iso(seconds: float) -> str:
    """Stored wall-clock seconds as an ISO string (``2023-06-01T14:30:00``)."""
    if not math.isfinite(seconds):
        return ""
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None).isoformat(timespec="seconds")


@dataclass
class PhotoTable:
    """Per snapshot position: path, upright size, capture date (wall-clock seconds, NaN unknown), make, model."""

    paths: list[str]
    width: np.ndarray
    height: np.ndarray
    taken: np.ndarray
    source: list[str]
    make: list[str]  # lower-cased, "" when unknown
    model: list[str]


def photo_table(snapshot: Snapshot) -> PhotoTable:
    """The snapshot's photo metadata (read from the catalog once per snapshot, like every derived structure).

    Images without an ``image_meta`` row (an index not yet backfilled) are
    dated by the mtime the catalog recorded when they were indexed.
    """
    def build() -> PhotoTable:
        from ..store.catalog import Catalog, IndexFormatError

        rows: dict[int, tuple] = {}
        try:
            with Catalog(snapshot.path) as catalog:
                rows = meta_table.load(catalog.db)
        except (IndexFormatError, OSError) as exc:  # a read-only copy whose catalog cannot be opened: mtimes only
            import logging

            logging.getLogger(__name__).warning("photo metadata unavailable: %s", exc)
        table = snapshot.records  # row p is position p
        n = len(table)
        mtimes, dated = table.column("mtime_ns"), table.known("mtime_ns")
        taken = np.full(n, np.nan)
        source, make, model = [""] * n, [""] * n, [""] * n
        for p, image_id in enumerate(snapshot.ids.tolist()):
            row = rows.get(image_id)
            if row is not None and row[0] is not None:
                taken[p], source[p] = float(row[0]), str(row[1])
            elif dated[p]:
                taken[p], source[p] = meta_table.mtime_wall_clock(int(mtimes[p])), "mtime"
            if row is not None:
                make[p], model[p] = (row[2] or "").lower(), (row[3] or "").lower()
        return PhotoTable(table.paths(), table.column("width"), table.column("height"), taken, source, make, model)

    return snapshot.derived("photo-table", build)


def check_page(k: int, threshold: Any = None, offset: Any = 0, sort: Any = "score") -> tuple[float | None, int, str]:
    """Validated ``(threshold, offset, sort)`` for a search of ``k`` results; ``ValueError`` otherwise."""
    if threshold is not None:
        number("threshold", threshold)
        threshold = float(threshold)
    offset = 0 if offset is None else offset
    number("offset", offset, 0, integer=True)
    offset = int(offset)
    if offset + k > MAX_K:
        raise ValueError(f"offset + k must be at most {MAX_K}, not {offset + k}")
    sort = "score" if sort is None else sort
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
    return threshold, offset, sort


def run(retriever: Retriever, snapshot: Snapshot, mode: str, query: Query, k: int, params: Params,
        filters: Filters, threshold: float | None, offset: int, sort: str) -> SearchResponse:
    """Search with filters, threshold, offset and sort (arguments validated; see the module docstring)."""
    t0 = time.perf_counter()
    allowed = filters.allowed(snapshot)
    filter_ms = (time.perf_counter() - t0) * 1e3
    n_allowed = len(snapshot) if allowed is None else int(allowed.sum())
    if n_allowed == 0:  # nothing can match: no model runs
        return SearchResponse([], mode, generation=snapshot.generation, timings={"filter_ms": filter_ms},
                              allowed=0)
    depth = max(1, min(offset + k if sort == "score" else DATE_SORT_DEPTH, n_allowed))
    if allowed is None:
        response = retriever.search(snapshot, mode, query, depth, params)
    elif getattr(retriever, "filterable", False):
        response = retriever.search(snapshot, mode, query, depth, params, allowed=allowed)  # type: ignore[call-arg]
    else:  # a plug-in family without filter support: rank everything, keep the allowed (correct, not fast)
        response = retriever.search(snapshot, mode, query, len(snapshot), params)
        position = {int(i): p for p, i in enumerate(snapshot.ids)}
        response.hits = [h for h in response.hits if allowed[position[h.id]]][:depth]
    hits = response.hits if threshold is None else [h for h in response.hits if h.score >= threshold]
    if sort != "score":
        table = photo_table(snapshot)
        positions = np.searchsorted(snapshot.ids, np.asarray([h.id for h in hits], np.int64))
        taken = table.taken[positions] if len(hits) else np.zeros(0)
        sign = -1.0 if sort == "-date" else 1.0
        order = sorted(range(len(hits)), key=lambda j: (not math.isfinite(taken[j]),
                                                        sign * taken[j] if math.isfinite(taken[j]) else 0.0,
                                                        -hits[j].score))
        hits = [dataclasses.replace(hits[j], taken=iso(float(taken[j])) if math.isfinite(taken[j]) else None)
                for j in order]
    page = hits[offset:offset + k]
    response.hits = [dataclasses.replace(h, rank=offset + r) if h.rank != offset + r else h
                     for r, h in enumerate(page)]
    response.allowed = n_allowed if allowed is not None else None
    response.timings = {**response.timings, "filter_ms": filter_ms}
    return response


def plain(filters: Filters, threshold: float | None, offset: int, sort: str) -> bool:
    """Whether a search asks for nothing of this module (the families' own path, unchanged)."""
    return filters.empty and threshold is None and offset == 0 and sort == "score"
