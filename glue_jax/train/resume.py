"""Resuming a job of the one trainer: compatibility checks and the restore of
the newest readable checkpoint (state, EMA, Grain iterator position).

Unreadable steps are quarantined with a one-line reason
(``checkpoint.describe_failure``); when checkpoints exist but none restores,
the run stops unless ``checkpoint.allow_fresh_start``.
"""

from __future__ import annotations

import json
import logging
import os

import jax

from glue_jax.train import checkpoint as ckpt_lib

log = logging.getLogger("glue_jax.train")


class ConfigMismatchError(ValueError):
  """The run's config does not match the checkpoint it would resume from."""


def check_meta(saved: dict, meta: dict, where: str, keys=("model",)) -> None:
  """Default compatibility check: the ``keys`` entries of the metadata must be
  equal (compared as JSON: tuples and lists alike)."""
  norm = lambda x: json.loads(json.dumps(x, default=str))
  diffs = []
  for k in keys:
    a, b = norm(saved.get(k)), norm(meta.get(k))
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += [f"{k}.{f}: checkpoint {a.get(f)!r} != config {b.get(f)!r}"
                for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
    elif a != b:
      diffs.append(f"{k}: checkpoint {a!r} != config {b!r}")
  if diffs:
    raise ConfigMismatchError(f"{where}: config does not match the checkpoint:\n  "
                              + "\n  ".join(diffs))


def without_ema(state: dict) -> dict:
  return {k: v for k, v in state.items() if k != "ema"}


def restore_latest(s, ck: ckpt_lib.Checkpointer, data_iter, *,
                   allow_fresh_start: bool = False):
  """``(state, saved_meta)`` of the newest checkpoint that restores, or
  ``(None, None)`` when there is none (``s``: the job's ``trainer.Setup``).

  A config mismatch is an error (never skipped).  A step whose files cannot
  be read is quarantined with the reason and the next older one is tried;
  when steps existed but none restored, the run stops with each step and its
  reason unless ``allow_fresh_start``.
  """
  check = s.job.check or check_meta
  abstract = s.abstract_state()
  failures = []
  for step in sorted(ck.all_steps(), reverse=True):
    try:
      saved = ck.read_config(step)
    except Exception as e:  # noqa: BLE001 - any read failure means "unreadable"
      failures.append((step, _reason(ck, step, "config", e)))
      ck.quarantine(step, failures[-1][1])
      continue
    check(saved, s.job.meta, f"{ck.directory}/{step}")
    items = {"state": without_ema(abstract)}
    if "ema" in abstract:
      items["ema"] = abstract["ema"]
    try:
      r = ck.restore(step, data_iter=data_iter, **items)
    except Exception as e:  # noqa: BLE001
      failures.append((step, _reason(ck, step, "restore", e)))
      ck.quarantine(step, failures[-1][1])
      continue
    got = int(jax.device_get(r["state"]["step"]))
    if got != step:
      failures.append((step, f"state.step={got} in directory {step}"))
      ck.quarantine(step, failures[-1][1])
      continue
    log.info("%s: resumed from %s/%d", s.job.name, ck.directory, step)
    state = dict(r["state"])
    if "ema" in r:
      state["ema"] = r["ema"]
    return state, saved
  if failures and not allow_fresh_start:
    lines = "\n  ".join(f"step {st}: {why}" for st, why in failures)
    raise ckpt_lib.CheckpointError(
        f"{ck.directory}: no checkpoint could be restored (moved to "
        f"{ck.directory}.quarantine/):\n  {lines}\nset checkpoint.allow_fresh_start=True "
        "to start from step 0 anyway")
  if failures:
    log.warning("%s: no readable checkpoint; starting from step 0 "
                "(checkpoint.allow_fresh_start)", s.job.name)
  return None, None


def _reason(ck, step: int, what: str, e: Exception) -> str:
  return f"{what}: " + ckpt_lib.describe_failure(e, os.path.join(ck.directory, str(step)))




def latest_state(workdir: str) -> tuple[dict, dict]:
  """``(state, meta)`` of the newest checkpoint in ``<workdir>/checkpoints``
  (host arrays; the EMA under ``'ema'`` when the job keeps one)."""
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    step = ck.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"no finished checkpoint in {ck.directory}")
    meta = ck.read_config(step)
    items = {"state": ck.abstract_item(step, "state")}
    if "ema" in ck.items_at(step):
      items["ema"] = ck.abstract_item(step, "ema")
    r = ck.restore(step, **items)
    state = dict(r["state"])
    if "ema" in r:
      state["ema"] = r["ema"]
    return state, meta
  finally:
    ck.close()
