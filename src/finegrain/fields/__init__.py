"""Index fields: one :class:`FieldExtractor` per field family, run by every indexing engine.

Adding a field is one module that subclasses :class:`FieldExtractor` and calls
:func:`register` (see docs/architecture.md, "Add a field"). The built-in ones:
``global`` (:mod:`.dense`), ``segments`` (:mod:`.segments`), ``objects``
(:mod:`.objects`), ``local`` + ``instance`` (:mod:`.local`).
"""

# Importing the built-in modules registers them, in the order engines run them.
from . import dense, segments, objects, local  # noqa: F401, I001
from .base import Decoded, FieldExtractor, build, register, registered, unregister

__all__ = ["Decoded", "FieldExtractor", "build", "register", "registered", "unregister"]
