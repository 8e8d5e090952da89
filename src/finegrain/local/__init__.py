"""Local features and local (Chamfer) search: the first stage of local-to-global retrieval (L2G).

- :mod:`finegrain.local.features`: extractors (``cnn``, ``sift``, ``disk``) returning
  descriptors with image positions, the PCA-whitening fitted on a collection,
  and the instance-retrieval global descriptor (multi-scale GeM, whitened).
- :mod:`finegrain.local.chamfer`: exact Chamfer similarity, the approximate
  CANN-style search over all database descriptors, and approx-vs-exact recall.
"""

from .chamfer import ApproxChamfer, LocalDatabase, chamfer_scores, chamfer_similarity, knn_graph, recall_at_k
from .features import (
                       CNNExtractor,
                       DISKExtractor,
                       LocalExtractor,
                       LocalFeatures,
                       PCAWhitening,
                       RawFeatures,
                       SIFTExtractor,
                       create,
                       list_extractors,
                       load,
)

__all__ = [
    "ApproxChamfer", "CNNExtractor", "DISKExtractor", "LocalDatabase", "LocalExtractor", "LocalFeatures",
    "PCAWhitening", "RawFeatures", "SIFTExtractor", "chamfer_scores", "chamfer_similarity", "create", "knn_graph",
    "list_extractors", "load", "recall_at_k",
]
