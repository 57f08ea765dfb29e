r"""Import an official PyTorch SiT / REPA / REG / REGLUE checkpoint.

  python -m glue_jax.tools.import_torch --arch reglue --model SiT-XL/2 \
      --checkpoint last.pt --out DIR

Reads a state dict or a training checkpoint dict (``{'model', 'ema', ...}``;
both are imported: ``ema`` -> our EMA item, ``model`` -> params), checks every
key and shape, and writes a glue_jax checkpoint that ``glue_jax.load_model``,
the sampler and the trainer read.  Only this tool needs torch.

``--model custom`` infers width, depth, patch and grid from the shapes; then
``--set num_heads=H --set encoder_depth=K`` give what shapes cannot tell.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys

from flax import nnx

from glue_jax import api
from glue_jax.models import sit, sit_weights, torch_weights
from glue_jax.sampling import presets

# arch -> (latent channels, time convention, sampler preset, expects global token)
ARCHS = {
    "reglue": (4, "data_at_0", "reglue", True),
    "reg": (4, "data_at_0", "reg", True),
    "repa": (4, "data_at_0", "repa", False),
    "redi": (4, "noise_at_0", "redi", False),
    "sit": (4, "noise_at_0", "sit", False),
}


def _parse_set(items):
  out = {}
  for item in items or ():
    if "=" not in item:
      raise SystemExit(f"--set expects key=value, got {item!r}")
    k, v = item.split("=", 1)
    try:
      out[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k] = v
  return out


def _load_torch(path: str, allow_pickle: bool):
  """torch.load restricted to tensors (+ argparse.Namespace of official runs)."""
  import argparse as _argparse
  import torch  # only this tool needs torch
  try:
    with torch.serialization.safe_globals([_argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError and friends
    if not allow_pickle:
      raise torch_weights.WeightsError(
          f"{path}: cannot be read as plain weights ({e}); if you trust the file, "
          "re-run with --allow-pickle") from e
    return torch.load(path, map_location="cpu", weights_only=False)


def import_checkpoint(checkpoint: str, out: str, *, arch: str, model: str,
                      overrides: dict | None = None, allow_pickle: bool = False) -> str:
  """Converts ``checkpoint`` and writes it under ``out``; returns the step dir."""
  if arch not in ARCHS:
    raise ValueError(f"--arch {arch!r}: one of {sorted(ARCHS)}")
  latent, convention, preset_name, wants_global = ARCHS[arch]
  overrides = dict(overrides or {})
  raw = _load_torch(checkpoint, allow_pickle)
  keys = sorted(raw) if isinstance(raw, dict) else []
  wrapped = isinstance(raw, dict) and any(k in raw for k in ("ema", "model"))
  sd_model = torch_weights.unwrap_state_dict(raw, prefer=("model", "ema"), where=checkpoint)
  sd_ema = (torch_weights.unwrap_state_dict(raw["ema"], where=checkpoint + ":ema")
            if wrapped and "ema" in raw else None)
  step = int(raw.get("steps", raw.get("step", 0)) or 0) if wrapped else 0

  if model == "custom":
    base = sit.SiTConfig(**{k: v for k, v in overrides.items()
                            if k in {f.name for f in dataclasses.fields(sit.SiTConfig)}})
  else:
    base = sit.config_for(model, **overrides)
  if model != "custom":
    found = sit_weights.backbone_shape(sd_model, where=checkpoint)
    for f in ("hidden_size", "depth", "patch_size"):
      if found[f] != getattr(base, f) and f not in overrides:
        raise torch_weights.WeightsError(
            f"{checkpoint}: {f}={found[f]} in the weights but {model} has "
            f"{getattr(base, f)}")
  base = dataclasses.replace(base, time_convention=convention)
  cfg = sit_weights.infer_config(sd_model, base, latent_channels=latent, where=checkpoint)
  if wants_global != bool(cfg.global_token_dim):
    raise torch_weights.WeightsError(
        f"{checkpoint}: --arch {arch} {'needs' if wants_global else 'has no'} a [CLS] "
        f"token path but the weights {'lack' if wants_global else 'have'} one")
  for k, v in overrides.items():
    if hasattr(cfg, k) and getattr(cfg, k) != v:
      raise torch_weights.WeightsError(f"--set {k}={v} contradicts the weights "
                                       f"({k}={getattr(cfg, k)})")

  def to_params(sd, where):
    net = sit.SiT(cfg, rngs=nnx.Rngs(0))
    torch_weights.load_into(net, sit_weights.convert(sd, cfg, where=where), where=where)
    return nnx.state(net, nnx.Param)

  params = to_params(sd_model, checkpoint + (":model" if wrapped else ""))
  ema = to_params(sd_ema, checkpoint + ":ema") if sd_ema is not None else None
  extra = {"sampler": presets.PRESETS[preset_name].to_dict(),
           "method": arch,
           "source": {"checkpoint": checkpoint, "arch": arch, "model": model,
                      "checkpoint_keys": keys}}
  return api.save_network(out, "sit", cfg, params, ema=ema, step=step, extra=extra)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("--arch", required=True, choices=sorted(ARCHS))
  p.add_argument("--model", required=True,
                 help="SiT-{S,B,L,XL}/{2,4,8} or 'custom' (shapes + --set)")
  p.add_argument("--checkpoint", required=True, help="official .pt/.pth file")
  p.add_argument("--out", required=True, help="output checkpoint directory")
  p.add_argument("--allow-pickle", action="store_true",
                 help="load with full pickle (only for trusted files)")
  p.add_argument("--set", action="append", default=[],
                 help="SiTConfig override, e.g. --set num_heads=4")
  a = p.parse_args(argv)
  try:
    path = import_checkpoint(a.checkpoint, a.out, arch=a.arch, model=a.model,
                             overrides=_parse_set(a.set),
                             allow_pickle=a.allow_pickle)
  except (torch_weights.WeightsError, FileExistsError, FileNotFoundError) as e:
    print(f"import_torch: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
