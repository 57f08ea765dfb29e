"""User-facing entry point: ``model = glue_jax.load_model(checkpoint_dir)``.

Works on any checkpoint directory written by the trainer or by
``python -m glue_jax.tools.import_torch``.  The returned object is a callable

  v_spatial, v_global, projections = model(x, t, y, global_token)

(x NHWC float32, t in [0, 1] with t=0 data, y int labels, global_token None
when the network has none), compiled once per input shape, plus
:meth:`LoadedModel.sample` which runs the checkpoint's sampler preset.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax import models
from glue_jax.sampling import presets, samplers
from glue_jax.train import checkpoint as ckpt_lib


@dataclasses.dataclass
class LoadedModel:
  """A network with restored weights and its checkpoint metadata."""
  network_name: str
  config: object                     # the network's config dataclass
  graphdef: object
  params: object                     # nnx.State of parameters
  meta: dict                         # the checkpoint's config JSON
  step: int

  @functools.cached_property
  def _apply(self):
    graphdef = self.graphdef

    @jax.jit
    def apply(params, x, t, y, g):
      return nnx.merge(graphdef, params)(x, t, y, g)
    return apply

  def __call__(self, x, t, y, global_token=None):
    x = jnp.asarray(x, jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    g = None if global_token is None else jnp.asarray(global_token, jnp.float32)
    return self._apply(self.params, x, t, jnp.asarray(y, jnp.int32), g)

  @property
  def preset(self) -> presets.SamplerPreset:
    return presets.SamplerPreset.from_dict(self.meta.get("sampler"))

  def apply_fn(self, params=None):
    """Pure ``(x, t, y, g) -> outputs`` closing over ``params`` (for samplers)."""
    params = self.params if params is None else params
    graphdef = self.graphdef
    return lambda x, t, y, g: nnx.merge(graphdef, params)(x, t, y, g)

  def sample(self, labels, *, seed: int = 0, indices=None, **preset_overrides):
    """Samples final states ``(x0, g0)`` for ``labels`` with the preset.

    Sample ``i`` uses the key derived from ``(seed, indices[i])`` (indices
    default to ``arange(len(labels))``), so results do not depend on batching.
    """
    preset = self.preset.replace(**preset_overrides)
    cfg = self.config
    y = jnp.asarray(labels, jnp.int32)
    idx = jnp.arange(y.shape[0]) if indices is None else jnp.asarray(indices)
    return _sample_jit(self.graphdef, preset, cfg.num_classes)(
        self.params, y, samplers.per_sample_keys(seed, idx),
        (cfg.input_size, cfg.input_size, cfg.in_channels), cfg.global_token_dim)


@functools.lru_cache(maxsize=8)
def _sample_jit(graphdef, preset, null_label):
  @functools.partial(jax.jit, static_argnums=(3, 4))
  def run(params, y, keys, spatial_shape, global_dim):
    apply = lambda x, t, yy, g: nnx.merge(graphdef, params)(x, t, yy, g)
    x1, g1 = samplers.initial_noise(keys, spatial_shape, global_dim)
    return presets.make_sampler(apply, preset, null_label=null_label)(x1, g1, y, keys)
  return run


def load_model(checkpoint_dir: str, *, use_ema: bool = True,
               step: int | None = None) -> LoadedModel:
  """Loads a network from a glue_jax checkpoint directory.

  Args:
    checkpoint_dir: the directory holding step subdirectories (a run's
      ``<workdir>/checkpoints`` or an import tool's ``--out``); a run's
      workdir is accepted too.
    use_ema: EMA weights (default) or raw parameters.
    step: a specific step; default the latest finished one.
  """
  if os.path.isdir(os.path.join(checkpoint_dir, "checkpoints")):
    checkpoint_dir = os.path.join(checkpoint_dir, "checkpoints")
  ck = ckpt_lib.Checkpointer(checkpoint_dir, read_only=True)
  step = ck.latest_step() if step is None else step
  if step is None:
    raise ckpt_lib.CheckpointError(f"no finished checkpoint in {checkpoint_dir}")
  meta = ck.read_config(step)
  if "network" not in meta:
    raise ckpt_lib.CheckpointError(f"{checkpoint_dir}/{step}: config has no 'network'")
  name = meta["network"]["name"]
  cfg = models.make_config(name, meta["network"]["config"])
  abstract = models.build(name, cfg, abstract=True)
  graphdef, abs_params = nnx.split(abstract)
  pure = nnx.to_pure_dict(abs_params)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pure)
  present = ck.items_at(step)
  item = "ema" if use_ema and "ema" in present else "params"
  if item == "params" and "params" not in present:
    item = "state"      # a training checkpoint without EMA: its raw params
    restored = ck.restore(step, state=ck.abstract_item(step, "state"))["state"]["params"]
  else:
    restored = ck.restore(step, **{item: target})[item]
  nnx.replace_by_pure_dict(abs_params, jax.tree.map(jnp.asarray, restored))
  ck.close()
  return LoadedModel(name, cfg, graphdef, abs_params, meta, step)


def save_network(directory: str, name: str, cfg, params, *, ema=None, step: int = 0,
                 extra: dict | None = None) -> str:
  """Writes a params(+EMA)-only checkpoint that :func:`load_model` reads."""
  meta = {"network": {"name": name, "config": dataclasses.asdict(cfg)}}
  meta.update(extra or {})
  ck = ckpt_lib.Checkpointer(directory, async_save=False)
  if step in ck.all_steps():
    raise FileExistsError(f"{directory}/{step} exists; refusing to overwrite")
  to_np = lambda t: jax.tree.map(np.asarray, nnx.to_pure_dict(t))
  ck.save(step, params=to_np(params), ema=None if ema is None else to_np(ema),
          config=meta)
  ck.close()
  return os.path.join(os.path.abspath(directory), str(step))
