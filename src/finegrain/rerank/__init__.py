"""Re-ranking of a search shortlist.

- :mod:`finegrain.rerank.mds`: local-to-global (L2G) re-ranking: an MDS
  embedding of the shortlist's sparse local similarities, fused with the
  global descriptor and re-ranked SuperGlobal-style.
"""

from .mds import L2GConfig, L2GResult, l2g_rerank, superglobal_rerank

__all__ = ["L2GConfig", "L2GResult", "l2g_rerank", "superglobal_rerank"]
