"""Command-line tools (``python -m glue_jax.tools.<tool> --help``)."""
