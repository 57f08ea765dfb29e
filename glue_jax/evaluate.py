r"""Evaluation at scale: sample 50K images from a checkpoint and score them.

  python -m glue_jax.evaluate --checkpoint=WORKDIR --num_samples=50000 \
      --inception_weights=pt_inception-2015-12-05-6726825d.pth \
      --reference=VIRTUAL_imagenet256_labeled.npz
  python -m glue_jax.evaluate --checkpoint=workdirs/demo/reglue --features=digits \
      --reference=ref_digits_test.npz --num_samples=2000 --labels=balanced
  python -m glue_jax.evaluate --samples_npz=samples.npz --reference=REF.npz  # score only

Sampling (:mod:`glue_jax.eval.generate`) runs sharded over every device and
process with the checkpoint's EMA weights and its stored sampler preset
(``--preset``, ``--sampler``, ``--num_steps``, ``--cfg_scale``,
``--guidance_interval`` override it), decodes through the stored first stage
(``--vae`` supplies/overrides the VAE weights path) and writes resumable
shards under ``--out_dir``; a restart skips (and verifies) finished shards.
Sample ``i`` depends on ``(seed, i)`` only.  The shards are assembled into an
ADM-compatible ``.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels).

Class labels (``--labels``): ``random`` (default) draws them uniformly and
independently, as the official scripts do (``torch.randint``, not
class-balanced); ``balanced`` gives sample ``i`` the label ``i % C`` (exactly
50 per class for 50K ImageNet samples; this alone moves FID by ~0.1);
``null`` samples unconditionally.  The mode is part of the shard manifest,
the default output directory's name and ``metrics.json`` (``labels`` and
``label_counts``: min/max samples per class).

Metrics (:mod:`glue_jax.eval.metrics`): FID, sFID, Inception Score (ADM's
5,000-row splits; ``--is_splits=10`` for N/10-row splits), precision/recall
(k=3, on every reference image as ADM) against ``--reference`` (an ADM
reference batch or a ``glue_jax.tools.reference_stats`` file), with the Flax
Inception (``--features=inception``) or the digits classifier
(``--features=digits``).  Results go to ``<out_dir>/metrics.json``; a sample
grid to ``samples.png``.

``--config`` (optional) is an ml_collections file whose ``eval`` section (or
top level) provides defaults for these flags; flags given on the command line
win.  ``run(config, workdir)`` serves ``python -m glue_jax.main`` for
``config.kind == 'evaluate'``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from glue_jax import api
from glue_jax.eval import digits_classifier, features, generate, metrics, reference, sample_store
from glue_jax.models import first_stage as first_stage_lib
from glue_jax.sampling import presets
from glue_jax.train import checkpoint as ckpt_lib
from glue_jax import sharding
from glue_jax.train import writers
@dataclasses.dataclass
class EvalOptions:
  """Everything one evaluation needs (the CLI flags, as a dataclass)."""
  checkpoint: str = ""
  out_dir: str = ""
  step: int = -1                      # -1: latest
  use_ema: bool = True
  num_samples: int = 50_000
  seed: int = 0
  labels: str = "random"              # random | balanced | null
  preset: str = ""                    # a name in sampling.presets.PRESETS
  sampler: str = ""                   # sde | ode ('' : preset)
  num_steps: int = 0
  cfg_scale: float | None = None
  global_cfg_scale: float | None = None
  guidance_interval: str = ""         # "lo,hi"
  vae_cfg: str = ""                   # '' (preset) | true | false
  per_device_batch: int = 16
  shard_size: int = 0                 # 0: per_device_batch
  vae: str = ""
  npz: str = ""
  samples_npz: str = ""               # score an existing .npz instead of sampling
  verify_shards: bool = True
  features: str = "inception"         # inception | digits | none
  inception_weights: str = ""
  inception_mode: str = "adm"
  digits_classifier: str = ""
  reference: str = ""
  feature_batch: int = 64             # per device
  is_splits: int = 0                  # 0: ADM's fixed is_split_size rows per split
  is_split_size: int = 5000           # ADM: 5,000 (10 splits for 50K)
  pr_k: int = 3
  pr_half: bool = True                # ADM's float16 distances
  progress: bool = True

  def sampler_overrides(self) -> dict:
    kw = dict(sampler=self.sampler or None, num_steps=self.num_steps or None,
              cfg_scale=self.cfg_scale, global_cfg_scale=self.global_cfg_scale)
    if self.guidance_interval:
      lo, hi = (float(v) for v in self.guidance_interval.split(","))
      kw["interval"] = (lo, hi)
    if self.vae_cfg:
      if self.vae_cfg not in ("true", "false"):
        raise ValueError(f"--vae_cfg {self.vae_cfg!r}: true or false")
      kw["vae_cfg"] = self.vae_cfg == "true"
    return kw


def resolve_preset(stored, opts: EvalOptions):
  base = stored
  if opts.preset:
    if opts.preset not in presets.PRESETS:
      raise ValueError(f"--preset {opts.preset!r}: one of {sorted(presets.PRESETS)}")
    base = presets.PRESETS[opts.preset]
  return base.replace(**opts.sampler_overrides())


def first_stage_config(meta: dict, opts: EvalOptions, config=None) -> dict:
  """The checkpoint's first stage (``--vae`` sets or overrides the VAE path)."""
  fs = dict(meta.get("first_stage") or {})
  if not fs and config is not None:
    for holder in (config, config.get("train") or {}):
      if holder.get("first_stage"):
        fs = dict(holder["first_stage"])
        break
  if not fs:
    fs = {"name": "vae", "path": "", "scale": 0.18215, "shift": 0.0}
  if opts.vae:
    if fs.get("name", "vae") != "vae":
      raise ValueError(f"--vae given but the checkpoint's first stage is {fs['name']!r}")
    fs["name"], fs["path"] = "vae", opts.vae
  if fs.get("name", "pixel") == "vae" and not fs.get("path"):
    raise ValueError("the checkpoint decodes with the SD-VAE but no weights path is "
                     "stored; pass --vae=PATH (diffusers directory or converted .npz)")
  return fs


def default_out_dir(checkpoint: str, step: int, preset, opts: EvalOptions) -> str:
  ck = os.path.abspath(checkpoint)
  root = (os.path.join(ck, "eval") if os.path.isdir(os.path.join(ck, "checkpoints"))
          else os.path.join(os.path.dirname(ck), "eval")
          if os.path.basename(ck) == "checkpoints" else ck + "_eval")
  guided = preset.cfg_scale > 1                     # the official rule (guidance.py)
  guide = f"cfg{preset.cfg_scale:g}" + (
      f"-{preset.interval[0]:g}-{preset.interval[1]:g}" if guided else "") + (
      "-vaecfg" if guided and preset.vae_cfg else "")
  tag = (f"step{step}-{preset.sampler}{preset.num_steps}-{guide}-{opts.labels}"
         f"-seed{opts.seed}-n{opts.num_samples}" + ("" if opts.use_ema else "-raw"))
  return os.path.join(root, tag)


def make_feature_net(opts: EvalOptions, image_size: int):
  if opts.features == "inception":
    return features.inception(opts.inception_weights, mode=opts.inception_mode)
  if opts.features == "digits":
    path = opts.digits_classifier or os.path.join(
        os.environ.get("GLUE_JAX_CACHE", os.path.expanduser("~/.cache/glue_jax")),
        f"digits_classifier_{image_size}px_seed0.npz")
    return digits_classifier.load_or_train(path, image_size=image_size).feature_net()
  raise ValueError(f"--features {opts.features!r}: inception, digits or none")


def sample(opts: EvalOptions, config=None, *, model=None, mesh=None,
           on_shard=None) -> dict:
  """Samples into the shard store and assembles the ``.npz``; returns facts."""
  if model is None:
    model = api.load_model(opts.checkpoint, use_ema=opts.use_ema,
                           step=None if opts.step < 0 else opts.step)
  preset = resolve_preset(model.preset, opts)
  fs_cfg = first_stage_config(model.meta, opts, config)
  fs = first_stage_lib.build(fs_cfg)
  out_dir = opts.out_dir or default_out_dir(opts.checkpoint, model.step, preset, opts)
  sampler = generate.ShardedSampler(model, fs, preset, seed=opts.seed,
                                    label_mode=opts.labels, mesh=mesh,
                                    per_device_batch=opts.per_device_batch)
  layout = sample_store.ShardLayout(opts.num_samples, opts.shard_size or opts.per_device_batch)
  manifest = {
      "checkpoint_step": model.step, "use_ema": opts.use_ema,
      "network": model.meta["network"], "preset": preset.to_dict(), "seed": opts.seed,
      "labels": opts.labels, "image_shape": list(sampler.image_shape),
      "first_stage": {k: v for k, v in fs_cfg.items() if k != "path"},
      "noise": "samplers.per_sample_keys(seed, i)"}
  store = sample_store.SampleStore(os.path.join(out_dir, "shards"), layout, manifest,
                                   expected_labels=sampler.expected_labels)
  logging.info("sampling %d images %s with %s into %s", opts.num_samples,
               sampler.image_shape, preset, out_dir)
  stats = generate.generate(sampler, store, verify=opts.verify_shards, on_shard=on_shard,
                            progress=opts.progress)
  n, h, w, c = (opts.num_samples,) + sampler.image_shape
  npz_path = opts.npz or os.path.join(out_dir, f"samples_{n}x{h}x{w}x{c}.npz")
  if jax.process_index() == 0:
    store.assemble_npz(npz_path)
    grid = np.concatenate([img for img, _ in _take(store.iter_shards(), 64)])
    writers.save_png(os.path.join(out_dir, "samples.png"),
                     writers.image_grid(grid, ncols=8), scale=max(1, 128 // h))
  generate._sync("npz_written")
  return {"out_dir": out_dir, "npz": npz_path, "checkpoint_step": model.step,
          "preset": preset.to_dict(), "num_samples": n, "image_shape": [h, w, c],
          "labels": opts.labels, "label_counts": generate.label_counts(
              sampler.expected_labels(np.arange(n)), sampler.num_classes),
          "seed": opts.seed, "sampling": stats, "first_stage": fs_cfg.get("name")}


def _take(shards, n):
  got = 0
  for images, labels in shards:
    if got >= n:
      return
    yield images[:n - got], labels[:n - got]
    got += len(images[:n - got])


def score(npz_path: str, opts: EvalOptions, *, feature_net=None, mesh=None) -> dict:
  """Features of the samples in ``npz_path`` and their metrics."""
  shape, dtype = sample_store.npz_array_info(npz_path, "arr_0")
  if len(shape) != 4 or dtype != np.uint8:
    raise ValueError(f"{npz_path}: arr_0 is {dtype} {shape}, want uint8 NHWC")
  net = feature_net or make_feature_net(opts, int(shape[1]))
  extractor = features.Extractor(net, mesh, opts.feature_batch)
  ref = None
  if opts.reference:
    ref = reference.load(opts.reference)
    reference.check_tag(ref, net.tag)
  t0 = time.perf_counter()
  show = opts.progress and _is_main()
  with tqdm(total=shape[0], unit="img", desc="sample features", disable=not show) as bar:
    feats = extractor(sample_store.iter_npz_batches(npz_path, "arr_0", 500), progress=bar)
  result = {"feature_net": net.tag, "num_scored": int(shape[0]),
            "feature_seconds": time.perf_counter() - t0}
  if ref is not None:
    with tqdm(total=ref.num_images or 0, unit="img", desc="reference features",
              disable=not show or ref.pool is not None) as bar:
      ref = reference.complete(ref, extractor, progress=bar)
    result["reference"] = os.path.abspath(opts.reference)
  result.update(metrics.all_metrics(feats, ref, num_splits=opts.is_splits or None,
                                    split_size=opts.is_split_size, k=opts.pr_k,
                                    half=opts.pr_half))
  if "inception_score" in result:
    result["inception_score_splits"] = (
        f"{opts.is_splits} splits of ceil(N/{opts.is_splits}) rows" if opts.is_splits
        else f"splits of {opts.is_split_size} rows (ADM)")
  if ref is not None and ref.pool is not None:
    result["pr_reference_size"] = int(len(ref.pool))
  labels = _npz_labels(npz_path)
  if labels is not None and "logits" in feats and net.tag.startswith("digits"):
    ok = labels < feats["logits"].shape[1]
    if ok.any():
      result["sample_class_accuracy"] = float(
          (feats["logits"][ok].argmax(-1) == labels[ok]).mean())
  return result


def _npz_labels(path: str):
  with np.load(path) as f:
    return np.asarray(f["arr_1"]) if "arr_1" in f.files else None


def _is_main() -> bool:
  return jax.process_index() == 0


def evaluate(opts: EvalOptions, config=None) -> dict:
  """Samples (unless ``samples_npz``), scores, and writes ``metrics.json``."""
  sharding.maybe_initialize_distributed()
  if opts.samples_npz:
    result = {"npz": os.path.abspath(opts.samples_npz)}
    out_dir = opts.out_dir or os.path.dirname(os.path.abspath(opts.samples_npz))
    npz_path = opts.samples_npz
  else:
    if not opts.checkpoint:
      raise ValueError("--checkpoint (or --samples_npz) is required")
    result = sample(opts, config)
    out_dir, npz_path = result["out_dir"], result["npz"]
  if opts.features != "none":
    result.update(score(npz_path, opts))
  result["options"] = dataclasses.asdict(opts)
  if _is_main():
    writers.save_json(os.path.join(out_dir, "metrics.json"), result)
  logging.info("evaluation: %s", json.dumps(
      {k: v for k, v in result.items() if k != "options"}, default=float))
  return result


def options_from(config, **overrides) -> EvalOptions:
  """EvalOptions from a config's ``eval`` section (or top level)."""
  section = config.get("eval", config) if config is not None else {}
  known = {f.name for f in dataclasses.fields(EvalOptions)}
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(section).items()
        if k in known}
  kw.update(overrides)
  return EvalOptions(**kw)


def run(config, workdir: str) -> dict:
  """``python -m glue_jax.main`` entry for ``config.kind == 'evaluate'``."""
  return evaluate(options_from(config, out_dir=workdir), config)


# ------------------------------------------------------------------------- CLI

def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, "optional config file[:args]; its "
                                    "'eval' section gives flag defaults", lock_config=False)
  helps = {
      "checkpoint": "checkpoint directory (run workdir, its checkpoints/, or an import)",
      "out_dir": "shards, npz, metrics.json (default: <workdir>/eval/<tag>, or "
                 "<checkpoint>_eval/<tag> for an imported checkpoint)",
      "step": "checkpoint step (-1: latest)",
      "use_ema": "sample with the EMA weights",
      "labels": "class labels: random (official: uniform, i.i.d.), balanced "
                "(i % C: N/C per class, 50 for 50K ImageNet) or null",
      "preset": "sampler preset name replacing the checkpoint's",
      "guidance_interval": "CFG interval 'lo,hi' in t (t=1 noise)",
      "vae_cfg": "'true': REGLUE's VAE-only CFG (latent channels only); '' keeps the preset's",
      "is_splits": "Inception Score splits of ceil(N/S) rows (0: ADM's fixed-size splits)",
      "is_split_size": "rows per Inception Score split when is_splits is 0 (ADM: 5000)",
      "per_device_batch": "samples per device per step",
      "shard_size": "samples per shard file (0: per_device_batch; fixed per run)",
      "vae": "SD-VAE weights (when the checkpoint stores none, or to override)",
      "npz": "output .npz path",
      "samples_npz": "score this .npz instead of sampling",
      "features": "inception | digits | none",
      "inception_mode": "adm (TF graph preprocessing) | pytorch_fid",
      "digits_classifier": "digits classifier cache file (trained if absent)",
      "reference": "reference batch .npz (ADM or glue_jax.tools.reference_stats)",
      "feature_batch": "feature-extraction images per device",
      "pr_half": "float16 distances in precision/recall (as ADM)",
  }
  for f in dataclasses.fields(EvalOptions):
    if f.name in flags.FLAGS:
      continue                       # defined by an earlier call
    default, help_ = f.default, helps.get(f.name, f.name.replace("_", " "))
    if isinstance(default, bool):
      flags.DEFINE_boolean(f.name, default, help_)
    elif f.name in ("cfg_scale", "global_cfg_scale"):
      flags.DEFINE_float(f.name, None, help_)
    elif isinstance(default, int):
      flags.DEFINE_integer(f.name, default, help_)
    elif isinstance(default, float):
      flags.DEFINE_float(f.name, default, help_)
    else:
      flags.DEFINE_string(f.name, default, help_)
  return flags.FLAGS


def main(argv=None):
  from absl import app
  flags_ = _define_flags()

  def _main(_):
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
    config = flags_.config
    given = {f.name: flags_[f.name].value for f in dataclasses.fields(EvalOptions)
             if flags_[f.name].present}
    opts = options_from(config, **given) if config is not None else EvalOptions(
        **{f.name: flags_[f.name].value for f in dataclasses.fields(EvalOptions)})
    try:
      result = evaluate(opts, config)
    except ckpt_lib.CheckpointError as e:
      sys.stderr.write(f"glue_jax.evaluate: error: {e}\n")
      sys.exit(1)
    print(json.dumps({k: v for k, v in result.items() if k != "options"},
                     indent=2, default=float))
  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
