"""Device mesh, shardings of the train state and batches, multi-host setup."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from flax import nnx

from glue_jax import sharding


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
  specs = sharding.param_specs(abstract_state, rules, mesh)
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
  return {k: sharding.batch_sharding(mesh, rules, nd) for k, nd in batch_spec.items()}


def global_batch(local: dict, shardings: dict) -> dict:
  """Per-process numpy batch -> global jax.Arrays on the mesh."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local.items()}
