"""finegrain: fine-grained text and image retrieval over an on-disk index."""

__version__ = "0.1.0"

from .index import Index, SearchResult  # noqa: E402

__all__ = ["Index", "SearchResult", "__version__"]
