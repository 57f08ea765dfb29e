"""The entry of ``config.kind == 'lainr'``: dispatch on ``config.task``."""

from __future__ import annotations

from glue_jax.projects.lainr import generation, novel_views, reconstruction

TASKS = {"reconstruct": reconstruction.run, "nvs": novel_views.run, "generate": generation.run}


def run(config, workdir: str) -> dict:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r}: {' | '.join(TASKS)}")
  return TASKS[config.task](config, workdir)
