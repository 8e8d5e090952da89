"""Training recipes for finegrain models."""
