"""finegrain: fine-grained text and image retrieval over an on-disk index."""

__version__ = "0.1.0"

from .index import Index  # noqa: E402
from .retrieval import Query, SearchResponse, SearchResult  # noqa: E402

__all__ = ["Index", "Query", "SearchResponse", "SearchResult", "__version__"]
