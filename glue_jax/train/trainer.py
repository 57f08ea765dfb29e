"""The one trainer: every training job of glue_jax runs through :func:`train`.

A job (:class:`Job`) is a network builder, a pure loss, an optimizer, a
random-access data source and the metadata its checkpoints carry; the
diffusion families, the semantic compressor, the LA-INR tasks, GLoD's scenes
generator and the demo's stages are all jobs.  The trainer gives each of them:

- a device mesh and shardings from the config (``config.mesh``,
  ``config.sharding_rules``; parameters by their logical axis names, the
  batch over every device of every process);
- per-process Grain input (``glue_jax.data.pipeline``) assembled into global
  batches, the step jitted with explicit shardings and the state donated;
- ahead-of-time compilation with XLA's per-device memory analysis logged at
  start-up;
- Orbax checkpoints of the state, its EMA, the Grain iterator position and
  the job's metadata (``config.checkpoint``); automatic resume from the
  newest readable step (unreadable ones are quarantined; when none is
  readable the run stops unless ``checkpoint.allow_fresh_start``); a
  config that does not match the checkpoint is a :class:`ConfigMismatchError`
  listing the fields; a finished run returns its recorded metrics;
- SIGTERM (preemption): checkpoint, then exit;
- a non-finite guard: the bad update is never applied or checkpointed, and
  the error names the step, the non-finite loss terms and the example
  indices (data positions) of that batch (``config.data.exclude`` skips them);
- progress on the console (step/total, loss, rate, ETA) and clu logging;
- periodic hooks (sample grids, validation).

Config sections read here (the same for every job): ``seed``, ``mesh``,
``sharding_rules``, ``data`` (``workers``, ``read_threads``, ``prefetch``,
``exclude``), ``train`` (``steps``, ``batch_size``, ``log_every``,
``aot_compile``, ``profile_steps``, ``transfer_guard``), ``checkpoint``
(``every``, ``keep``, ``keep_every``, ``allow_fresh_start``) and ``debug``
(fault injection for the tests).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from glue_jax import sharding
from glue_jax.data import pipeline
from glue_jax.train import checkpoint as ckpt_lib
from glue_jax.train import resume, writers
from glue_jax.train import progress as progress_lib
from glue_jax.train import step as step_lib

log = logging.getLogger("glue_jax.train")


ConfigMismatchError = resume.ConfigMismatchError
check_meta = resume.check_meta
latest_state = resume.latest_state


class NonFiniteLossError(FloatingPointError):
  """A step produced a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class Hook:
  """``fn(ctx) -> dict | None`` every ``every`` steps, at the last step and, with
  ``at_start``, before the first step of a fresh run; returned scalars are
  logged."""
  every: int
  fn: Callable[["HookContext"], dict | None]
  at_start: bool = False


@dataclasses.dataclass
class HookContext:
  step: int
  state: dict
  workdir: str
  writer: Any
  setup: "Setup"
  aux: tuple                      # the job's aux arrays, on the mesh

  @property
  def mesh(self):
    return self.setup.mesh


@dataclasses.dataclass
class Job:
  """One training job.

  Attributes:
    name: shown in progress lines and errors.
    meta: JSON-able description stored with every checkpoint; on resume it is
      compared with the checkpoint's by ``check`` (default: the ``model`` entry).
    model: ``seed -> nnx.Module``, the trained network (built abstractly for
      shapes and shardings, and once under ``jit`` to initialise).
    loss: ``loss(params, rest, batch, key, step, *aux) -> (loss, (metrics,
      rest))`` (``glue_jax.train.step.make_step``).
    source: random-access examples (dicts of arrays) read by Grain.
    tx: the optimizer (``step.make_optimizer``).
    ema_decay: keep an EMA of the parameters (checkpointed as item ``ema``).
    aux: frozen arrays passed to every step, replicated (e.g. an encoder).
    keys: example keys fed to the step (default: all).
    augment: ``f(example, rng) -> example`` on the host after shuffling
      (random crops, view choices; ``pipeline.make_dataset(random_map=...)``).
    hooks: periodic :class:`Hook` s.
    summarize: host metrics of a logging window -> scalars (default: means).
    check: ``check(saved_meta, meta, where)`` raising ConfigMismatchError.
  """
  name: str
  meta: dict
  model: Callable[[int], nnx.Module]
  loss: Callable
  source: Sequence
  tx: Any
  ema_decay: float | None = None
  ema_warmup: bool = False
  aux: tuple = ()
  keys: tuple | None = None
  augment: Callable | None = None
  hooks: tuple = ()
  summarize: Callable[[list], dict] | None = None
  check: Callable[[dict, dict, str], None] | None = None


# -- build: mesh, shardings, state, step ---------------------------------------
@dataclasses.dataclass
class Setup:
  """Mesh, shardings and the jitted step of a job (used by the loop and tests)."""
  job: Job
  mesh: Any
  rules: tuple
  state_shardings: Any
  batch_shardings: dict
  batch_spec: dict             # {key: (global shape, dtype)}
  step_fn: Callable            # pure
  has_rest: bool

  def _fresh_state(self, seed: int) -> dict:
    """The state of ``job.model(seed)`` (traced by :meth:`init_state` and
    :meth:`abstract_state`)."""
    m = self.job.model(seed)
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    rest = nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param))) if self.has_rest else None
    return step_lib.init_state(params, self.job.tx, ema=self.job.ema_decay is not None,
                               rest=rest)

  def init_state(self, seed: int) -> dict:
    """A fresh sharded state (parameters from ``job.model(seed)``)."""
    with jax.set_mesh(self.mesh):
      return jax.jit(lambda: self._fresh_state(seed), out_shardings=self.state_shardings)()

  def abstract_state(self):
    shapes = jax.eval_shape(lambda: self._fresh_state(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def jit_step(self):
    """The sharded, donating step ``(state, batch, key, *aux)``."""
    rep = sharding.replicated(self.mesh)
    aux_sh = tuple(jax.tree.map(lambda _: rep, a) for a in self.job.aux)
    return jax.jit(self.step_fn,
                   in_shardings=(self.state_shardings, self.batch_shardings, rep) + aux_sh,
                   out_shardings=(self.state_shardings, rep), donate_argnums=(0,))


def rules_of(config) -> tuple:
  return tuple(tuple(r) for r in config.sharding_rules)


def example_spec(source, keys=None, augment=None) -> dict:
  """``{key: (shape, dtype)}`` of one example (after ``augment``)."""
  ex = source[0]
  if ex is None:
    raise ValueError(f"{getattr(source, 'name', 'source')}: example 0 is unreadable")
  if augment is not None:
    ex = augment(ex, np.random.default_rng(0))
  return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in ex.items()
          if keys is None or k in keys}


def setup(job: Job, config, *, devices=None, spec: dict | None = None) -> Setup:
  """Builds the mesh, the state and batch shardings and the step of ``job``.

  ``devices`` and ``spec`` (``{key: (shape, dtype)}`` of one example) let the
  step be compiled ahead of time for devices that are not present.
  """
  mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
  rules = rules_of(config)
  abstract = nnx.eval_shape(lambda: job.model(0))
  p_abs = nnx.state(abstract, nnx.Param)
  r_abs = nnx.state(abstract, nnx.Not(nnx.Param))
  has_rest = bool(jax.tree.leaves(nnx.to_pure_dict(r_abs)))
  psh = sharding.pure_param_shardings(p_abs, mesh, rules)
  with_sh = lambda tree, sh: jax.tree.map(
      lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), tree, sh)
  abs_p = with_sh(nnx.to_pure_dict(p_abs), psh)
  abs_r = None
  if has_rest:
    abs_r = with_sh(nnx.to_pure_dict(r_abs), sharding.pure_param_shardings(r_abs, mesh, rules))
  ema = job.ema_decay is not None
  with jax.set_mesh(mesh):
    ssh = jax.jit(lambda p, r: step_lib.init_state(p, job.tx, ema=ema, rest=r)).lower(
        abs_p, abs_r).compile().output_shardings
  spec = spec if spec is not None else example_spec(job.source, job.keys, job.augment)
  bsh = sharding.batch_shardings({k: len(s) + 1 for k, (s, _) in spec.items()}, mesh, rules)
  batch = config.train.batch_size
  global_spec = {k: ((batch,) + tuple(s), d) for k, (s, d) in spec.items()}
  fn = step_lib.make_step(job.loss, job.tx, ema_decay=job.ema_decay, ema_warmup=job.ema_warmup)
  return Setup(job, mesh, rules, ssh, bsh, global_spec, fn, has_rest)


def compile_step(s: Setup, jitted) -> tuple[Any, dict]:
  """AOT-compiles the jitted step on abstract inputs; returns it and XLA's
  per-device memory and cost analysis (an out-of-memory config fails here)."""
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=s.batch_shardings[k])
           for k, (shape, dtype) in s.batch_spec.items()}
  t0 = time.time()
  compiled = jitted.lower(s.abstract_state(), batch, jax.random.key(0), *s.job.aux).compile()
  report = {"compile_seconds": round(time.time() - t0, 2)}
  mem = compiled.memory_analysis()
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
               "generated_code_size_in_bytes"):
    if mem is not None and hasattr(mem, name):
      report[name.replace("_in_bytes", "_gib")] = round(getattr(mem, name) / 2**30, 4)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if isinstance(cost, dict) and "flops" in cost:
    report["tflops_per_step_per_device"] = round(float(cost["flops"]) / 1e12, 4)
  log.info("%s step compiled (AOT, per device): %s", s.job.name, report)
  return compiled, report


# -- the loop ------------------------------------------------------------------
class _ExcludeSource(Sequence):
  """A source that returns None for excluded example indices (dropped before
  batching by the pipeline)."""

  def __init__(self, source, exclude):
    self.source, self.exclude = source, frozenset(int(i) for i in exclude)
    self.name = getattr(source, "name", "source")

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return None if int(i) in self.exclude else self.source[i]


def make_dataset(job: Job, config):
  """The per-process Grain iterator of ``job.source`` (with example indices)."""
  dc = config.data
  exclude = tuple(dc.exclude or ())
  source = _ExcludeSource(job.source, exclude) if exclude else job.source
  n = jax.process_count()
  if config.train.batch_size % n:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by the "
                     f"{n} processes")
  return pipeline.make_dataset(
      source, batch_size=config.train.batch_size // n, seed=config.seed,
      process_index=jax.process_index(), process_count=n, with_index=True,
      filter_none=bool(exclude), random_map=_keep_index(job.augment),
      worker_count=dc.workers,
      read_threads=dc.read_threads, prefetch_buffer_size=dc.prefetch)


def _keep_index(augment):
  """``augment`` that carries the example's ``index`` through."""
  if augment is None:
    return None

  def f(ex, rng):
    ex = dict(ex)
    index = ex.pop("index")
    return {**augment(ex, rng), "index": index}
  return f


def train(job: Job, config, workdir: str, *, prebuilt: Setup | None = None) -> dict:
  """Trains ``job`` (or resumes it) in ``workdir``; returns the last logged
  metrics plus ``step``, ``steps_per_sec`` and the AOT report.

  The workdir is locked for the run (a second run on it fails with
  ``WorkdirInUseError``).  ``prebuilt``: the job's :func:`setup`, when the
  caller built it already.
  """
  sharding.maybe_initialize_distributed(config.train.distributed)
  if "://" in workdir:
    raise ValueError(f"--workdir={workdir}: URLs are not supported; give a file path "
                     "(local disk, NFS, or a gcsfuse mount such as /mnt/gcs/run)")
  os.makedirs(workdir, exist_ok=True)
  with ckpt_lib.WorkdirLock(workdir, jax.process_index()):
    return _train_locked(job, config, workdir, prebuilt)


def _train_locked(job: Job, config, workdir: str, prebuilt: Setup | None) -> dict:
  cc = config.checkpoint
  total = int(config.train.steps)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cc.keep,
                             keep_every=cc.keep_every or None)
  s = prebuilt or setup(job, config)
  data_iter = iter(make_dataset(job, config))
  try:
    with jax.set_mesh(s.mesh), sharding.logical_rules(s.rules, s.mesh):
      state, saved = resume.restore_latest(s, ck, data_iter,
                                    allow_fresh_start=cc.allow_fresh_start)
      if state is not None and int(jax.device_get(state["step"])) >= total:
        out = dict((saved or {}).get("last_metrics") or {})
        out["step"] = int(jax.device_get(state["step"]))
        out["hook_history"] = list((saved or {}).get("hook_history") or [])
        log.info("%s: already finished (%d/%d steps); returning its recorded metrics",
                 job.name, out["step"], total)
        return out
      fresh = state is None
      history = [] if fresh else list((saved or {}).get("hook_history") or [])
      if fresh:
        state = s.init_state(config.seed)
      rep = sharding.replicated(s.mesh)
      base_key = jax.device_put(jax.random.key(config.seed), rep)
      aux = tuple(jax.device_put(a, rep) for a in job.aux)
      step_fn = s.jit_step()
      report = None
      if config.train.aot_compile:
        step_fn, report = compile_step(s, step_fn)
      return _loop(s, config, workdir, ck, data_iter, state, step_fn, base_key, aux,
                   fresh, report, history)
  finally:
    ck.close()


def _loop(s: Setup, config, workdir, ck, data_iter, state, step_fn, base_key, aux, fresh,
          report, history) -> dict:
  job, tc, dbg = s.job, config.train, config.debug
  writer = writers.create_writer(workdir)
  total = int(tc.steps)
  step = start = int(jax.device_get(state["step"]))
  progress = progress_lib.Progress(job.name, total, start, tc.batch_size)
  summarize = job.summarize or _mean_scalars
  ckpt_every, log_every = int(config.checkpoint.every), int(tc.log_every)
  kill_env = _kill_hook()
  preempted = {"flag": False}
  old = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
  window, indices, last = [], {}, {}
  t0 = time.time()

  def run_hooks(at: int, first: bool = False):
    out = {}
    for h in job.hooks:
      due = h.every and (at % h.every == 0 or at == total)
      if (first and h.at_start) or (not first and due):
        r = h.fn(HookContext(at, state, workdir, writer, s, aux))
        if r:
          out.update(r)
    if out:
      writer.write_scalars(at, out)
      history.append({"step": at, **{k: float(v) for k, v in out.items()}})
    return out

  try:
    if fresh:
      last.update(run_hooks(step, first=True))
    while step < total:
      local = next(data_iter)
      idx = np.asarray(local.pop("index"))
      if job.keys is not None:
        local = {k: v for k, v in local.items() if k in job.keys}
      batch = sharding.global_batch(local, s.batch_shardings)
      _profile(tc, workdir, step)
      with jax.transfer_guard(tc.transfer_guard):
        state, metrics = step_fn(state, batch, base_key, *aux)
      step += 1
      _inject(dbg, "kill_at_step", step, signal.SIGKILL)
      _inject(dbg, "sigterm_at_step", step, signal.SIGTERM)
      if kill_env == (job.name, step):           # test hook: GLUE_JAX_TEST_KILL_AT
        ck.wait()      # the previous checkpoint has committed: die between two of them
        os.kill(os.getpid(), signal.SIGKILL)
      window.append(metrics)
      indices[step - 1] = idx
      stop = preempted["flag"] or ck.reached_preemption(step)
      if step % log_every == 0 or step == total or stop:
        last = _log(job, writer, step, window, indices, state, summarize)
        log.info("%s", progress.line(step, last))
        window, indices = [], {}
      # Hooks before the checkpoint: it records their results (hook_history,
      # last_metrics), so a run resumed from this step keeps them.
      last.update(run_hooks(step))
      if step % ckpt_every == 0 or step == total or stop:
        _check_finite(job, state, window, indices)
        items = {"state": resume.without_ema(state)}
        if "ema" in state:
          items["ema"] = state["ema"]
        ck.save(step, config=dict(job.meta, last_metrics=last, hook_history=history),
                data_iter=data_iter, **items)
        if step == dbg.kill_during_checkpoint:
          os.kill(os.getpid(), signal.SIGKILL)   # fault injection: async write in flight
        if step == dbg.kill_after_checkpoint:
          ck.wait()
          os.kill(os.getpid(), signal.SIGKILL)   # fault injection: die once committed
      if stop:
        log.warning("%s: preemption signal: checkpointed step %d and exiting", job.name, step)
        break
  finally:
    ck.wait()
    writer.flush()
    if old is not None:
      signal.signal(signal.SIGTERM, old)
  last["steps_per_sec"] = (step - start) / max(time.time() - t0, 1e-9)
  last["step"] = step
  last["hook_history"] = history
  if report is not None:
    last["aot"] = report
  return last


def _kill_hook():
  """``GLUE_JAX_TEST_KILL_AT='<job name>:<step>'`` (tests only): SIGKILL after
  that step of that job, once the previous (asynchronous) checkpoint has
  committed, for jobs whose config the test cannot reach (the demo's stages);
  ``config.debug`` injects faults through a job's own config."""
  spec = os.environ.get("GLUE_JAX_TEST_KILL_AT", "")
  if not spec:
    return None
  name, _, step = spec.rpartition(":")
  return name, int(step)


def _inject(dbg, name: str, step: int, sig) -> None:
  if step == dbg[name]:
    os.kill(os.getpid(), sig)


def _mean_scalars(window: list[dict]) -> dict:
  return {k: float(np.mean([m[k] for m in window])) for k in window[0]
          if np.ndim(window[0][k]) == 0}


def _log(job, writer, step, window, indices, state, summarize) -> dict:
  _check_finite(job, state, window, indices)
  out = summarize(jax.device_get(window))
  writer.write_scalars(step, out)
  return out


def _check_finite(job: Job, state, window=(), indices=None) -> None:
  bad = int(jax.device_get(state["bad_step"]))
  if bad < 0:
    return
  msg = f"{job.name}: non-finite loss or gradient at step {bad}"
  first = indices and min(indices)
  if indices and bad in indices:
    m = jax.device_get(window[bad - first]) if 0 <= bad - first < len(window) else {}
    terms = sorted(k for k, v in m.items() if np.ndim(v) == 0 and not np.isfinite(v))
    if terms:
      msg += f" (non-finite: {', '.join(terms)})"
    ex = np.asarray(indices[bad]).tolist()
    msg += (f"; example indices (data positions) of that batch on process "
            f"{jax.process_index()}: {ex}; to skip bad records set "
            f"--config.data.exclude='({', '.join(map(str, ex))},)' (or the offending subset)")
  raise NonFiniteLossError(msg + "; stopped without checkpointing this state")


def _profile(tc, workdir: str, step: int) -> None:
  """Traces steps ``[start, stop)`` of ``train.profile_steps`` to ``<workdir>/profile``."""
  window = tc.profile_steps or ()
  if len(window) != 2:
    return
  start, stop = (int(x) for x in window)
  if step == start:
    jax.profiler.start_trace(os.path.join(workdir, "profile"))
  elif step == stop:
    jax.profiler.stop_trace()
    log.info("profiler trace of steps [%d, %d) written to %s/profile", start, stop, workdir)
