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
import re
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

ITEMS = ("state", "ema", "params", "config", "data_iter")


class CheckpointError(RuntimeError):
  """A checkpoint problem; ``reason`` (when set) is the one-line cause of an
  unreadable step (:func:`describe_failure`), ``step`` the step."""

  def __init__(self, message: str, *, reason: str | None = None, step: int | None = None):
    super().__init__(message)
    self.reason, self.step = reason, step
    self.details = ""          # the original error's full text, when wrapped


class _DropReadOnlyNotice(logging.Filter):
  """Orbax logs 'Given directory is read only=<dir>' (a warning) every time a
  manager is opened with ``read_only=True``, i.e. on every
  :func:`glue_jax.load_model`; opening read-only is what we asked for."""

  def filter(self, record):
    return record.msg != "Given directory is read only=%s"


if not any(isinstance(f, _DropReadOnlyNotice) for f in logging.getLogger("absl").filters):
  logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


# -- failure descriptions --------------------------------------------------------
_TS_STATUS = re.compile(r"\b(OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|NOT_FOUND|INVALID_ARGUMENT|"
                        r"UNKNOWN|INTERNAL|PERMISSION_DENIED|UNAVAILABLE|ABORTED):")
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')
_VALUE_SIZE = re.compile(r"value of size (\d+)")
_ARRAY_KEY = re.compile(r'Error reading "([^"/]+)/[^"]*" in OCDBT')
# Small JSON files of a step (Orbax metadata, the config item, Grain iterator state).
_JSON_NAMES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")


def _chain(exc: BaseException) -> list[BaseException]:
  out, seen = [], set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    out.append(exc)
    exc = exc.__cause__ or exc.__context__
  return out


def _first_line(text: str, limit: int = 240) -> str:
  text = text.split("[tensorstore_spec=")[0].strip()
  line = text.splitlines()[0].strip() if text else ""
  return line if len(line) <= limit else line[:limit - 3] + "..."


def _files_under(path: str):
  for root, _, files in os.walk(path):
    for f in files:
      yield os.path.join(root, f)


def _bad_small_files(step_dir: str) -> list[str]:
  """Files of ``step_dir`` that are plainly broken: empty, or a JSON file
  (Orbax metadata, the config item, iterator state) that does not parse."""
  bad = []
  for p in sorted(_files_under(step_dir)):
    name = os.path.basename(p)
    try:
      size = os.path.getsize(p)
      if size == 0 and name != "commit_success.txt":
        bad.append(p)
      elif (name in _JSON_NAMES or name.endswith(".json")
            or os.path.basename(os.path.dirname(p)) == "array_metadatas") and size < (64 << 20):
        with open(p, "rb") as f:
          json.loads(f.read())
    except (OSError, ValueError):
      bad.append(p)
  return bad


def describe_failure(exc: BaseException, step_dir: str | None = None) -> str:
  """One line naming why a checkpoint step could not be read.

  ``exc`` is what a restore or config read raised (Orbax / TensorStore
  errors carry multi-line specs; only their cause is kept); ``step_dir`` (the
  step's directory) lets the file be found when the message names none.
  Returns ``'truncated/unreadable <file>: <cause>'`` when a file is
  identified, else ``'<ExceptionType>: <first line>'``.
  """
  for e in _chain(exc):
    if isinstance(e, CheckpointError) and e.reason:
      return e.reason
  chain = _chain(exc)
  texts = [str(e) for e in chain]
  # The most specific message: a TensorStore status (the innermost one), else the
  # innermost exception's first line.
  status = [t for t in texts if _TS_STATUS.search(t)]
  if status:
    # 'CODE: Error reading "k" in OCDBT database at local file "f": <cause>' ->
    # 'CODE: <cause>' (the file and array are named separately).
    text = _first_line(status[-1], 10_000)
    m = _TS_STATUS.search(text)
    rest = text[m.end():].strip()
    rest = rest.rsplit('": ', 1)[-1] if '": ' in rest else rest
    detail = _first_line(f"{m.group(1)}: {rest}")
  else:
    inner = chain[-1]
    line = _first_line(str(inner))
    detail = f"{type(inner).__name__}: {line}" if line else type(inner).__name__
  array = next((m.group(1) for t in texts for m in [_ARRAY_KEY.search(t)] if m), None)
  files = []
  for t in texts:
    for f in _LOCAL_FILE.findall(t.split("[tensorstore_spec=")[0]):
      if f not in files:
        files.append(f)
  # A named file is better than the OCDBT database directory that holds it.
  named = [f for f in files if not f.endswith("/")]
  target = named[-1] if named else None
  size = next((int(m.group(1)) for t in texts for m in [_VALUE_SIZE.search(t)] if m), None)
  if target is None and files and size is not None:
    # "Requested byte range ... is not valid for value of size N": a data file was
    # cut to N bytes; it is the one of that size under the database directory.
    same = [p for p in _files_under(files[-1]) if os.path.getsize(p) == size]
    if len(same) == 1:
      target = same[0]
  if target is None and step_dir and os.path.isdir(step_dir):
    bad = _bad_small_files(step_dir)
    if bad:
      target = bad[0] + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
  if target is None and files:
    target = files[-1]
  if target is None:
    return detail
  if array:
    detail = f"array {array!r}: {detail}"
  return f"truncated/unreadable {target}: {detail}"


def _read(fn, directory: str, step: int, what: str):
  """``fn()``, with any failure turned into a one-line :class:`CheckpointError`
  (``reason``: :func:`describe_failure`; the original text in ``details``)."""
  try:
    return fn()
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - TensorStore reports I/O errors as ValueError
    import traceback
    _filter_abandoned_reads()
    step_dir = os.path.join(directory, str(step))
    reason = describe_failure(e, step_dir)
    err = CheckpointError(f"checkpoint {step_dir} ({what}): {reason}", reason=reason,
                          step=step)
    err.details = "".join(traceback.format_exception(e))
  raise err from None


_abandoned = {"installed": False, "dropped": 0}


def _filter_abandoned_reads() -> None:
  """When one array read fails, Orbax abandons the sibling reads; later (at
  garbage collection, from TensorStore threads, at exit) each prints
  "Exception ignored in <coroutine _read_array_index_and_device_put>" with a
  full TensorStore spec, or "RuntimeError: Event loop is closed" (thousands of
  lines for one truncated file).  The failure itself is raised and described
  once; after a failed read this process drops exactly those two echoes
  (counted in ``_abandoned['dropped']``) and passes everything else on."""
  if _abandoned["installed"]:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    obj, err = unraisable.object, unraisable.exc_value
    code = getattr(obj, "cr_code", None)
    if ((code is not None and code.co_name == "_read_array_index_and_device_put")
        or (obj is None and isinstance(err, RuntimeError)
            and str(err) == "Event loop is closed")):
      _abandoned["dropped"] += 1
      return
    previous(unraisable)

  sys.unraisablehook = hook
  _abandoned["installed"] = True


def no_checkpoint_message(directory: str) -> str:
  """'no finished checkpoint in <dir>', plus the sub-directories that hold
  checkpoints (a demo workdir keeps them in ``<workdir>/reglue``)."""
  msg = f"no finished checkpoint in {directory}"
  found = find_checkpoint_dirs(directory)
  if found:
    shown = ", ".join(found[:5]) + (f" (+{len(found) - 5} more)" if len(found) > 5 else "")
    msg += f"; checkpoints are in its sub-director{'ies' if len(found) > 1 else 'y'} {shown}"
  return msg


def _is_step_dir(path: str) -> bool:
  return os.path.basename(path).isdigit() and (
      os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))
      or os.path.exists(os.path.join(path, "commit_success.txt"))
      or any(os.path.isdir(os.path.join(path, i)) for i in ITEMS))


def find_checkpoint_dirs(root: str, max_depth: int = 3) -> list[str]:
  """Directories under ``root`` (not ``root`` itself) holding finished steps,
  given as :func:`glue_jax.load_model` accepts them (a run's workdir rather
  than its ``checkpoints/``)."""
  found = []
  root = os.path.normpath(root)

  def walk(d, depth):
    try:
      entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
      return
    subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    if d != root and any(_is_step_dir(s) for s in subdirs):
      found.append(os.path.dirname(d) if os.path.basename(d) == "checkpoints" else d)
      return
    if depth < max_depth:
      for s in subdirs:
        name = os.path.basename(s)
        if not (name.startswith(".") or name.isdigit() or name.endswith(".quarantine")):
          walk(s, depth + 1)

  walk(root, 0)
  return found


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
    # Read-only: pass the values Orbax would otherwise reset with a warning each.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only, **({"save_interval_steps": 0} if read_only else {}))
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
      raise CheckpointError(no_checkpoint_message(self.directory))
    present = self.items_at(step)
    args = {}
    for name, target in (("state", state), ("ema", ema), ("params", params)):
      if target is not None:
        if name not in present:
          raise CheckpointError(f"{self.directory}/{step}: item '{name}' missing "
                                f"(has {sorted(present)})", step=step,
                                reason=f"item '{name}' missing (has {sorted(present)})")
        args[name] = ocp.args.StandardRestore(target)
    if config:
      args["config"] = ocp.args.JsonRestore()
    if data_iter is not None:
      if "data_iter" not in present:
        raise CheckpointError(f"{self.directory}/{step}: no data iterator state", step=step,
                              reason="item 'data_iter' missing")
      import grain
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = _read(lambda: self._mngr.restore(step, args=ocp.args.Composite(**args)),
                self.directory, step, "+".join(args))
    result = {k: out[k] for k in args}
    result["step"] = step
    return result

  def abstract_item(self, step: int, name: str):
    """ShapeDtypeStructs of a stored array item (from its on-disk metadata)."""
    present = self.items_at(step)
    if name not in present:
      raise CheckpointError(f"{self.directory}/{step}: item '{name}' missing "
                            f"(has {sorted(present)})", reason=f"item '{name}' missing",
                            step=step)
    meta = _read(lambda: self._mngr.item_metadata(step)[name], self.directory, step,
                 f"{name} metadata")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))

  def read_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(no_checkpoint_message(self.directory))
    return self.restore(step, config=True)["config"]

  def quarantine(self, step: int, reason: "str | BaseException") -> str:
    """Moves an unreadable step out of the way (never deletes it):
    ``<directory>.quarantine/<step>-<unix time>`` plus a ``REASON.txt``.

    ``reason`` is a string or the exception the read raised (described with
    :func:`describe_failure`).  The log line and REASON.txt's first line are
    one line; REASON.txt keeps the full text below it.
    """
    import time
    import traceback
    src = os.path.join(self.directory, str(step))
    details = ""
    if isinstance(reason, BaseException):
      details = getattr(reason, "details", None) or "".join(traceback.format_exception(reason))
      reason = describe_failure(reason, src)
    elif "\n" in reason.strip() or len(reason) > 500:
      details, reason = reason, _first_line(reason, 300) + " (full text in REASON.txt)"
    dst_root = self.directory.rstrip("/") + ".quarantine"
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
    os.replace(src, dst)
    with open(os.path.join(dst, "REASON.txt"), "w") as f:
      f.write(reason + "\n" + (f"\n{details}" if details else ""))
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
