"""User-facing entry point: ``model = glue_jax.load_model(checkpoint_dir)``.

Works on any checkpoint directory written by the trainer or by
``python -m glue_jax.tools.import_torch``.  The returned object is a callable

  v_spatial, v_global, projections = model(x, t, y, global_token)

(x NHWC float32, t in [0, 1] with t=0 data, y int labels, global_token None
when the network has none), compiled once per input shape, plus
:meth:`LoadedModel.sample` which runs the checkpoint's sampler preset (it
returns *model-space* states), :meth:`LoadedModel.decode` which turns them
into uint8 images through the checkpoint's first stage, and
:meth:`LoadedModel.sample_images` which does both.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax import models
from glue_jax.models import first_stage as first_stage_lib
from glue_jax.sampling import presets, sample_from_keys, samplers
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
  directory: str = ""                # the checkpoint directory it was read from

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

    Returns model-space tensors, not images:

    - ``x0``: float32 ``(N, H, W, latent_channels + semantic_channels)``
      (``H = W = config.input_size``); channels ``[:latent_channels]`` are the
      first stage's latents after the trainer's ``scale``/``shift`` (SD-VAE
      latents, or pixel-tokenizer values for a ``pixel`` first stage), the
      remaining ``semantic_channels`` the generated compressed semantic grid
      (REGLUE; none for SiT/REPA/REG);
    - ``g0``: float32 ``(N, global_token_dim)``, the generated global [CLS]
      token, or None when the network has none.

    ``model.decode(x0)`` (or :meth:`sample_images`) gives uint8 images.
    Sample ``i`` uses the key derived from ``(seed, indices[i])`` (indices
    default to ``arange(len(labels))``), so results do not depend on batching.
    """
    preset = self.preset.replace(**preset_overrides)
    cfg = self.config
    y = jnp.asarray(labels, jnp.int32)
    idx = jnp.arange(y.shape[0]) if indices is None else jnp.asarray(indices)
    return _sample_jit(self.graphdef, preset, cfg.num_classes, cfg.latent_channels)(
        self.params, y, samplers.per_sample_keys(seed, idx),
        (cfg.input_size, cfg.input_size, cfg.in_channels), cfg.global_token_dim)


  def first_stage_config(self, vae: str | None = None) -> dict:
    """The checkpoint's first stage (``meta['first_stage']``; checkpoints that
    store none, e.g. imported official ones, use the SD-VAE with scale
    0.18215).  ``vae`` gives or overrides the SD-VAE weights path."""
    fs = dict(self.meta.get("first_stage") or
              {"name": "vae", "path": "", "scale": 0.18215, "shift": 0.0})
    where = f"checkpoint {self.directory or '?'}/{self.step}"
    if vae:
      if fs.get("name", "vae") != "vae":
        raise ValueError(f"vae={vae!r} given but the {where} decodes with the "
                         f"{fs['name']!r} first stage")
      fs["name"], fs["path"] = "vae", vae
    if fs.get("name", "vae") == "vae" and not fs.get("path"):
      raise ValueError(f"{where} decodes with the SD-VAE but stores no weights path; "
                       "pass vae=PATH (a diffusers directory or a .npz from "
                       "glue_jax.tools.convert_weights --kind vae)")
    return fs

  def first_stage(self, vae: str | None = None):
    """The :class:`glue_jax.models.first_stage.FirstStage` of the checkpoint
    (built once per ``vae``)."""
    return _first_stage(tuple(sorted(self.first_stage_config(vae).items())))

  def decode(self, x0, *, vae: str | None = None):
    """uint8 NHWC images ``(N, H*f, W*f, 3)`` from model-space states.

    ``x0`` is what :meth:`sample` returns (the semantic channels after
    ``latent_channels`` are dropped) or bare latents.  The first stage is the
    checkpoint's; a ValueError names what is missing when its weights are not
    available (``vae=PATH`` supplies the SD-VAE weights).
    """
    latent = getattr(self.config, "latent_channels", None) or x0.shape[-1]
    x0 = jnp.asarray(x0, jnp.float32)
    if x0.ndim != 4 or x0.shape[-1] < latent:
      raise ValueError(f"decode: expected (N, H, W, >= {latent}) model-space states, "
                       f"got shape {tuple(x0.shape)}")
    return np.asarray(self.first_stage(vae).decode_uint8(x0[..., :latent]))

  def sample_images(self, labels, *, seed: int = 0, indices=None, vae: str | None = None,
                    **preset_overrides):
    """``decode(sample(labels, ...)[0])``: uint8 NHWC images of ``labels``.

    The first stage is checked before sampling, so missing VAE weights fail
    fast."""
    self.first_stage(vae)
    x0, _ = self.sample(labels, seed=seed, indices=indices, **preset_overrides)
    return self.decode(x0, vae=vae)


@functools.lru_cache(maxsize=4)
def _first_stage(items: tuple):
  return first_stage_lib.build(dict(items))


@functools.lru_cache(maxsize=8)
def _sample_jit(graphdef, preset, null_label, latent_channels):
  @functools.partial(jax.jit, static_argnums=(3, 4))
  def run(params, y, keys, spatial_shape, global_dim):
    apply = lambda x, t, yy, g: nnx.merge(graphdef, params)(x, t, yy, g)
    return sample_from_keys.sample(apply, preset, y, keys, spatial_shape=spatial_shape,
                                   global_dim=global_dim, null_label=null_label,
                                   latent_channels=latent_channels)
  return run


def load_model(checkpoint_dir: str, *, use_ema: bool = True,
               step: int | None = None) -> LoadedModel:
  """Loads a network from a glue_jax checkpoint directory.

  Args:
    checkpoint_dir: the directory holding step subdirectories (a run's
      ``<workdir>/checkpoints`` or an import tool's ``--out``); a run's
      workdir is accepted too.
    use_ema: EMA weights (default) or raw parameters.
    step: a specific step; default the newest step that reads.  A newer step
      that cannot be read (truncated, corrupted) is skipped with a logged
      warning naming it and the reason; when none reads, or the given
      ``step`` does not, a :class:`CheckpointError` names the step and file.
  """
  if os.path.isdir(os.path.join(checkpoint_dir, "checkpoints")):
    checkpoint_dir = os.path.join(checkpoint_dir, "checkpoints")
  ck = ckpt_lib.Checkpointer(checkpoint_dir, read_only=True)
  try:
    steps = sorted(ck.all_steps(), reverse=True)
    if not steps:
      raise ckpt_lib.CheckpointError(ckpt_lib.no_checkpoint_message(checkpoint_dir))
    if step is not None:
      if step not in steps:
        raise ckpt_lib.CheckpointError(f"{checkpoint_dir}: no finished step {step} "
                                       f"(steps: {sorted(steps)})")
      try:
        return _load_step(ck, checkpoint_dir, step, use_ema)
      except ckpt_lib.CheckpointError as e:
        raise ckpt_lib.CheckpointError(
            f"{checkpoint_dir}: step {step} is unreadable: {ckpt_lib.describe_failure(e)}"
        ) from None
    skipped = []
    for s in steps:
      try:
        model = _load_step(ck, checkpoint_dir, s, use_ema)
      except ckpt_lib.CheckpointError as e:
        if e.reason is None:       # not a read failure (e.g. no 'network'): no fallback
          raise
        reason = ckpt_lib.describe_failure(e)
        skipped.append((s, reason))
        logging.warning("checkpoint %s/%d is unreadable, skipped: %s", checkpoint_dir, s,
                        reason)
        continue
      if skipped:
        logging.warning("loaded step %d of %s (newer unreadable step%s %s skipped)", s,
                        checkpoint_dir, "s" if len(skipped) > 1 else "",
                        ", ".join(str(k) for k, _ in skipped))
      return model
    lines = "".join(f"\n  step {k}: {why}" for k, why in skipped)
    raise ckpt_lib.CheckpointError(f"{checkpoint_dir}: no checkpoint step could be read:{lines}")
  finally:
    ck.close()


def _load_step(ck, checkpoint_dir: str, step: int, use_ema: bool) -> LoadedModel:
  meta = ck.read_config(step)
  if "network" not in meta:       # readable, but not a network checkpoint: no fallback
    raise ckpt_lib.CheckpointError(f"{checkpoint_dir}/{step}: config has no 'network' (not "
                                   "a checkpoint of glue_jax.train or tools.import_torch)")
  name = meta["network"]["name"]
  cfg = models.make_config(name, meta["network"]["config"])
  abstract = models.build(name, cfg, abstract=True)
  graphdef, abs_params = nnx.split(abstract)
  pure = nnx.to_pure_dict(abs_params)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pure)
  present = ck.items_at(step)
  item = "ema" if use_ema and "ema" in present else "params"
  if use_ema and item != "ema":
    logging.warning("%s/%d has no EMA weights; loading its raw parameters", checkpoint_dir,
                    step)
  if item == "params" and "params" not in present:
    item = "state"      # a training checkpoint without EMA: its raw params
    restored = ck.restore(step, state=ck.abstract_item(step, "state"))["state"]["params"]
  else:
    restored = ck.restore(step, **{item: target})[item]
  nnx.replace_by_pure_dict(abs_params, jax.tree.map(jnp.asarray, restored))
  return LoadedModel(name, cfg, graphdef, abs_params, meta, step, checkpoint_dir)


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
