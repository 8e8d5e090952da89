"""Evaluation: metrics and protocol helpers."""
