"""REGLUE train-step throughput: glue_jax vs the official PyTorch code, same machine.

One training step of SiT + REGLUE (20-channel 32x32 input = 4 VAE latent + 16
semantic channels upsampled from 16x16, a 768-d [CLS] token, REPA on all 257
tokens) is timed on both sides with the same network shape and batch:

- ours: ``glue_jax.train.step.make_train_step`` (jitted, state donated), as in
  ``bench/sit_throughput.py``: latent scaling + bilinear upsampling of the
  semantic grid, t and noise, label dropout, forward, multimodal velocity
  loss + REPA, backward, global-norm clip 1.0, AdamW (lr 1e-4, wd 0), EMA
  (0.9999) and the non-finite guard;
- official (``--official_repo=DIR``, a checkout of giorgospets/reglue; its
  ``models/sit.py`` (``SiT_models``) and ``loss.py`` (``SILoss``) are imported
  from DIR at run time): the same inputs, ``SILoss`` forward (REPA projection
  loss on the 257 tokens, latent / feature / [CLS] MSEs weighted 1 / 1 / 0.03,
  projection 0.5 as in train.py), ``backward``, ``clip_grad_norm_(1.0)``,
  ``torch.optim.AdamW`` step, and train.py's EMA update (per-parameter
  ``mul_(d).add_(p, alpha=1-d)``).  Eager PyTorch, no ``torch.compile``
  (as released), fp32 on CPU, bf16 autocast on GPU (the paper used fp16).

Features are *random tensors of the right shape* on both sides (no DINOv2
or compressor in the step; REGLUE's online extraction is excluded from both):
latents (B,32,32,4), semantic (B,16,16,16), cls (B,768), REPA targets
(B,256,768) (+ the cls as token 0 on the official side, as train.py builds it).

Both steps are built first, then timed *interleaved*: after warmup, each
round runs ``--inner`` steps of one side then of the other (the order
alternating between rounds), so on a shared machine both see the same load;
img/s is from the median round.  The process CPU seconds per step are
recorded too (on a CPU shared with other jobs they show how much work each
side did, independent of how much of the machine it got).

FLOPs per step are XLA's count of our step lowered with ``scan_layers=False``
(same network, so the same count is used for both columns); MFU is against
the best of two matmul-peak measurements taken at the start and the end of
this run (f32 on CPU, bf16 on GPU).

  python bench/train_step.py --official_repo=/tmp/reglue_official      # CPU: 'small'
  python bench/train_step.py --models B/2,XL/2 --official_repo=DIR     # GPU defaults
  python bench/train_step.py --models B/2 --batch 4 --iters 2          # ours only
  taskset -c 0 python bench/train_step.py --official_repo=DIR --out=bench/results/train_step_1core.json
      (both sides confined to one core: on a shared machine, fewer threads to
      be descheduled mid-step; compare the CPU s / step columns)

Models: 'small' (depth 4, width 256, 4 heads, REPA tap 2, projector 512;
the CPU default), 'B/2' (tap 4) and 'XL/2' (tap 8) at 256 px.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.util
import os
import platform
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # GPU: share with torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_BENCH))
sys.path.insert(0, _BENCH)
from glue_jax import methods as methods_lib  # noqa: E402
from glue_jax import models  # noqa: E402
from glue_jax.models import sit  # noqa: E402
from glue_jax.train import step as step_lib  # noqa: E402
from glue_jax.transport import objective  # noqa: E402
from glue_jax.transport import losses  # noqa: E402
import bench_io  # noqa: E402
import sit_throughput as st  # noqa: E402  (peak, timing, FLOP and batch helpers)

NAME = "train_step"
METHOD = "reglue"
LATENT_SCALE = 0.18215
# name -> (SiT arch for config_for, overrides shared by both implementations)
MODELS = {
    "small": ("B/2", dict(depth=4, hidden_size=256, num_heads=4, encoder_depth=2,
                          projector_dim=512)),
    "B/2": ("B/2", dict(encoder_depth=4)),
    "XL/2": ("XL/2", dict(encoder_depth=8)),
}
GPU_BATCH = {"small": 64, "B/2": 64, "XL/2": 32}
CPU_BATCH = 8


class Side:
  """One implementation's train step, ready to run: ``step()`` runs and waits."""

  def __init__(self, name: str, step, loss, facts: dict, compile_s: float | None = None):
    self.name, self.step, self.loss, self.facts = name, step, loss, facts
    self.compile_s = compile_s
    self.times: list[float] = []
    self.cpu_times: list[float] = []
    self.warmup: list[float] = []

  def timed(self, n: int) -> tuple[float, float]:
    """Wall and process-CPU seconds per step over ``n`` consecutive steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
      self.step()
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

  def summary(self, batch_size: int) -> dict:
    med = float(np.median(self.times))
    return dict(images_per_s=batch_size / med, median_s=med, min_s=float(np.min(self.times)),
                times_s=self.times, cpu_s_per_step=float(np.median(self.cpu_times)),
                cpu_times_s=self.cpu_times, warmup_s=self.warmup, compile_s=self.compile_s,
                final_loss=self.loss())


def net_config(model: str, dtype: str, attention_impl=None) -> sit.SiTConfig:
  arch, over = MODELS[model]
  method = methods_lib.get(METHOD)
  return sit.config_for(arch, input_size=32, dtype=dtype, attention_impl=attention_impl,
                        **{**over, **method.network_overrides(encoder_dim=st.ENCODER_DIM)})


# -- ours ---------------------------------------------------------------------
def setup_ours(model: str, batch: dict, args) -> Side:
  """glue_jax's jitted train step (state donated and threaded through calls)."""
  method = methods_lib.get(METHOD)
  cfg = net_config(model, args.dtype, args.attention_impl)
  step_cfg = objective.StepConfig(method=method,
                                 loss=losses.LossConfig(**method.loss_overrides()))
  tx = step_lib.make_optimizer()
  graphdef, state = models.init("sit", cfg, seed=0)
  params = nnx.to_pure_dict(state)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  fwd_analytic = st.analytic_forward_flops(cfg, params)
  unrolled = nnx.graphdef(models.build("sit", dataclasses.replace(cfg, scan_layers=False),
                                       abstract=True))
  key = jax.random.key(0)
  batch = jax.device_put(batch)
  train_state = jax.jit(lambda p: step_lib.init_state(p, tx))(params)
  del params, state
  flops_xla = st.lowered_flops(objective.make_train_step(unrolled, tx, step_cfg),
                               train_state, batch, key)
  t0 = time.perf_counter()
  train = jax.jit(objective.make_train_step(graphdef, tx, step_cfg),
                  donate_argnums=0).lower(train_state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  holder = [train_state, None]

  def step():
    holder[0], holder[1] = train(holder[0], batch, key)
    jax.block_until_ready(holder)
  b = batch["label"].shape[0]
  facts = dict(params=n_params, flops_xla=flops_xla,
               flops_analytic=3.0 * fwd_analytic * b, tokens=cfg.num_tokens,
               depth=cfg.depth, hidden=cfg.hidden_size, heads=cfg.num_heads,
               encoder_depth=cfg.encoder_depth, projector_dim=cfg.projector_dim)
  return Side("ours", step, lambda: float(holder[1]["loss"]), facts, compile_s)


# -- official -----------------------------------------------------------------
def import_official(repo: str):
  """``models/sit.py`` and ``loss.py`` of the official checkout, by path."""
  mods = {}
  for name, rel in (("sit", os.path.join("models", "sit.py")), ("loss", "loss.py")):
    path = os.path.join(repo, rel)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--official_repo={repo}: no {rel} (expected a checkout of "
                              "github.com/giorgospets/reglue)")
    spec = importlib.util.spec_from_file_location(f"reglue_official_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mods[name] = mod
  return mods["sit"], mods["loss"]


def official_identity(repo: str) -> dict:
  """What was run: the files' SHA-256 (and the git commit when DIR is a checkout)."""
  out = {"path": os.path.abspath(repo)}
  for rel in ("models/sit.py", "loss.py"):
    with open(os.path.join(repo, rel), "rb") as f:
      out[rel + ":sha256"] = hashlib.sha256(f.read()).hexdigest()
  head = os.path.join(repo, ".git", "HEAD")
  if os.path.isfile(head):
    import subprocess
    r = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                       text=True)
    out["commit"] = r.stdout.strip() or None
  return out


def build_official(sit_mod, model: str, cfg: sit.SiTConfig):
  """The official network with the same shape as ours (train.py's kwargs)."""
  kw = dict(input_size=cfg.input_size, num_classes=cfg.num_classes,
            in_channels=cfg.in_channels, use_cfg=True, z_dims=[cfg.projector_out_dim],
            encoder_depth=cfg.encoder_depth, projector_dim=cfg.projector_dim,
            fused_attn=True, qk_norm=False)
  if model == "small":    # SiT_models has no such entry: the same class, our shape
    return sit_mod.SiT(depth=cfg.depth, hidden_size=cfg.hidden_size,
                       decoder_hidden_size=cfg.hidden_size, patch_size=cfg.patch_size,
                       num_heads=cfg.num_heads, **kw)
  return sit_mod.SiT_models["SiT-" + model](**kw)


def setup_official(repo: str, model: str, batch: dict, gpu: bool) -> Side:
  """The official step (eager PyTorch) on the same inputs."""
  import torch
  import torch.nn.functional as F
  sit_mod, loss_mod = import_official(repo)
  cfg = net_config(model, "float32")
  dev = torch.device("cuda" if gpu else "cpu")
  torch.manual_seed(0)
  if gpu:
    torch.backends.cuda.matmul.allow_tf32 = True      # train.sh: --allow-tf32
    torch.backends.cudnn.allow_tf32 = True
  net = build_official(sit_mod, model, cfg).to(dev)
  ema = copy.deepcopy(net).to(dev)
  for p in ema.parameters():
    p.requires_grad_(False)
  net.train()
  ema.eval()
  trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
  opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.0)
  loss_fn = loss_mod.SILoss(prediction="v", path_type="linear", weighting="uniform")
  tensor = lambda a: torch.from_numpy(np.array(a)).to(dev)
  nchw = lambda a: tensor(a).permute(0, 3, 1, 2).contiguous()
  latents, semantic = nchw(batch["latents"]), nchw(batch["semantic"])
  cls, align = tensor(batch["cls"]), tensor(batch["align_target"])
  labels = tensor(np.asarray(batch["label"]).astype(np.int64))
  ema_params = dict(ema.named_parameters())
  decay = 0.9999
  last = {}

  def step():
    with torch.no_grad():     # train.py: latent scaling, compressor output upsampled
      s = F.interpolate(semantic, size=latents.shape[2:], mode="bilinear")
      x = torch.cat([latents * LATENT_SCALE, s], dim=1)
      zs = [torch.cat([cls[:, None], align], dim=1)]       # [CLS; patches], 257 tokens
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=gpu):
      l_z, l_s, l_proj, _, _, l_cls = loss_fn(net, x, dict(y=labels), zs=zs, cls_token=cls)
      loss = l_z.mean() + l_s.mean() * 1.0 + l_proj.mean() * 0.5 + l_cls.mean() * 0.03
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():     # train.py's update_ema: every named parameter
      for name, p in net.named_parameters():
        ema_params[name].mul_(decay).add_(p.data, alpha=1 - decay)
    if gpu:
      torch.cuda.synchronize()
    last["loss"] = loss.detach()

  facts = dict(trainable_params=int(trainable), torch_threads=torch.get_num_threads(),
               autocast="bfloat16" if gpu else None)
  return Side("official", step, lambda: float(last["loss"]), facts)


def time_interleaved(sides: list[Side], iters: int, warmup: int, inner: int) -> None:
  """Warmup, then ``iters`` rounds; each round times ``inner`` steps of every
  side, the order alternating, so both see the same machine load."""
  for s in sides:
    s.warmup = [s.timed(1)[0] for _ in range(warmup)]
  for i in range(iters):
    for s in (sides if i % 2 == 0 else sides[::-1]):
      wall, cpu = s.timed(inner)
      s.times.append(wall)
      s.cpu_times.append(cpu)


# -- main ---------------------------------------------------------------------
def versions() -> dict:
  import flax
  import jaxlib
  import optax
  out = dict(python=platform.python_version(), jax=jax.__version__,
             jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__)
  for name in ("torch", "timm"):
    try:
      out[name] = importlib.import_module(name).__version__
    except ImportError:
      out[name] = None
  return out


def main(argv=None):
  backend = jax.default_backend()
  gpu = backend in ("gpu", "cuda", "rocm")
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="B/2,XL/2" if gpu else "small",
                  help=f"comma list of {list(MODELS)}")
  ap.add_argument("--batch", type=int, default=0,
                  help=f"0: {CPU_BATCH} on CPU, {GPU_BATCH} on GPU")
  ap.add_argument("--iters", type=int, default=10 if gpu else 4,
                  help="timed rounds (sides alternate within a round)")
  ap.add_argument("--warmup", type=int, default=2 if gpu else 1)
  ap.add_argument("--inner", type=int, default=5 if gpu else 1,
                  help="consecutive steps per side in each timed round")
  ap.add_argument("--dtype", default="bfloat16" if gpu else "float32",
                  choices=["float32", "bfloat16"], help="our compute dtype")
  ap.add_argument("--attention-impl", default=None, choices=[None, "xla", "cudnn"])
  ap.add_argument("--official_repo", "--official-repo", default="",
                  help="checkout of github.com/giorgospets/reglue; empty: ours only")
  ap.add_argument("--peak-size", type=int, default=8192 if gpu else 2048)
  ap.add_argument("--out", default=os.path.join("bench", "results", NAME + ".json"))
  args = ap.parse_args(argv)
  for m in args.models.split(","):
    if m not in MODELS:
      ap.error(f"--models: unknown {m!r}; one of {list(MODELS)}")

  if args.official_repo:
    if not os.path.isdir(args.official_repo):
      ap.error(f"--official_repo={args.official_repo}: no such directory")
    identity = official_identity(args.official_repo)
  else:
    identity = None
    print("official column skipped: pass --official_repo=/path/to/giorgospets/reglue "
          "checkout to time the official PyTorch step as well")

  load_before = os.getloadavg()
  t_start = time.perf_counter()
  measure = lambda: st.measure_peak(getattr(jnp, args.dtype), args.peak_size, reps=3,
                                    inner=10 if gpu else 1)
  peaks = [measure()]
  device = str(jax.devices()[0].device_kind)
  print(f"REGLUE train step, 256 px, {backend} ({device}), {os.cpu_count()} cpus, "
        f"load avg {load_before[0]:.2f}; {args.dtype} matmul {peaks[0] / 1e9:.1f} GFLOP/s",
        flush=True)

  rows = []
  for model in args.models.split(","):
    b = args.batch or (GPU_BATCH[model] if gpu else CPU_BATCH)
    batch = st.make_batch(methods_lib.get(METHOD), b)
    row = dict(model=model, batch=b, dtype=args.dtype, inner=args.inner)
    sides = [setup_ours(model, batch, args)]
    if identity:
      sides.append(setup_official(args.official_repo, model, batch, gpu))
    print(f"  {model}: set up ({time.perf_counter() - t_start:.0f} s), timing "
          f"{args.iters} rounds x {args.inner} steps per side", flush=True)
    time_interleaved(sides, args.iters, args.warmup, args.inner)
    facts = sides[0].facts
    row.update(facts)
    flops = facts["flops_xla"] or facts["flops_analytic"]
    row.update(flops_per_step=flops, flops_source="xla" if facts["flops_xla"] else "analytic")
    for side in sides:
      row[side.name] = side.summary(b)
    if identity:
      row["official_facts"] = sides[1].facts
      row["speedup"] = row["ours"]["images_per_s"] / row["official"]["images_per_s"]
      if sides[1].facts["trainable_params"] != facts["params"]:
        print(f"  WARNING: parameter counts differ: ours {facts['params']:,}, official "
              f"{sides[1].facts['trainable_params']:,}")
    del sides
    row["load_avg_1m_after"] = os.getloadavg()[0]
    rows.append(row)
    print(f"  {model}: done ({time.perf_counter() - t_start:.0f} s)", flush=True)
  peaks.append(measure())
  peak = max(peaks)          # the best matmul rate seen in this run
  for row in rows:
    for name in ("ours", "official"):
      if name in row:
        fps = row["flops_per_step"] / row[name]["median_s"]
        row[name].update(flop_per_s=fps, mfu=fps / peak)

  vers = versions()
  print("\n" + ", ".join(f"{k} {v}" for k, v in vers.items()))
  print(f"load avg 1 min {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
        f"MFU vs {args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s ({args.peak_size}^3, best "
        f"of the start {peaks[0] / 1e9:.1f} and end {peaks[1] / 1e9:.1f} measurements)")
  print("| model | params | batch | impl | img/s | step s (median) | CPU s / step | TFLOP/s "
        "| MFU % | final loss | ours / official |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    for side in ("ours", "official"):
      if side not in r:
        continue
      s = r[side]
      impl = (f"glue_jax {r['dtype']}" if side == "ours" else
              f"official torch {r['official_facts']['autocast'] or 'float32'}")
      ratio = f"{r['speedup']:.2f}x" if side == "ours" and "speedup" in r else ""
      print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {impl} "
            f"| {s['images_per_s']:.2f} | {s['median_s']:.3f} | {s['cpu_s_per_step']:.2f} "
            f"| {s['flop_per_s'] / 1e12:.3f} "
            f"| {100 * s['mfu']:.1f} | {s['final_loss']:.4f} | {ratio} |")
  print(f"FLOP per step ({rows[0]['flops_source']} count of our step, used for both): "
        + ", ".join(f"{r['model']} b{r['batch']} {r['flops_per_step'] / 1e9:.1f} G"
                    for r in rows))
  bench_io.write_json(args.out, dict(
      name=NAME, backend=backend, device=device, cpus=os.cpu_count(), versions=vers,
      dtype=args.dtype, cpu_affinity=sorted(os.sched_getaffinity(0)),
      xla_flags=os.environ.get("XLA_FLAGS"), iters=args.iters, warmup=args.warmup, peak_size=args.peak_size,
      peak_flop_per_s=peak, peak_measurements=peaks,
      official=identity, load_avg_before=load_before,
      load_avg_after=os.getloadavg(), total_s=time.perf_counter() - t_start,
      inputs="random tensors of the right shapes on both sides (no DINOv2/compressor)",
      results=rows))


if __name__ == "__main__":
  main()
