"""``auto``, the default mode: the concrete mode for this query on this index (policy and data: docs/queries.md).

The query is put in one class, then the first mode of that class's row of
:data:`POLICY` that the index supports runs (``global`` always can):

* ``text``: a text query;
* ``object``: an image query whose box covers less than :data:`SMALL_BOX`
  of the query image (a small object picked out of a photo);
* ``image``: any other image query (whole image, or a large box);
* ``combined``: several weighted terms (arithmetic, text plus image, negatives).

The rows were chosen on dev data (Flickr8k dev captions, needles scenes,
held-out rparis6k-mini database queries); the table behind each row is in
docs/queries.md. The response says which mode ran (``mode``) and that
``auto`` chose it (``requested_mode``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, BinaryIO, ClassVar, cast

from .base import Params, Query, Retriever, SearchResponse

if TYPE_CHECKING:  # pragma: no cover
    from ..store.snapshot import Snapshot

__all__ = ["AUTO", "SMALL_BOX", "POLICY", "AutoRetriever", "choose", "query_class", "box_fraction"]

AUTO = "auto"

#: An image query whose box covers less than this share of the (upright) query image is an object query.
SMALL_BOX = 0.1

#: Query class -> modes in order of preference; the first one the index supports runs.
POLICY: Mapping[str, tuple[str, ...]] = {
    "text": ("hierarchical", "global"),
    "object": ("objects-max", "l2g", "global"),
    "image": ("l2g", "objects-max", "global"),
    "combined": ("global",),
}


def box_fraction(query: Query) -> float | None:
    """Share of the query image's area inside its box (None without a box, or for an unseekable stream)."""
    if query.bbox is None or query.image is None:
        return None
    from ..images import load_image_sized

    source = query.image
    if hasattr(source, "read"):  # a file object: read for the size, then rewound for the search
        stream = cast(BinaryIO, source)
        if not (hasattr(stream, "seekable") and stream.seekable()):
            return None
        pos = stream.tell()
        try:
            _, size = load_image_sized(stream, draft_size=64)
        finally:
            stream.seek(pos)
    else:
        _, size = load_image_sized(source, draft_size=64)  # a JPEG is decoded at 1/8 scale: only its size matters
    x0, y0, x1, y1 = query.clip_box(size)  # type: ignore[misc]
    return (x1 - x0) * (y1 - y0) / float(size[0] * size[1])


def query_class(query: Query) -> str:
    """``text``, ``image``, ``object`` or ``combined`` (see the module docstring)."""
    if query.combined:
        return "combined"
    if query.text is not None:
        return "text"
    fraction = box_fraction(query)
    return "object" if fraction is not None and fraction < SMALL_BOX else "image"


def choose(available: Collection[str], query: Query) -> str:
    """The mode ``auto`` runs for ``query`` on an index supporting ``available`` modes."""
    def first(row: str) -> str:
        return next((m for m in POLICY[row] if m in available), "global")

    if query.bbox is not None and not query.combined and first("object") == first("image"):
        return first("image")  # the box's size changes nothing here: the image is not read for it
    return first(query_class(query))


class AutoRetriever(Retriever):
    """Registered so that ``auto`` is listed and validated like any mode; :func:`~finegrain.retrieval.search`
    replaces it by the concrete mode before anything runs."""

    name = "auto"
    modes = (AUTO,)
    combines_terms = True
    descriptions: ClassVar[dict[str, str]] = {
        AUTO: "the default: picks the mode for the query and the index (text: hierarchical where segments exist; "
              "image: l2g where local features exist, else objects-max where objects exist, small boxes "
              "objects-max first; else global)"}

    def search(self, snapshot: Snapshot, mode: str, query: Query, k: int, params: Params) -> SearchResponse:
        from . import search

        return search(snapshot, AUTO, query, k)
