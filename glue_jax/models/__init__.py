"""Networks of glue_jax, chosen by name in configs (see :func:`build`)."""

from __future__ import annotations

import dataclasses

from flax import nnx

from glue_jax.models import sit


def _registry():
  return {"sit": (sit.SiTConfig, sit.SiT)}


def make_config(name: str, config: dict):
  """The config dataclass of network ``name`` from a plain dict."""
  reg = _registry()
  if name not in reg:
    raise ValueError(f"unknown network {name!r}; one of {sorted(reg)}")
  cls = reg[name][0]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(config) - known
  if unknown:
    raise ValueError(f"network {name!r}: unknown config keys {sorted(unknown)}")
  return cls(**config)


def build(name: str, config, *, seed: int = 0, abstract: bool = False):
  """Instantiates network ``name``; ``abstract`` only traces shapes."""
  cls = _registry()[name][1]
  cfg = config if not isinstance(config, dict) else make_config(name, config)
  make = lambda: cls(cfg, rngs=nnx.Rngs(seed))
  return nnx.eval_shape(make) if abstract else make()


def init(name: str, config, *, seed: int = 0, out_shardings=None):
  """``(graphdef, state)`` with the state created inside ``jax.jit``.

  Compiling the initialiser is much faster than running it op by op, and
  with ``out_shardings`` every parameter is created directly sharded (never
  a full host copy).
  """
  import jax
  cfg = config if not isinstance(config, dict) else make_config(name, config)
  graphdef = nnx.graphdef(build(name, cfg, abstract=True))
  make = lambda: nnx.state(build(name, cfg, seed=seed))
  return graphdef, jax.jit(make, out_shardings=out_shardings)()
