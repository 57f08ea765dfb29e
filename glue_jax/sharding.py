"""The one sharding module: meshes, logical axis names -> shardings, global arrays.

- meshes: :func:`make_mesh` from the config (``{'data': -1, 'fsdp': 1}``, also
  over the devices of a TPU topology for ahead-of-time compilation),
  :func:`data_mesh` (1-D, evaluation), :func:`maybe_initialize_distributed`;
- parameters and activations: logical axis names and rules (below);
- the train state and batches: :func:`pure_param_shardings`,
  :func:`batch_shardings`, :func:`replicated`; host data -> global arrays:
  :func:`global_batch` (per-process batches), :func:`to_global` and
  :func:`replicate` (arrays identical on every process).

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
import os
import threading
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
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


# -- meshes, state and batch shardings, multi-host ----------------------------
def maybe_initialize_distributed(enabled: bool | None = None) -> None:
  """``jax.distributed.initialize()`` on multi-host runs.

  Enabled explicitly, or when ``GLUE_JAX_DISTRIBUTED=1`` / a coordinator
  address is in the environment (TPU pods and SLURM auto-detect the rest).
  """
  if enabled is None:
    enabled = (os.environ.get("GLUE_JAX_DISTRIBUTED") == "1"
               or "JAX_COORDINATOR_ADDRESS" in os.environ)
  if not enabled or jax.distributed.is_initialized():
    return
  kw = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kw = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
              num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
              process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kw)
  logging.info("jax.distributed: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())


def make_mesh(axes: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """Mesh from ``{'data': -1, 'fsdp': 1}``; one -1 takes the remaining devices.

  ``devices``: all of JAX's by default; or e.g. the devices of a TPU topology
  description (ahead-of-time compilation without the hardware).
  """
  names = tuple(axes)
  sizes = [int(v) for v in axes.values()]
  n = jax.device_count() if devices is None else len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {axes}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f"mesh {axes}: {n} devices not divisible by {known}")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} "
                     f"devices; {n} available")
  kw = {} if devices is None else {"devices": list(devices)}
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), **kw)


def pure_param_shardings(abstract_state, mesh, rules) -> dict:
  """NamedShardings as a nested dict matching ``nnx.to_pure_dict``."""
  specs = param_specs(abstract_state, rules, mesh)
  out: dict = {}
  for path, spec in nnx.to_flat_state(specs):
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = NamedSharding(mesh, spec)
  return out


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shardings(batch_spec: dict, mesh, rules) -> dict:
  """Batch-leading sharding for each entry of ``{'name': ndim}``."""
  return {k: batch_sharding(mesh, rules, nd) for k, nd in batch_spec.items()}


def global_batch(local: dict, shardings: dict) -> dict:
  """Per-process numpy batch -> global jax.Arrays on the mesh."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local.items()}


# -- 1-D 'data' meshes of evaluation (sampling, feature extraction) ----------
def data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``'data'`` over ``devices`` (default: all devices)."""
  devs = np.asarray(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(devs.reshape(-1), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))


def to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array identical on every process -> a global array."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def replicate(tree, mesh) -> Any:
  """Places a pytree of arrays replicated on ``mesh`` (multi-process safe)."""
  rep = NamedSharding(mesh, P())
  return jax.tree.map(lambda a: to_global(np.asarray(a), rep), tree)
