"""REGLUE's pipeline pieces: the semantic compressor job, feature precompute,
the embedded digits demo and the reproduction of published numbers."""
