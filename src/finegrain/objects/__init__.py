"""Small-object retrieval (MaO): object proposals, multi-object descriptors, attention-map refinement.

See docs/mao.md. Public pieces: :class:`ObjectConfig` (stored with an index),
:func:`~finegrain.objects.proposals.propose`, and the search modes in
:data:`OBJECT_MODES`.
"""

from .config import ObjectConfig
from .search import FIELDS, OBJECT_MODES

__all__ = ["ObjectConfig", "OBJECT_MODES", "FIELDS"]
