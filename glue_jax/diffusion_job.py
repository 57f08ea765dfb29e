"""The diffusion job (SiT / REPA / REG / ReDi / REGLUE) for the one trainer.

``train(config, workdir)`` is what ``python -m glue_jax.main`` runs for
``config.kind == 'diffusion'``: it builds the SiT network, the method's loss
(``glue_jax.transport.objective``), the data source (feature store, npz, or
images with online DINOv2 features) and a sample-grid hook, and hands them
to ``glue_jax.train.trainer.train`` (sharding, Grain input, Orbax resume,
SIGTERM, non-finite guard, progress).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax import methods as methods_lib
from glue_jax import models
from glue_jax.data import sources
from glue_jax.models import first_stage as first_stage_lib
from glue_jax.models import semantic_encoder, sit
from glue_jax.sampling import presets, sample_from_keys
from glue_jax import sharding
from glue_jax.train import trainer, writers
from glue_jax.train import step as step_lib
from glue_jax.transport import losses, objective

ConfigMismatchError = trainer.ConfigMismatchError
NonFiniteLossError = trainer.NonFiniteLossError

_FEATURE_KEYS = ("semantic", "cls", "align_target")


@dataclasses.dataclass
class Run:
  """Everything built from a config (used by the trainer, tests and benchmarks)."""
  config: object
  mesh: object
  rules: tuple
  method: methods_lib.Method
  net_cfg: sit.SiTConfig
  graphdef: object
  tx: object
  step_cfg: objective.StepConfig
  state_shardings: object
  batch_shardings: dict
  source: object
  meta: dict
  features: tuple | None = None   # online features: (graphdef, arrays) of the frozen encoder
  batch_spec: dict | None = None  # {key: (global shape, dtype)} of one global batch
  job: trainer.Job | None = None
  setup: trainer.Setup | None = None


def build(config, *, devices=None, example_spec: dict | None = None) -> Run:
  """Builds the job, mesh, network config, optimizer and shardings (no arrays).

  ``devices`` (default: all) and ``example_spec`` (``{key: (shape, dtype)}`` of
  one example; default: read off the data source, which is then not built)
  let ``glue_jax.train.aot`` compile the step for devices that are not present.
  """
  method = methods_lib.get(config.method, **dict(config.method_overrides))
  source = None
  if example_spec is None:
    source = sources.build(config.data, split="train")
    spec = trainer.example_spec(source)
  else:
    spec = dict(example_spec)
  latent_key = "latent_moments" if "latent_moments" in spec else "latents"
  lh, _, lc = spec[latent_key][0]
  if latent_key == "latent_moments":
    lc //= 2
  enc_dim = (spec["cls"][0][-1] if "cls" in spec else
             spec["align_target"][0][-1] if "align_target" in spec else 0)
  features = None
  if config.features.mode == "online":
    if "image" not in spec:
      raise KeyError(f"features.mode='online' needs images in the data source "
                     f"{config.data.path or config.data.name}; it has {sorted(spec)}")
    sem = semantic_encoder.from_config(config.features)
    enc_dim = sem.vit.cfg.dim
    gd_f, arrays_f = nnx.split(sem)
    features = (gd_f, nnx.to_pure_dict(arrays_f))
    spec = {k: v for k, v in spec.items() if k not in _FEATURE_KEYS}
  elif config.features.mode != "precomputed":
    raise ValueError(f"features.mode={config.features.mode!r}: precomputed | online")
  net_over = dict(config.model.overrides)
  net_over.update(method.network_overrides(encoder_dim=enc_dim))
  net_over.update(input_size=lh, latent_channels=lc, num_classes=config.data.num_classes)
  net_cfg = sit.config_for(config.model.arch, **net_over)
  loss_cfg = losses.LossConfig(
      interpolant=config.loss.interpolant, latent_channels=lc,
      semantic_weight_schedule=tuple(tuple(x) for x in config.loss.semantic_weight_schedule),
      **method.loss_overrides())
  tc = config.train
  step_cfg = objective.StepConfig(
      method=method, loss=loss_cfg, time_dist=config.loss.time_dist,
      latent_scale=config.first_stage.scale, latent_shift=config.first_stage["shift"],
      ema_decay=tc.ema_decay, ema_warmup=tc.ema_warmup)
  tx = step_lib.make_optimizer(**dict(config.optim))
  graphdef = nnx.graphdef(models.build("sit", net_cfg, abstract=True))
  meta = {"network": {"name": "sit", "config": dataclasses.asdict(net_cfg)},
          "method": dataclasses.asdict(method),
          "sampler": presets.SamplerPreset.from_dict(dict(config.sampler)).to_dict(),
          "first_stage": dict(config.first_stage),
          "data": {"name": config.data.name, "num_classes": config.data.num_classes},
          "features": {"mode": "online" if features else "precomputed"}}
  features_fn = None
  aux = ()
  if features is not None:
    gd_f = features[0]
    features_fn = lambda arrays, images: nnx.merge(gd_f, arrays)(images)
    aux = (features[1],)
  job = trainer.Job(
      name="diffusion", meta=meta,
      model=lambda seed: models.build("sit", net_cfg, seed=seed),
      loss=objective.make_loss(graphdef, step_cfg, features_fn),
      source=source, tx=tx, ema_decay=tc.ema_decay, ema_warmup=tc.ema_warmup, aux=aux,
      keys=tuple(spec), summarize=objective.summarize, check=check_compatible)
  s = trainer.setup(job, config, devices=devices, spec=spec)
  return Run(config, s.mesh, s.rules, method, net_cfg, graphdef, tx, step_cfg,
             s.state_shardings, s.batch_shardings, source, meta, features, s.batch_spec,
             job, s)


def make_step(run: Run, *, aot: bool = False):
  """The jitted, sharded, donating train step ``(state, batch, key)`` (online
  features when configured); ``aot`` compiles it ahead of time and records
  XLA's memory analysis in ``run.meta['aot']``."""
  jitted = run.setup.jit_step()
  if aot:
    jitted, run.meta["aot"] = trainer.compile_step(run.setup, jitted)
  aux = tuple(jax.device_put(a, sharding.replicated(run.mesh)) for a in run.job.aux)
  return lambda state, batch, key: jitted(state, batch, key, *aux)


def init_params(run: Run, seed: int) -> dict:
  make = lambda: nnx.to_pure_dict(nnx.state(models.build("sit", run.net_cfg, seed=seed)))
  return jax.jit(make, out_shardings=run.state_shardings["params"])()


def check_compatible(saved: dict, meta: dict, where: str) -> None:
  """Network config and method must match the checkpoint.  Execution details
  (dtype, attention, scan, remat) may change between runs, and a SiTConfig
  field newer than the checkpoint is fine at its default."""
  diffs = []
  a, b = saved.get("network", {}), meta["network"]
  if a.get("name") != b["name"]:
    diffs.append(f"network: {a.get('name')} != {b['name']}")
  defaults = {f.name: f.default for f in dataclasses.fields(sit.SiTConfig)}
  for k, v in b["config"].items():
    if k in ("dtype", "attention_impl", "scan_layers", "remat"):
      continue
    if k not in a.get("config", {}) and v == defaults.get(k, object()):
      continue
    if a.get("config", {}).get(k) != v and not (
        isinstance(v, (list, tuple)) and list(a.get("config", {}).get(k, [])) == list(v)):
      diffs.append(f"network.{k}: checkpoint {a.get('config', {}).get(k)!r} != config {v!r}")
  if saved.get("method", {}).get("name") != meta["method"]["name"]:
    diffs.append(f"method: checkpoint {saved.get('method', {}).get('name')!r} "
                 f"!= config {meta['method']['name']!r}")
  if diffs:
    raise ConfigMismatchError(f"{where}: config does not match the checkpoint:\n  "
                              + "\n  ".join(diffs))


def sample_grid_hook(run: Run, config) -> trainer.Hook | None:
  """Every ``train.sample_every`` steps: EMA samples with the config's preset,
  decoded by the first stage, written as ``samples/step_*.png`` and to clu."""
  tc = config.train
  if not tc.sample_every:
    return None
  fs = first_stage_lib.build(dict(config.first_stage))
  preset = presets.SamplerPreset.from_dict(dict(config.sampler))
  preset = preset.replace(num_steps=tc.sample_steps or preset.num_steps)
  n, cfg = tc.num_grid_samples, run.net_cfg
  labels = jnp.arange(n) % max(cfg.num_classes, 1)
  sample = jax.jit(lambda params: sample_from_keys.sample_network(
      run.graphdef, params, cfg, preset, labels, jnp.arange(n), config.seed + 1)[0]
      [..., :cfg.latent_channels])

  def fn(ctx: trainer.HookContext):
    imgs = np.asarray(jax.device_get(fs.decode_uint8(sample(ctx.state["ema"]))))
    grid = writers.image_grid(imgs)
    writers.save_png(os.path.join(ctx.workdir, "samples", f"step_{ctx.step:07d}.png"), grid,
                     scale=2)
    ctx.writer.write_images(ctx.step, {"samples": grid[None]})
  return trainer.Hook(tc.sample_every, fn)


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the diffusion model; returns the last logged metrics."""
  r = build(config)
  hook = sample_grid_hook(r, config)
  r.setup.job = dataclasses.replace(r.job, hooks=(hook,) if hook else ())
  return trainer.train(r.setup.job, config, workdir, prebuilt=r.setup)
