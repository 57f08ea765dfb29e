"""The diffusion training loop: mesh, sharded init, jitted step, Orbax resume.

``train(config, workdir)`` is what ``python -m glue_jax.main`` runs for the
diffusion families (sit/repa/reg/redi/reglue).  It resumes automatically from
the latest finished checkpoint in ``<workdir>/checkpoints`` (train state, EMA,
Grain iterator state), saves on SIGTERM before exiting, and stops on a
non-finite loss naming the step without checkpointing the bad state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax import methods as methods_lib
from glue_jax import models, sharding
from glue_jax.data import pipeline, sources
from glue_jax.models import first_stage as first_stage_lib
from glue_jax.models import sit
from glue_jax.sampling import presets, samplers
from glue_jax.train import checkpoint as ckpt_lib
from glue_jax.train import parallel, writers
from glue_jax.train import step as step_lib
from glue_jax.transport import losses


_FEATURE_KEYS = ("semantic", "cls", "align_target")


class ConfigMismatchError(ValueError):
  """The run's config does not match the checkpoint it would resume from."""


class NonFiniteLossError(FloatingPointError):
  pass


@dataclasses.dataclass
class Run:
  """Everything built from a config (used by the loop, tests and benchmarks)."""
  config: object
  mesh: object
  rules: tuple
  method: methods_lib.Method
  net_cfg: sit.SiTConfig
  graphdef: object
  tx: object
  step_cfg: step_lib.StepConfig
  state_shardings: object
  batch_shardings: dict
  source: object
  meta: dict
  features: tuple | None = None   # online features: (graphdef, arrays) of the frozen encoder
  batch_spec: dict | None = None  # {key: (global shape, dtype)} of one global batch


def _rules(config):
  return tuple(tuple(r) for r in config.get("sharding_rules", sharding.DEFAULT_RULES))


def build(config) -> Run:
  """Builds mesh, network config, optimizer and shardings (no arrays yet)."""
  mesh = parallel.make_mesh(dict(config.mesh))
  rules = _rules(config)
  method = methods_lib.get(config.method, **dict(config.get("method_overrides", {})))
  source = sources.build(config.data, split="train")
  spec = sources.example_spec(source)
  latent_key = "latent_moments" if "latent_moments" in spec else "latents"
  lh, lw, lc = spec[latent_key][0]
  if latent_key == "latent_moments":
    lc //= 2
  enc_dim = (spec["cls"][0][-1] if "cls" in spec else
             spec["align_target"][0][-1] if "align_target" in spec else 0)
  features = None
  if config.get("features") and config.features.get("mode", "precomputed") == "online":
    if "image" not in spec:
      raise KeyError(f"features.mode='online' needs images in the data source "
                     f"{config.data.get('path') or config.data.name}; it has {sorted(spec)}")
    from glue_jax.models import semantic_encoder
    sem = semantic_encoder.from_config(config.features)
    enc_dim = sem.vit.cfg.dim
    gd_f, arrays_f = nnx.split(sem)
    features = (gd_f, nnx.to_pure_dict(arrays_f))
    spec = {k: v for k, v in spec.items() if k not in _FEATURE_KEYS}
  net_over = dict(config.model.get("overrides", {}))
  net_over.update(method.network_overrides(encoder_dim=enc_dim))
  net_over.update(input_size=lh, latent_channels=lc,
                  num_classes=config.data.num_classes)
  net_cfg = sit.config_for(config.model.arch, **net_over)
  loss_cfg = losses.LossConfig(
      interpolant=config.loss.interpolant, latent_channels=lc,
      semantic_weight_schedule=tuple(tuple(x) for x in config.loss.get(
          "semantic_weight_schedule", ())),
      **method.loss_overrides())
  step_cfg = step_lib.StepConfig(
      method=method, loss=loss_cfg, time_dist=config.loss.time_dist,
      latent_scale=config.first_stage.scale, latent_shift=config.first_stage.get("shift", 0.0),
      ema_decay=config.ema_decay, ema_warmup=config.get("ema_warmup", False))
  tx = step_lib.make_optimizer(**dict(config.optim))
  graphdef = nnx.graphdef(models.build("sit", net_cfg, abstract=True))
  batch_spec = {k: len(s[0]) + 1 for k, s in spec.items()}
  bsh = parallel.batch_shardings(batch_spec, mesh, rules)
  abstract_state = nnx.state(models.build("sit", net_cfg, abstract=True))
  psh = parallel.pure_param_shardings(abstract_state, mesh, rules)
  abs_params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            nnx.to_pure_dict(abstract_state), psh)
  with jax.set_mesh(mesh):
    ssh = jax.jit(lambda p: step_lib.init_state(p, tx)).lower(abs_params).compile() \
        .output_shardings
  meta = {"network": {"name": "sit", "config": dataclasses.asdict(net_cfg)},
          "method": dataclasses.asdict(method),
          "sampler": presets.SamplerPreset.from_dict(dict(config.sampler)).to_dict(),
          "first_stage": dict(config.first_stage),
          "data": {"name": config.data.name, "num_classes": config.data.num_classes}}
  meta["features"] = {"mode": "online" if features else "precomputed"}
  global_spec = {k: ((config.batch_size,) + tuple(shape), dtype) for k, (shape, dtype)
                 in spec.items()}
  return Run(config, mesh, rules, method, net_cfg, graphdef, tx, step_cfg, ssh, bsh,
             source, meta, features, global_spec)


def make_step(run: Run, *, aot: bool = False):
  """The jitted, sharded, donating train step ``(state, batch, key)`` (online
  features when configured).

  ``aot``: compiles ahead of time on abstract inputs and logs XLA's memory
  analysis (arguments, outputs, temporaries: what one device needs) and cost
  analysis, so an out-of-memory configuration fails at start-up.
  """
  rep = parallel.replicated(run.mesh)
  features_fn = None
  if run.features is not None:
    gd_f = run.features[0]
    features_fn = lambda aux, images: nnx.merge(gd_f, aux)(images)
  fn = step_lib.make_train_step(run.graphdef, run.tx, run.step_cfg, features_fn)
  extra_sh, extra = (), ()
  if run.features is not None:
    extra_sh, extra = (rep,), (jax.device_put(run.features[1], rep),)
  jitted = jax.jit(fn, in_shardings=(run.state_shardings, run.batch_shardings, rep) + extra_sh,
                   out_shardings=(run.state_shardings, rep), donate_argnums=(0,))
  if aot:
    jitted = _compile_and_report(run, jitted, extra)
  return lambda state, batch, key: jitted(state, batch, key, *extra)


def _compile_and_report(run: Run, jitted, extra):
  abstract = lambda tree, sh: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
  abs_params = nnx.to_pure_dict(nnx.state(models.build("sit", run.net_cfg, abstract=True)))
  state = abstract(jax.eval_shape(lambda p: step_lib.init_state(p, run.tx), abs_params),
                   run.state_shardings)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=run.batch_shardings[k])
           for k, (shape, dtype) in run.batch_spec.items()}
  t0 = time.time()
  compiled = jitted.lower(state, batch, jax.random.key(0), *extra).compile()
  mem = compiled.memory_analysis()
  report = {"compile_seconds": round(time.time() - t0, 2)}
  if mem is not None:
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes"):
      if hasattr(mem, name):
        report[name.replace("_in_bytes", "_gib")] = round(getattr(mem, name) / 2**30, 4)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if isinstance(cost, dict) and "flops" in cost:
    report["tflops_per_step_per_device"] = round(float(cost["flops"]) / 1e12, 4)
  logging.info("train step compiled (AOT, per device): %s", report)
  run.meta["aot"] = report
  return compiled


def init_params(run: Run, seed: int) -> dict:
  make = lambda: nnx.to_pure_dict(nnx.state(models.build("sit", run.net_cfg, seed=seed)))
  return jax.jit(make, out_shardings=run.state_shardings["params"])()


def check_compatible(saved: dict, meta: dict, where: str) -> None:
  diffs = []
  a, b = saved.get("network", {}), meta["network"]
  if a.get("name") != b["name"]:
    diffs.append(f"network: {a.get('name')} != {b['name']}")
  defaults = {f.name: f.default for f in dataclasses.fields(sit.SiTConfig)}
  for k, v in b["config"].items():
    if k in ("dtype", "attention_impl", "scan_layers", "remat"):
      continue        # execution details may change between runs
    if k not in a.get("config", {}) and v == defaults.get(k, object()):
      continue        # a field newer than the checkpoint, left at its default
    if a.get("config", {}).get(k) != v and not (
        isinstance(v, (list, tuple)) and list(a.get("config", {}).get(k, [])) == list(v)):
      diffs.append(f"network.{k}: checkpoint {a.get('config', {}).get(k)!r} != config {v!r}")
  if saved.get("method", {}).get("name") != meta["method"]["name"]:
    diffs.append(f"method: checkpoint {saved.get('method', {}).get('name')!r} "
                 f"!= config {meta['method']['name']!r}")
  if diffs:
    raise ConfigMismatchError(f"{where}: config does not match the checkpoint:\n  "
                              + "\n  ".join(diffs))


def _make_sampler(run: Run, num: int, seed: int):
  preset = presets.SamplerPreset.from_dict(dict(run.config.sampler))
  preset = preset.replace(num_steps=run.config.get("sample_steps") or preset.num_steps)
  cfg, graphdef = run.net_cfg, run.graphdef
  labels = jnp.arange(num) % max(cfg.num_classes, 1)
  keys = samplers.per_sample_keys(seed, jnp.arange(num))

  @jax.jit
  def sample(params):
    apply = lambda x, t, y, g: nnx.merge(graphdef, params)(x, t, y, g)
    x1, g1 = samplers.initial_noise(keys, (cfg.input_size, cfg.input_size,
                                           cfg.in_channels), cfg.global_token_dim)
    x0, _ = presets.make_sampler(apply, preset, null_label=cfg.num_classes)(
        x1, g1, labels, keys)
    return x0[..., :cfg.latent_channels]
  return sample


def train(config, workdir: str) -> dict:
  """Trains (or resumes) and returns the last logged metrics.

  The workdir is locked for the run (a second run on it fails with
  ``WorkdirInUseError``); resumption restores the newest *readable*
  checkpoint, moving unreadable ones aside (``checkpoints.quarantine/``).
  """
  parallel.maybe_initialize_distributed(config.get("distributed"))
  run = build(config)
  os.makedirs(workdir, exist_ok=True)
  with ckpt_lib.WorkdirLock(workdir, jax.process_index()):
    return _train_locked(run, config, workdir)


def _train_locked(run: Run, config, workdir: str) -> dict:
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                             keep=config.keep_checkpoints,
                             keep_every=config.get("keep_every") or None)
  fs = first_stage_lib.build(dict(config.first_stage))
  ds = pipeline.make_dataset(run.source, batch_size=config.batch_size // jax.process_count(),
                             seed=config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             worker_count=config.data.get("workers", 0),
                             read_threads=config.data.get("read_threads", 0),
                             prefetch_buffer_size=config.data.get("prefetch", 0))
  data_iter = iter(ds)
  with jax.set_mesh(run.mesh), sharding.logical_rules(run.rules, run.mesh):
    base_key = jax.device_put(jax.random.key(config.seed), parallel.replicated(run.mesh))
    state = _restore_latest_good(run, ck, data_iter)
    if state is None:
      params = init_params(run, config.seed)
      state = jax.jit(lambda p: step_lib.init_state(p, run.tx),
                      out_shardings=run.state_shardings)(params)
    step_fn = make_step(run, aot=config.get("aot_compile", True))
    return _loop(run, config, workdir, ck, fs, data_iter, state, step_fn, base_key)


def _restore_latest_good(run: Run, ck, data_iter):
  """State of the newest checkpoint that restores, or None without any.

  A config mismatch is an error (never skipped); a step whose files cannot be
  read (truncated, corrupted, partially deleted) is quarantined with the
  reason and the next older one is tried.
  """
  abs_params = nnx.to_pure_dict(nnx.state(models.build("sit", run.net_cfg, abstract=True)))
  shapes = jax.eval_shape(lambda p: step_lib.init_state(p, run.tx), abs_params)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, run.state_shardings)
  for step in sorted(ck.all_steps(), reverse=True):
    try:
      saved = ck.read_config(step)
    except Exception as e:  # noqa: BLE001 - any read failure means "unreadable"
      ck.quarantine(step, f"config unreadable: {type(e).__name__}: {e}")
      continue
    check_compatible(saved, run.meta, f"{ck.directory}/{step}")
    try:
      r = ck.restore(step, state=_without_ema(abstract), ema=abstract["ema"],
                     data_iter=data_iter)
    except Exception as e:  # noqa: BLE001
      ck.quarantine(step, f"restore failed: {type(e).__name__}: {e}")
      continue
    if int(jax.device_get(r["state"]["step"])) != step:
      ck.quarantine(step, f"state.step={int(jax.device_get(r['state']['step']))} "
                          f"in directory {step}")
      continue
    logging.info("resumed from %s/%d", ck.directory, step)
    return {**r["state"], "ema": r["ema"]}
  return None


def _loop(run, config, workdir, ck, fs, data_iter, state, step_fn, base_key):
  from clu import periodic_actions
  writer = writers.create_writer(workdir)
  total = config.total_steps
  step = start = int(jax.device_get(state["step"]))
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=config.log_every)
  sampler = _make_sampler(run, config.get("num_grid_samples", 16), config.seed + 1) \
      if config.get("sample_every") else None
  preempted = {"flag": False}
  old = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
  window, last = [], {}
  t0 = time.time()
  try:
    while step < total:
      with report.timed("data"):
        local = next(data_iter)
        if run.features is not None:   # online: stored features (if any) are not read
          local = {k: v for k, v in local.items() if k not in _FEATURE_KEYS}
        batch = parallel.global_batch(local, run.batch_shardings)
      _profile(config, workdir, step)
      with jax.transfer_guard(config.get("transfer_guard", "allow")):
        state, metrics = step_fn(state, batch, base_key)
      step += 1
      if step == config.get("fault_kill_at_step", -1):
        os.kill(os.getpid(), signal.SIGKILL)     # fault injection (tests): crash mid-run
      if step == config.get("fault_sigterm_at_step", -1):
        os.kill(os.getpid(), signal.SIGTERM)     # fault injection (tests): preemption
      window.append(metrics)
      report(step)
      stop = preempted["flag"] or ck.reached_preemption(step)
      if step % config.log_every == 0 or step == total or stop:
        last = _log(writer, step, window, state)
        window = []
      if step % config.ckpt_every == 0 or step == total or stop:
        _check_finite(state)
        ck.save(step, state=_without_ema(state), ema=state["ema"], config=run.meta,
                data_iter=data_iter)
        if step == config.get("fault_kill_during_checkpoint", -1):
          os.kill(os.getpid(), signal.SIGKILL)   # fault injection (tests): async write in flight
        if step == config.get("fault_kill_after_checkpoint", -1):
          ck.wait()      # fault injection (tests): die hard once this step is committed
          os.kill(os.getpid(), signal.SIGKILL)
      if sampler is not None and (step % config.sample_every == 0 or step == total):
        _write_grid(writer, workdir, step, fs, sampler(state["ema"]))
      if stop:
        logging.warning("preemption signal: checkpointed step %d and exiting", step)
        break
  finally:
    ck.wait()
    writer.flush()
    if old is not None:
      signal.signal(signal.SIGTERM, old)
  last["steps_per_sec"] = (step - start) / max(time.time() - t0, 1e-9)
  last["step"] = step
  if "aot" in run.meta:
    last["aot"] = run.meta["aot"]
  return last


def _profile(config, workdir: str, step: int) -> None:
  """Traces steps ``[start, stop)`` of ``config.profile_steps`` to
  ``<workdir>/profile`` (TensorBoard / Perfetto), when set."""
  window = config.get("profile_steps") or ()
  if len(window) != 2:
    return
  start, stop = (int(x) for x in window)
  if step == start:
    jax.profiler.start_trace(os.path.join(workdir, "profile"))
  elif step == stop:
    jax.profiler.stop_trace()
    logging.info("profiler trace of steps [%d, %d) written to %s/profile", start, stop, workdir)


def _without_ema(state: dict) -> dict:
  """The train state minus its EMA, which is stored once, as the 'ema' item."""
  return {k: v for k, v in state.items() if k != "ema"}


def _check_finite(state):
  bad = int(jax.device_get(state["bad_step"]))
  if bad >= 0:
    raise NonFiniteLossError(f"non-finite loss or gradient at step {bad}; "
                             "stopped without checkpointing this state")


def _log(writer, step, window, state) -> dict:
  _check_finite(state)
  host = jax.device_get(window)
  out = {}
  for k in host[0]:
    if k in ("bucket_loss_sum", "bucket_count"):
      continue
    out[k] = float(np.mean([m[k] for m in host]))
  sums = np.sum([m["bucket_loss_sum"] for m in host], axis=0)
  counts = np.sum([m["bucket_count"] for m in host], axis=0)
  for i, (s, c) in enumerate(zip(sums, counts)):
    if c:
      out[f"loss_t{i}"] = float(s / c)
  writer.write_scalars(step, out)
  return out


def _write_grid(writer, workdir, step, fs, latents):
  imgs = np.asarray(jax.device_get(fs.decode_uint8(latents)))
  grid = writers.image_grid(imgs)
  writers.save_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"), grid, scale=2)
  writer.write_images(step, {"samples": grid[None]})
