"""Evaluation metrics (FID/sFID, IS, precision/recall, alignment probes)."""
