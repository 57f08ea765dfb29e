"""Interpolants, time sampling and the multimodal velocity / alignment losses."""
