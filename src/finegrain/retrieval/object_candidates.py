"""The ``objects-max`` candidate stage: a top-``n`` over one vector per image, then those images' objects only.

``objects-max`` takes the best of every object crop of every image (about 25
rows per image). With a candidate stage (the ``candidates`` option; by
default the same rule as the multi-vector modes, :func:`~finegrain.retrieval.multivector.auto_candidates`:
every image up to 20,000, else 2,000) it first ranks images by their fused
object descriptor (``objects_mean``: one row per image, in the same object
space as the crops) with FAISS (exact below 200k images, HNSW above), then
adds the images owning the ``n`` best object rows (an ANN over the crops
themselves: its top rows' images are ``objects-max``'s best images, but one
image may own several of them), then scores the object crops of those
images only. Filters are applied inside the stage: candidates are drawn from
the allowed images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .dense import EXACT_ALLOWED_ROWS

if TYPE_CHECKING:  # pragma: no cover
    from ..compress.storage import Codec
    from ..store.ann import VectorIndex
    from ..store.snapshot import Snapshot

__all__ = ["FIELD", "ROWS", "candidate_positions", "available"]

#: The per-image field the stage ranks, and the per-object field whose best rows' images join it.
FIELD = "objects_mean"
ROWS = "objects"


def available(snapshot: Snapshot) -> bool:
    """Whether the index stores the per-image descriptor the stage ranks."""
    from ..compress import storage

    return storage.has_rows(snapshot, FIELD)


def _stage(snapshot: Snapshot, field: str) -> tuple[VectorIndex, np.ndarray, Codec]:
    """The top-k structure over ``field`` (float32 in its stored space), each row's image position, the codec."""
    from ..compress import storage
    from ..store.ann import VectorIndex

    def build() -> tuple[VectorIndex, np.ndarray, Codec]:
        rows, codec = storage.scoring(snapshot, field)  # compact rows when stored compact: dequantised below
        ann = VectorIndex(codec.decode(rows.vectors), snapshot.settings.get("ann", "auto"),
                          snapshot.cache_file(f"stage-{field}"))
        return ann, snapshot.positions(rows.owners), codec

    return snapshot.derived(f"ann:stage-{field}", build)


def prepare(snapshot: Snapshot) -> list[str]:
    """Build the stage's two top-k structures (what ``objects-max``'s first staged search builds); their names."""
    if not available(snapshot) or len(snapshot) == 0:
        return []
    return [f"{field}: {_stage(snapshot, field)[0].kind}" for field in (FIELD, ROWS)]


def _top_rows(snapshot: Snapshot, field: str, query: np.ndarray, n: int, allowed: np.ndarray | None) -> np.ndarray:
    """Image positions owning ``field``'s ``n`` best rows for ``query`` (rows of allowed images only)."""
    ann, positions, codec = _stage(snapshot, field)
    q = codec.project(query)  # the stored rows' space (identity unless the field is stored compact)
    if allowed is None:
        _, rows = ann.search(q, max(1, min(n, ann.n)))
        rows = rows[0]
    else:
        ok = np.flatnonzero(allowed[positions])
        want = min(n, len(ok))
        rows = np.zeros(0, np.int64)
        if want and len(ok) > EXACT_ALLOWED_ROWS:  # FAISS with an ID selector; short answers fall back to exact
            _, found = ann.search_rows(q, want, ok)
            rows = found[0][found[0] >= 0]
        if len(rows) < want:
            from ..compress import storage

            stored, _ = storage.scoring(snapshot, field)
            sims = codec.scores(stored.vectors[ok], q)[:, 0]
            rows = ok[np.argpartition(-sims, want - 1)[:want]] if 0 < want < len(ok) else ok[:want]
    return positions[rows[rows >= 0]]


def candidate_positions(snapshot: Snapshot, query: np.ndarray, n: int, allowed: np.ndarray | None = None
                        ) -> np.ndarray:
    """Ascending positions: the ``n`` images whose fused descriptor scores best, plus the owners of the ``n``
    best object rows (allowed images only; at most ``2 n`` images)."""
    return np.union1d(_top_rows(snapshot, FIELD, query, n, allowed), _top_rows(snapshot, ROWS, query, n, allowed))
