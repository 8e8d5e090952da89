"""The ``objects-max`` candidate stage: a top-``n`` over one vector per image, then those images' objects only.

``objects-max`` takes the best of every object crop of every image (about 25
rows per image). With a candidate stage (the ``candidates`` option; by
default the same rule as the multi-vector modes, :func:`~finegrain.retrieval.multivector.auto_candidates`:
every image up to 20,000, else 2,000) it first ranks images by their fused
object descriptor (``objects_mean``: one row per image, in the same object
space as the crops) with FAISS (exact below 200k images, HNSW above), then
scores the object crops of those ``n`` images only. Filters are applied
inside the stage: candidates are drawn from the allowed images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .dense import EXACT_ALLOWED_ROWS

if TYPE_CHECKING:  # pragma: no cover
    from ..compress.storage import Codec
    from ..store.ann import VectorIndex
    from ..store.snapshot import Snapshot

__all__ = ["FIELD", "candidate_positions", "available"]

#: The per-image field the stage ranks.
FIELD = "objects_mean"


def available(snapshot: Snapshot) -> bool:
    """Whether the index stores the per-image descriptor the stage ranks."""
    from ..compress import storage

    return storage.has_rows(snapshot, FIELD)


def _stage(snapshot: Snapshot) -> tuple[VectorIndex, np.ndarray, Codec]:
    """The top-k structure over ``objects_mean`` (float32 in its stored space), each row's position, the codec."""
    from ..compress import storage
    from ..store.ann import VectorIndex

    def build() -> tuple[VectorIndex, np.ndarray, Codec]:
        rows, codec = storage.scoring(snapshot, FIELD)  # compact rows when stored compact: dequantised below
        ann = VectorIndex(codec.decode(rows.vectors), snapshot.settings.get("ann", "auto"),
                          snapshot.cache_file(FIELD))
        return ann, snapshot.positions(rows.owners), codec

    return snapshot.derived("ann:" + FIELD, build)


def candidate_positions(snapshot: Snapshot, query: np.ndarray, n: int, allowed: np.ndarray | None = None
                        ) -> np.ndarray:
    """Ascending positions of the ``n`` images whose fused object descriptor scores best (allowed ones only)."""
    ann, positions, codec = _stage(snapshot)
    q = codec.project(query)  # the stored rows' space (identity unless the field is stored compact)
    if allowed is None:
        _, rows = ann.search(q, max(1, min(n, ann.n)))
        rows = rows[0]
    else:
        ok = np.flatnonzero(allowed[positions])
        want = min(n, len(ok))
        rows = np.zeros(0, np.int64)
        if want and len(ok) > EXACT_ALLOWED_ROWS:  # FAISS with an ID selector; short answers fall back to exact below
            _, found = ann.search_rows(q, want, ok)
            rows = found[0][found[0] >= 0]
        if len(rows) < want:
            from ..compress import storage

            stored, _ = storage.scoring(snapshot, FIELD)
            sims = codec.scores(stored.vectors[ok], q)[:, 0]
            rows = ok[np.argpartition(-sims, want - 1)[:want]] if 0 < want < len(ok) else ok[:want]
    rows = rows[rows >= 0]
    return np.sort(positions[rows])
