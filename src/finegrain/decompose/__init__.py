"""Decomposition: images into segments, queries into sub-queries."""
