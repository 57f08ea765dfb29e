"""Logical axis names -> mesh shardings.

Modules annotate every parameter with *logical* axis names (metadata key
``logical_axes`` on the ``nnx.Param``) and call :func:`constrain` on
activations with logical names.  Which mesh axis a logical name maps to is
decided by *rules* that live in the config (``config.sharding.rules``), so
the same network runs data-parallel, FSDP or replicated without edits.

A parameter that carries one more dimension than its logical names (blocks
stacked for ``lax.scan``) gets the leading logical axis ``'layers'``.

A dimension whose size is not divisible by the product of its mesh axes is
replicated instead of failing; :func:`param_shardings` reports such cases
through ``logging`` so nothing is silently different from what was asked.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx

Rules = Sequence[tuple[str, Any]]

# Rules used by default: FSDP on the hidden dimension, batch over data+fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("vocab", None),
    ("layers", None),
    ("seq", None),
)

_state = threading.local()


@contextlib.contextmanager
def logical_rules(rules: Rules | None, mesh: jax.sharding.Mesh | None = None):
  """Activates ``rules`` (and optionally ``mesh``) for :func:`constrain`."""
  old = getattr(_state, "ctx", None)
  _state.ctx = (tuple(tuple(r) for r in rules) if rules is not None else None,
                mesh)
  try:
    yield
  finally:
    _state.ctx = old


def _active():
  return getattr(_state, "ctx", None) or (None, None)


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> P:
  """Maps logical axis names to a PartitionSpec with ``rules``.

  A mesh axis is used at most once per spec (first logical axis wins).
  """
  table = {}
  for name, mesh_axes in rules:
    table.setdefault(name, mesh_axes)
  used: set[str] = set()
  out = []
  for ax in axes:
    m = table.get(ax) if ax is not None else None
    if m is None:
      out.append(None)
      continue
    ms = (m,) if isinstance(m, str) else tuple(m)
    ms = tuple(a for a in ms if a not in used)
    used.update(ms)
    out.append(None if not ms else (ms[0] if len(ms) == 1 else ms))
  return P(*out)


def _fit_spec_to_shape(spec: P, shape, mesh, where: str) -> P:
  """Replicates dims whose size the mesh axes do not divide."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if entry is None:
      out.append(None)
      continue
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    size = math.prod(mesh.shape[n] for n in names)
    if dim % size:
      logging.info("sharding: %s dim %d not divisible by %s=%d; replicated",
                   where, dim, names, size)
      out.append(None)
    else:
      out.append(entry)
  return P(*out)


def variable_logical_axes(var: nnx.Variable) -> tuple[str | None, ...]:
  """The logical axes of a variable, with 'layers' prepended when stacked."""
  meta = var.get_metadata()
  axes = meta.get("logical_axes")
  ndim = len(var.shape)
  if axes is None:
    return (None,) * ndim
  axes = tuple(axes)
  if len(axes) == ndim - 1:
    axes = ("layers",) + axes
  if len(axes) != ndim:
    raise ValueError(f"variable of shape {var.shape} has logical axes {axes}")
  return axes


def param_specs(state, rules: Rules, mesh=None):
  """A tree of PartitionSpecs matching ``state`` (an ``nnx.State``)."""
  def one(path, var):
    spec = logical_to_spec(variable_logical_axes(var), rules)
    if mesh is not None:
      spec = _fit_spec_to_shape(spec, var.shape, mesh, jax.tree_util.keystr(path))
    return spec
  return jax.tree.map_with_path(
      one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, mesh, rules: Rules):
  """NamedShardings for every variable of ``state`` on ``mesh``."""
  specs = param_specs(state, rules, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical names; a no-op without rules."""
  rules, mesh = _active()
  if rules is None or mesh is None:
    return x
  spec = _fit_spec_to_shape(logical_to_spec(axes, rules), x.shape, mesh,
                            "activation")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a batch-leading array of rank ``ndim``."""
  spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)
