"""The real train step compiled ahead of time for devices that need not be present.

With ``libtpu`` installed (``jax[tpu]`` of the installed jax version), XLA
compiles for a TPU topology from its description alone
(``jax.experimental.topologies.get_topology_desc``): the train step that
``glue_jax.diffusion_job`` would run, built from the same config (mesh, sharding
rules, remat, scan, dtype), is lowered on abstract inputs and compiled.  The
executable's memory analysis is what one chip needs; its cost analysis
carries the TPU compiler's own estimate of the step time
(``optimal_seconds``).  Both are compiler predictions, not measurements.

Caveats the callers handle:
- XLA's cost analysis counts a ``lax.scan`` body once (FLOPs and
  ``optimal_seconds`` alike), so only a step with unrolled blocks
  (``scan_layers=False``) gives per-step figures;
- ``optimal_seconds`` is negative when the compiler has no estimate.

The data source is not read: the batch is described by :func:`example_spec`
(ImageNet 256 through SD-VAE and DINOv2-B/14, as the feature store holds it).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp

from glue_jax import methods as methods_lib
from glue_jax import sharding
from glue_jax import diffusion_job


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip HBM and dense bf16 peak of a TPU generation (public spec sheets)."""
  name: str
  hbm_gib: float
  bf16_peak: float       # FLOP/s


CHIPS = {
    "v5p": Chip("TPU v5p", 95.0, 459e12),
    "v6e": Chip("TPU v6e (Trillium)", 32.0, 918e12),
    "v5e": Chip("TPU v5e", 16.0, 197e12),
}


def chip_of(topology: str) -> Chip:
  gen = topology.split(":")[0]
  if gen not in CHIPS:
    raise ValueError(f"topology {topology!r}: unknown TPU generation {gen!r}; "
                     f"known: {sorted(CHIPS)}")
  return CHIPS[gen]


def tpu_devices(topology: str) -> list:
  """The devices of a TPU topology such as ``'v5p:2x2x1'`` (no TPU needed).

  Needs ``libtpu``.  The environment variables keep libtpu from probing for
  hardware (and from refusing to load while another process holds it).
  """
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", _accelerator_type(topology))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except ImportError as e:
    raise ImportError("compiling for a TPU topology needs libtpu: "
                      f"pip install 'jax[tpu]=={jax.__version__}'") from e
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def _accelerator_type(topology: str) -> str:
  gen, _, shape = topology.partition(":")
  chips = 1
  for s in shape.split("x"):
    chips *= int(s)
  return f"{gen}-{chips * (2 if gen == 'v5p' else 1)}"   # v5p names count TensorCores


def example_spec(config, *, image_size: int = 256, encoder_dim: int = 768,
                 encoder_grid: int = 16, align_dtype=None) -> dict:
  """``{key: (shape, dtype)}`` of one feature-store example for ``config``'s method.

  SD-VAE posterior moments (``image_size / 8``, 2 x 4 channels), label, and
  what the method needs of DINOv2 (``encoder_grid`` x ``encoder_grid`` patches
  of width ``encoder_dim``): compressed ``semantic`` grid, ``cls``, REPA
  ``align_target`` in ``align_dtype`` (default bfloat16, the feature store's
  default).
  """
  method = methods_lib.get(config.method, **dict(config.method_overrides))
  lat = image_size // 8
  align_dtype = align_dtype or "bfloat16"
  spec = {"latent_moments": ((lat, lat, 8), jnp.float32), "label": ((), jnp.int32)}
  need = method.required_features()
  if "semantic" in need:
    spec["semantic"] = ((encoder_grid, encoder_grid, method.semantic_channels), jnp.float32)
  if "cls" in need:
    spec["cls"] = ((encoder_dim,), jnp.float32)
  if "align_target" in need:
    spec["align_target"] = ((encoder_grid ** 2, encoder_dim), jnp.dtype(align_dtype))
  return spec


def build(config, devices, **spec_kw) -> diffusion_job.Run:
  """``diffusion_job.build`` on ``devices`` with the batch described by :func:`example_spec`."""
  if config.features.mode == "online":
    raise ValueError("aot: features.mode='online' is not supported (precomputed only)")
  return diffusion_job.build(config, devices=devices, example_spec=example_spec(config, **spec_kw))


def abstract_inputs(run: diffusion_job.Run):
  """``(state, batch, key)`` as ShapeDtypeStructs carrying the run's shardings."""
  s = run.setup
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=s.batch_shardings[k])
           for k, (shape, dtype) in s.batch_spec.items()}
  k = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=jax.sharding.NamedSharding(
      run.mesh, jax.sharding.PartitionSpec()))
  return s.abstract_state(), batch, key


def lower_train_step(run: diffusion_job.Run):
  """The trainer's jitted, donating step lowered on abstract inputs under the
  run's mesh and logical-axis rules (as the trainer runs it)."""
  jitted = run.setup.jit_step()
  with jax.set_mesh(run.mesh), sharding.logical_rules(run.rules, run.mesh):
    return jitted.lower(*abstract_inputs(run))


def cost_dict(cost) -> dict:
  """A cost analysis as one dict (some versions return a list of dicts)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def analyze(compiled) -> dict:
  """Per-device memory (GiB) and cost figures of a compiled executable.

  ``peak_gib`` = arguments + outputs - aliased (donated) + temporaries: what
  one device holds at the step's high-water mark, by XLA's accounting.
  """
  out = {}
  mem = compiled.memory_analysis()
  if mem is not None:
    for name in ("argument", "output", "alias", "temp", "generated_code"):
      out[f"{name}_gib"] = getattr(mem, f"{name}_size_in_bytes", 0) / 2**30
    out["peak_gib"] = (out["argument_gib"] + out["output_gib"] - out["alias_gib"]
                       + out["temp_gib"])
  cost = cost_dict(compiled.cost_analysis())
  for src, dst in (("flops", "xla_flops_per_device"), ("optimal_seconds", "optimal_seconds"),
                   ("bytes accessed", "bytes_accessed_per_device"),
                   ("transcendentals", "transcendentals_per_device")):
    if src in cost:
      out[dst] = float(cost[src])
  return out


def compile_train_step(run: diffusion_job.Run) -> tuple[object, dict]:
  """Compiles the run's train step; returns the executable and :func:`analyze`
  plus ``compile_s``."""
  t0 = time.perf_counter()
  lowered = lower_train_step(run)
  compiled = lowered.compile()
  report = analyze(compiled)
  report["compile_s"] = time.perf_counter() - t0
  return compiled, report
