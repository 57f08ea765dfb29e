r"""Precompute REGLUE's per-image features into the sharded feature store.

  A=dataset=imagenet2012,data_dir=DATA,vae=VAE.npz,dinov2=DINOV2.npz,compressor=COMP.npz
  python -m glue_jax.tools.precompute --config=glue_jax/configs/precompute.py:$A --out=features/in256
  python -m glue_jax.tools.precompute --out=features/digits16 \
      --config=glue_jax/configs/precompute.py:preset=demo,demo_dir=workdirs/demo,data_dir=DATA

(``stats`` defaults to REGLUE's released statistics shipped in
``glue_jax/assets``; multi-host: run the same command on every host.)

For every example of the split (ADM center crop to ``image_size``) it stores:
``latent_moments`` (VAE posterior [mean, std] on channels, raw latent
space: the trainer samples and scales) or ``latents`` (pixel tokenizer);
``semantic`` (DINOv2 blocks ``layers``, each through the final norm,
channel-concatenated, standardized with the released/own statistics and
compressed to 16 channels: 16x16x16 at 256 px); ``cls`` (final [CLS] after
the norm, raw); optionally ``align_target`` (final normed patch tokens, the
REPA target; bfloat16 by default: 0.4 MB per image).  Each process writes
its own shards (``--process_index/--process_count`` default to JAX's);
rerunning resumes (finished shards are skipped).  See
:mod:`glue_jax.data.feature_store` for the format.

The parts are plain functions of ``(params, images)`` (:class:`Component`),
so tests and benchmarks pass tiny random encoders; :func:`build_extractor`
makes them from a config (the semantic part is
:class:`glue_jax.models.semantic_encoder.SemanticEncoder`, the module the
compressor trainer and online-feature training use).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.data import feature_store, imagenet
from glue_jax.models import compressor as compressor_lib
from glue_jax.models import compressor_weights, dinov2_weights, pixel_tokenizer, vae_weights
from glue_jax.models import semantic_encoder as se
from glue_jax import sharding
from glue_jax.train import writers
OUTPUTS = ("first_stage", "semantic", "cls", "align_target")


@dataclasses.dataclass
class Component:
  """A frozen network as a plain function: ``apply(params, x)``; ``identity``
  describes it (``hash``: SHA-256 of the weights) for the manifest."""
  apply: Callable
  params: Any
  identity: dict


def module_component(module: nnx.Module, fn: Callable, **identity) -> Component:
  """Wraps ``fn(module, x)`` as a :class:`Component` over the module's state."""
  graphdef, state = nnx.split(module)
  pure = nnx.to_pure_dict(state)
  return Component(lambda p, x: fn(nnx.merge(graphdef, p), x), state,
                   {**identity, "hash": feature_store.params_hash(pure)})


# -- parts ------------------------------------------------------------------------
def pixel_first_stage(factor: int) -> Component:
  """Exact space-to-depth tokenizer: ``{'latents'}`` in [-1, 1] (raw space)."""
  return Component(lambda p, x: {"latents": pixel_tokenizer.encode(x, factor)}, {},
                   {"name": "pixel", "factor": int(factor),
                    "hash": hashlib.sha256(f"pixel:{factor}".encode()).hexdigest()})


def vae_first_stage(model, **identity) -> Component:
  """SD-VAE posterior ``{'latent_moments': [mean, std]}`` (raw latent space)."""
  def fn(m, x):
    mean, std = m.encode_moments(pixel_tokenizer.to_signed(x))
    return {"latent_moments": jnp.concatenate([mean, std], axis=-1)}
  return module_component(model, fn, name="vae", **identity)


def semantic_component(encoder) -> Component:
  """A :class:`glue_jax.models.semantic_encoder.SemanticEncoder` (frozen DINOv2 +
  statistics + compressor/PCA) as a component giving ``semantic``, ``cls``,
  ``align_target``; its identity hashes the ViT and the local projection
  (with the statistics) separately."""
  graphdef, state = nnx.split(encoder)
  pure = nnx.to_pure_dict(state)
  spec = encoder.spec
  vit = {"name": "dinov2", "layers": list(spec.layers), "input_size": spec.input_size,
         "config": {k: v for k, v in dataclasses.asdict(encoder.vit.cfg).items()
                    if k not in ("dtype", "attention_impl", "scan_layers")},
         "hash": feature_store.params_hash(pure["vit"])}
  local = {k: v for k, v in pure.items() if k != "vit"}
  proj = {"name": spec.local, "stats_eps": spec.stats_eps,
          "hash": feature_store.params_hash(local)}
  return Component(lambda p, x: nnx.merge(graphdef, p)(x), state,
                   {"encoder": vit, "compressor": proj})


def make_extractor(first_stage: Component | None, semantic: Component | None = None, *,
                   outputs=OUTPUTS, align_dtype: str = "bfloat16",
                   data_parallel: bool = True):
  """``(extract, identity)``: one jitted ``uint8 (B,H,W,3) -> {name: (B, ...)}``.

  ``first_stage.apply`` gives ``latent_moments`` or ``latents``;
  ``semantic.apply`` a dict with ``semantic``/``cls``/``align_target`` (any
  plain function of ``(params, images)`` works: tests pass tiny random
  encoders).  With ``data_parallel`` the batch is split over this process's
  devices when it divides evenly (parameters replicated).
  """
  outputs = tuple(outputs)
  unknown = set(outputs) - set(OUTPUTS)
  if unknown:
    raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
  if "first_stage" in outputs and first_stage is None:
    raise ValueError("output 'first_stage' needs a first stage")
  wanted = [k for k in outputs if k != "first_stage"]
  if wanted and semantic is None:
    raise ValueError(f"outputs {wanted} need a semantic encoder")
  params = {"first_stage": first_stage.params if first_stage is not None else {},
            "semantic": semantic.params if semantic is not None and wanted else {}}
  adt = feature_store.np_dtype(align_dtype)

  def fn(p, images):
    out = {}
    if "first_stage" in outputs:
      out.update(first_stage.apply(p["first_stage"], images))
    if wanted:
      feats = semantic.apply(p["semantic"], images)
      for k in wanted:
        if k not in feats:
          raise KeyError(f"semantic encoder gave {sorted(feats)}; output '{k}' requested")
        out[k] = feats[k].astype(adt if k == "align_target" else jnp.float32)
    return out

  jitted = jax.jit(fn)
  devices = jax.local_devices()
  sharded = data_parallel and len(devices) > 1
  if sharded:
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params = jax.device_put(params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))

  def extract(images):
    if sharded and isinstance(images, np.ndarray) and len(images) % len(devices) == 0:
      images = jax.device_put(images, batch_sharding)
    return jitted(params, images)

  identity = {"outputs": list(outputs)}
  if "first_stage" in outputs:
    identity["first_stage"] = first_stage.identity
  if wanted:
    identity.update(semantic.identity)
  if "align_target" in outputs:
    identity["align_dtype"] = align_dtype
  return extract, identity


# -- loading from a config ---------------------------------------------------------
def load_compressor(path: str):
  """A trained compressor: our ``.npz`` (``writers.save_module``: the demo's and
  ``compressor_train``'s output; channels read off the conv kernels) or the
  official checkpoint (``compressor_weights.load_compressor``)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"compressor weights {path} not found")
  if path.endswith(".npz"):
    with np.load(path) as f:
      kernels = {k: f[k].shape for k in f.files
                 if re.fullmatch(r"(en|de)coder/layers/\d+/kernel", k)}
    if kernels:
      enc = [kernels[k] for k in sorted((k for k in kernels if k.startswith("en")),
                                         key=lambda k: int(k.split("/")[2]))]
      dec_in = kernels["decoder/layers/0/kernel"][2]
      channels = [enc[0][2]] + [s[3] for s in enc]
      variational = channels[-1] == 2 * dec_in
      channels[-1] = dec_in
      cfg = compressor_lib.CompressorConfig(channels=tuple(channels), variational=variational)
      model = build_module(lambda: compressor_lib.Compressor(cfg, rngs=nnx.Rngs(0)))
      return writers.load_module(model, path)
  return compressor_weights.load_compressor(path)


def build_module(make):
  """Instantiates a module with its parameters created inside ``jax.jit``."""
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


def build_extractor(config):
  """``(extract, identity)`` from a ``glue_jax/configs/precompute.py`` config."""
  outputs = tuple(config.outputs)
  fs_cfg = config.first_stage
  first = None
  if "first_stage" in outputs:
    if fs_cfg.name == "pixel":
      first = pixel_first_stage(int(fs_cfg.factor))
    elif fs_cfg.name == "vae":
      first = vae_first_stage(vae_weights.load_vae(fs_cfg.path), path=os.path.abspath(fs_cfg.path))
    else:
      raise ValueError(f"first_stage.name={fs_cfg.name!r}; 'pixel' or 'vae'")
  semantic = None
  if set(outputs) - {"first_stage"}:
    ec = config.encoder
    if not ec.path:
      raise ValueError("encoder.path: DINOv2 weights (HF dir, hub .pth or .npz) are needed "
                       f"for outputs {outputs}")
    vit = dinov2_weights.load_dinov2(ec.path, variant=ec.get("variant") or None)
    local = "compressor" if "semantic" in outputs else "none"
    spec = se.SemanticSpec(tuple(ec.layers), ec.input_size or None, local,
                           stats_eps=config.compressor.eps)
    stats = comp = None
    if local == "compressor":
      stats = se.load_stats(config.compressor.stats, vit.cfg.dim * len(spec.layers))
      comp = load_compressor(config.compressor.path)
    semantic = semantic_component(se.SemanticEncoder(vit, spec, stats=stats, compressor=comp))
    semantic.identity["encoder"]["path"] = os.path.abspath(ec.path)
    if comp is not None:
      semantic.identity["compressor"].update(path=os.path.abspath(config.compressor.path),
                                             stats=os.path.abspath(config.compressor.stats))
  return make_extractor(first, semantic, outputs=outputs, align_dtype=config.align_dtype,
                        data_parallel=config.get("data_parallel", True))


def run(config, out: str, *, process_index: int | None = None,
        process_count: int | None = None, fault_after_shards: int | None = None) -> dict:
  """Precomputes one split into ``<out>/<split>``; returns a summary."""
  if process_index is None:
    sharding.maybe_initialize_distributed(config.get("distributed"))
    process_index, process_count = jax.process_index(), jax.process_count()
  source, fingerprint = imagenet.open_image_source(
      config.dataset, config.split, config.data_dir or None,
      image_size=config.image_size, on_corrupt=config.on_corrupt)
  extract, identity = build_extractor(config)
  directory = os.path.join(out, feature_store.split_dirname(config.split))
  manifest = feature_store.write_split(
      directory, source=source, extract=extract, split=config.split, dataset=fingerprint,
      identity=identity,
      preprocessing={"crop": "adm_center_crop", "image_size": int(config.image_size)},
      examples_per_shard=config.examples_per_shard, batch_size=config.batch_size,
      process_index=process_index, process_count=process_count,
      writer_options=config.writer_options, read_threads=config.read_threads,
      fault_after_shards=fault_after_shards)
  summary = {"directory": directory, "complete": manifest is not None,
             "process": [process_index, process_count]}
  if manifest is not None:
    summary.update(count=manifest["count"], num_shards=manifest["num_shards"],
                   num_skipped=manifest["num_skipped"],
                   features={k: v["shape"] for k, v in manifest["features"].items()})
  return summary


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "glue_jax/configs/precompute.py[:args]",
                                  lock_config=True)
  flags.DEFINE_string("out", None, "feature store root (a directory per split)")
  flags.DEFINE_integer("process_index", -1, "this process (default: jax.process_index())")
  flags.DEFINE_integer("process_count", -1, "processes (default: jax.process_count())")
  flags.mark_flags_as_required(["config", "out"])

  def _main(_):
    logging.getLogger().setLevel(logging.INFO)
    f = flags.FLAGS
    pi = None if f.process_index < 0 else f.process_index
    pc = None if f.process_count < 0 else f.process_count
    if (pi is None) != (pc is None):
      raise app.UsageError("give both --process_index and --process_count, or neither")
    import json
    print(json.dumps(run(f.config, f.out, process_index=pi, process_count=pc), indent=1))
  app.run(_main, argv)


if __name__ == "__main__":
  main()
