"""Console progress lines of long stages: step/total, loss, rate, ETA."""

from __future__ import annotations

import time

import numpy as np


class Progress:
  """Console progress: ``name step/total (pct) loss .. rate .. ETA ..``."""

  def __init__(self, name: str, total: int, start: int, batch_size: int):
    self.name, self.total, self.start, self.batch = name, total, start, batch_size
    self.t0 = time.time()

  def line(self, step: int, metrics: dict) -> str:
    dt = max(time.time() - self.t0, 1e-9)
    rate = (step - self.start) / dt
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    loss = metrics.get("loss")
    parts = [f"{self.name} step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%)"]
    if loss is not None:
      parts.append(f"loss {loss:.4g}")
    parts.append(f"{rate:.2f} steps/s ({rate * self.batch:.1f} ex/s)")
    parts.append(f"ETA {format_seconds(eta)}")
    return "  ".join(parts)


def format_seconds(sec: float) -> str:
  if not np.isfinite(sec):
    return "?"
  sec = int(round(sec))
  h, rem = divmod(sec, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
