"""Orbax checkpoints of glue_jax: one thin wrapper so a move to Orbax v1 is one file.

A checkpoint step directory holds up to five items:
- ``state``: ``{'params', 'opt_state', 'step'}`` (training only);
- ``ema``: EMA parameters (what evaluation and :func:`glue_jax.load_model` use);
- ``params``: raw parameters when there is no optimizer state (imports);
- ``config``: JSON (model config, method, sampler preset, provenance);
- ``data_iter``: the Grain iterator state (one JSON per process).

Parameters are stored as plain nested dicts (``nnx.to_pure_dict``).
Restoring against an abstract tree with shardings places every array
directly on the current mesh, so a run may resume on a different topology.
Orbax commits a step atomically (temporary directory + rename); steps that
never finished are invisible to :meth:`Checkpointer.latest_step`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

ITEMS = ("state", "ema", "params", "config", "data_iter")


class CheckpointError(RuntimeError):
  pass


class WorkdirInUseError(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """An exclusive ``fcntl`` lock on ``<workdir>/.lock.<process index>``.

  Held for the whole run; the OS releases it when the process dies (even by
  SIGKILL), so a crashed run never blocks its own resumption.  The lock file
  records pid, host and start time for the error message.  Object-store
  workdirs (``gs://``) are not locked.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    self.path = os.path.join(workdir, f".lock.{process_index}")
    self._f = None

  def acquire(self) -> "WorkdirLock":
    import fcntl
    import socket
    import time
    if "://" in self.path:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown process"
      f.close()
      raise WorkdirInUseError(f"workdir {os.path.dirname(self.path)} is in use by another run "
                              f"({holder}); stop it or choose another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    self._f = f
    return self

  def release(self) -> None:
    if self._f is not None:
      import fcntl
      fcntl.flock(self._f, fcntl.LOCK_UN)
      self._f.close()
      self._f = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _grain_handler():
  import grain
  return grain.checkpoint.CheckpointHandler()


class Checkpointer:
  """Save/restore steps under ``directory`` with a keep policy."""

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int | None = None,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"no checkpoint directory at {self.directory}")
    policies = [pp.LatestN(keep)]
    if keep_every:
      policies.append(pp.EveryNSteps(keep_every))
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "ema": ocp.StandardCheckpointHandler(),
        "params": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }
    try:
      handlers["data_iter"] = _grain_handler()
    except (ImportError, AttributeError):  # pragma: no cover
      logging.warning("grain unavailable: data iterator state not checkpointed")
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only)
    self._mngr = ocp.CheckpointManager(
        self.directory, item_names=tuple(handlers), item_handlers=handlers,
        options=options)

  # -- queries -------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def items_at(self, step: int) -> set[str]:
    path = os.path.join(self.directory, str(step))
    return {d for d in os.listdir(path) if d in ITEMS} if os.path.isdir(path) else set()

  # -- save ----------------------------------------------------------------
  def save(self, step: int, *, state=None, ema=None, params=None,
           config: dict | None = None, data_iter=None, force: bool = True) -> bool:
    args = {}
    if state is not None:
      args["state"] = ocp.args.StandardSave(state)
    if ema is not None:
      args["ema"] = ocp.args.StandardSave(ema)
    if params is not None:
      args["params"] = ocp.args.StandardSave(params)
    if config is not None:
      args["config"] = ocp.args.JsonSave(_jsonable(config))
    if data_iter is not None:
      import grain
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    if not args:
      raise ValueError("nothing to save")
    self._writing = step
    try:
      return self._mngr.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore report I/O errors as ValueError
      raise CheckpointError(f"writing checkpoint step {step} to {self.directory} failed: "
                            f"{type(e).__name__}: {e}; the step was not committed, earlier "
                            "checkpoints are untouched") from e

  # -- restore -------------------------------------------------------------
  def restore(self, step: int | None = None, *, state=None, ema=None, params=None,
              config: bool = False, data_iter=None) -> dict[str, Any]:
    """Restores the named items; pass abstract trees (ShapeDtypeStruct with
    shardings) for array items and the live iterator for ``data_iter``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no finished checkpoint in {self.directory}")
    present = self.items_at(step)
    args = {}
    for name, target in (("state", state), ("ema", ema), ("params", params)):
      if target is not None:
        if name not in present:
          raise CheckpointError(f"{self.directory}/{step}: item '{name}' missing "
                                f"(has {sorted(present)})")
        args[name] = ocp.args.StandardRestore(target)
    if config:
      args["config"] = ocp.args.JsonRestore()
    if data_iter is not None:
      if "data_iter" not in present:
        raise CheckpointError(f"{self.directory}/{step}: no data iterator state")
      import grain
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self._mngr.restore(step, args=ocp.args.Composite(**args))
    result = {k: out[k] for k in args}
    result["step"] = step
    return result

  def abstract_item(self, step: int, name: str):
    """ShapeDtypeStructs of a stored array item (from its on-disk metadata)."""
    meta = self._mngr.item_metadata(step)[name]
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))

  def read_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no finished checkpoint in {self.directory}")
    return self.restore(step, config=True)["config"]

  def quarantine(self, step: int, reason: str) -> str:
    """Moves an unreadable step out of the way (never deletes it):
    ``<directory>.quarantine/<step>-<unix time>`` plus a ``REASON.txt``."""
    import time
    src = os.path.join(self.directory, str(step))
    dst_root = self.directory.rstrip("/") + ".quarantine"
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
    os.replace(src, dst)
    with open(os.path.join(dst, "REASON.txt"), "w") as f:
      f.write(reason)
    self._mngr.reload()
    logging.error("checkpoint %s is unreadable; moved to %s: %s", src, dst, reason)
    return dst

  def reached_preemption(self, step: int) -> bool:
    """True when the JAX distributed runtime signals a preemption (all hosts agree)."""
    return self._mngr.reached_preemption(step)

  def wait(self):
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"writing checkpoint step {getattr(self, '_writing', '?')} to "
                            f"{self.directory} failed: {type(e).__name__}: {e}; the step was "
                            "not committed, earlier checkpoints are untouched") from e

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs of ``tree`` (optionally with target shardings)."""
  if shardings is None:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=getattr(a, "sharding", None)), tree)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _jsonable(obj):
  return json.loads(json.dumps(obj, default=_default))


def _default(o):
  if hasattr(o, "to_dict"):
    return o.to_dict()
  if isinstance(o, (tuple, set)):
    return list(o)
  if hasattr(o, "item"):
    return o.item()
  return str(o)
