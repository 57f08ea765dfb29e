"""Shared output of the benchmarks: environment facts and atomic JSON results."""

import json
import os
import platform

import jax


def environment() -> dict:
  """What a result was measured on."""
  dev = jax.devices()[0]
  return dict(jax=jax.__version__, backend=jax.default_backend(),
              device=str(dev.device_kind), cpus=os.cpu_count(),
              machine=platform.machine(), load_avg=os.getloadavg())


def write_json(path: str, payload: dict) -> None:
  """Writes ``payload`` (plus :func:`environment`) to ``path`` atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"environment": environment(), **payload}, f, indent=2)
  os.replace(tmp, path)
  print(f"wrote {path}")
