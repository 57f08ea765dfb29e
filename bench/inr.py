"""LA-INR vs its baselines: reconstruction PSNR, novel-view PSNR, decode throughput.

Reconstruction: LA-INR and the three baselines (``global``: TransINR-like
single global modulation; ``single_band``; ``no_select``) trained for the same
number of steps on digits (16 px) and on scikit-image photo crops (32 px),
several seeds each (the seeds are ``vmap``-ed: one compilation per variant);
test PSNR = mean over test images of -10 log10(per-image MSE) (unclipped),
reported as mean +- std over seeds.  Novel views: LA-INR vs ``global`` on the
procedural multi-view set (support views -> the other views of held-out
objects).  Throughput: coordinates/s of chunked decoding (``lax.map``) of a
trained digits model at 256x256.

The default run is sized for a 2-core CPU (~10 minutes idle): the 'tiny'
model preset with 16 latent tokens, 600 steps of batch 8 at lr 1e-2 (NVS:
batch 4, lr 3e-3), photo crops trained on a random 25% of pixels per image
(IPC subsamples pixels only at >= 512 px; here it saves CPU time; the test
PSNR always uses all pixels).  Small amortised INRs sit on a mean-image
plateau for the first ~200-250 updates (more updates, not more images per
update, shorten it: hence small batches and a high learning rate here); runs
much shorter than that compare plateau-escape times, not the models.

  python bench/inr.py                          # default CPU run
  python bench/inr.py --steps 2000 --nvs-steps 2000 --seeds 5 --model small --batch 32
  python bench/inr.py --only recon --datasets digits
  python bench/inr.py --only recon --datasets photos --photo-size 64 --variants lainr global
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from glue_jax.configs import lainr as lainr_configs  # noqa: E402
from glue_jax.projects.lainr import image_sources, novel_views  # noqa: E402
from glue_jax.projects.lainr import reconstruction as lainr  # noqa: E402
from glue_jax.train import step as step_lib  # noqa: E402
from glue_jax.models import lainr as lainr_lib  # noqa: E402
from glue_jax.train import writers  # noqa: E402
import bench_io  # noqa: E402  (bench/ is sys.path[0] when run as a script)

NAME = "inr"
VARIANTS = ("lainr", "global", "single_band", "no_select")


def init_seeds(cfg, seeds):
  """(graphdef, params stacked over seeds) from one compiled initialiser."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: lainr_lib.LAINR(cfg, rngs=nnx.Rngs(0))))
  keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
  make = lambda k: nnx.to_pure_dict(nnx.state(lainr_lib.LAINR(
      cfg, rngs=nnx.Rngs(jax.random.wrap_key_data(k)))))
  return graphdef, jax.jit(jax.vmap(make))(keys)


def num_params(params) -> int:
  return int(sum(x[0].size for x in jax.tree.leaves(params)))


def train_seeds(step, state, batch_fn, steps, seeds, desc):
  """Runs the vmapped step; returns the state, the final train loss per seed,
  the compile time, the steady-state steps/s (all seeds together) and the loss
  curve ``[(step, [loss per seed]), ...]`` every 50 steps (plateau escapes)."""
  keys = jnp.stack([jax.random.key(s) for s in seeds])
  t0 = time.time()
  state, m = step(state, batch_fn(0), keys)
  jax.block_until_ready(m)
  compile_s = time.time() - t0
  curve = [(1, np.asarray(m["loss"]).tolist())]
  t0 = time.time()
  for i in range(1, steps):
    state, m = step(state, batch_fn(i), keys)
    if (i + 1) % 50 == 0:
      curve.append((i + 1, np.asarray(m["loss"]).tolist()))
    if i % 100 == 0:
      print(f"  {desc}: step {i}/{steps} loss {np.asarray(m['loss']).round(4)}", flush=True)
  jax.block_until_ready(m)
  rate = (steps - 1) / max(time.time() - t0, 1e-9)
  return state, np.asarray(m["loss"]), compile_s, rate, curve


def recon(dataset: str, args, seeds) -> list[dict]:
  size = args.photo_size if dataset == "photos" else 0
  config = lainr_configs.get_config(f"dataset={dataset},model={args.model},size={size}")
  config.data.update(num_train=args.num_train, num_test=args.num_test)
  config.train.batch_size = args.batch
  config.optim.lr = args.lr
  if args.num_latents:
    config.model.num_latents = args.num_latents
  frac = 1.0 if dataset == "digits" else args.photo_pixel_fraction
  train_src, test_images, _ = image_sources.sources(config)
  train_images = image_sources.first_images(train_src, 0)
  bs = config.train.batch_size
  batch_fn = lambda i: {"image": np.stack([train_images[np.random.default_rng([s, i]).choice(
      len(train_images), bs)] for s in seeds])}
  shown = {"ground truth": test_images[:6].astype(np.float32) / 255.0}
  rows = reference_rows("recon", dataset, train_images, test_images, {
      "ref: mean train image": lambda tr, te: tr.mean(0),
      "ref: per-image mean colour": lambda tr, te: te.mean((1, 2), keepdims=True)})
  for variant in args.variants:
    cfg = lainr.model_config(config, image_size=config.data.image_size, in_channels=3,
                             coord_dim=2, out_dim=3, variant=variant)
    graphdef, params = init_seeds(cfg, seeds)
    tx = step_lib.make_optimizer(lr=config.optim.lr, grad_clip=0.0)
    state = jax.jit(jax.vmap(lambda p: step_lib.init_state(p, tx, ema=False)))(params)
    step = jax.jit(jax.vmap(step_lib.make_step(lainr.make_loss(graphdef, pixel_fraction=frac),
                                               tx)), donate_argnums=(0,))
    state, loss, compile_s, rate, curve = train_seeds(step, state, batch_fn, args.steps, seeds,
                                               f"{dataset}/{variant}")
    fn = lainr.make_reconstruct(graphdef, 4096)
    h = config.data.image_size
    ev = jax.jit(jax.vmap(lambda p, x: lainr.psnr(fn(p, x, h, h), lainr.to_unit(x)),
                          in_axes=(0, None)))
    scores = np.concatenate([np.asarray(ev(state["params"], test_images[i:i + 64]))
                             for i in range(0, len(test_images), 64)], axis=1)
    per_seed = scores.mean(1)
    p0 = jax.tree.map(lambda x: x[0], state["params"])
    shown[variant] = np.asarray(fn(p0, test_images[:6], h, h))
    rows.append(dict(task="recon", dataset=dataset, size=h, variant=variant,
                     psnr_mean=float(per_seed.mean()), psnr_std=float(per_seed.std()),
                     psnr_per_seed=per_seed.tolist(), train_loss=loss.tolist(), loss_curve=curve,
                     steps=args.steps, batch=bs, pixel_fraction=frac,
                     params=num_params(state["params"]), compile_s=compile_s,
                     steps_per_s=rate, test_images=int(scores.shape[1])))
    print(f"{dataset:7s} {variant:12s} PSNR {per_seed.mean():6.2f} +- {per_seed.std():.2f}  "
          f"({rate:.1f} steps/s x {len(seeds)} seeds, compile {compile_s:.0f}s)", flush=True)
    if dataset == "digits" and variant in ("lainr", "global") and args.decode_size:
      rows.extend(throughput(graphdef, p0, test_images[:4], variant, args))
  save_rows_png(args.out, f"recon_{dataset}{config.data.image_size}", shown)
  return rows


def reference_rows(task, dataset, train, test, predictors) -> list[dict]:
  """PSNR of trivial predictors on the test images (uint8 arrays), for scale."""
  train, test = train.astype(np.float32) / 255.0, test.astype(np.float32) / 255.0
  rows = []
  for name, predict in predictors.items():
    pred = np.broadcast_to(predict(train, test), test.shape)
    mse = np.square(pred - test).reshape(len(test), -1).mean(-1)
    rows.append(dict(task=task, dataset=dataset, size=test.shape[-2], variant=name,
                     psnr_mean=float(np.mean(-10 * np.log10(mse))), psnr_std=0.0,
                     psnr_per_seed=[], steps=0, params=0, steps_per_s=0.0))
    print(f"{dataset:7s} {name:28s} PSNR {rows[-1]['psnr_mean']:6.2f}", flush=True)
  return rows


def throughput(graphdef, params, images, variant, args) -> list[dict]:
  """Coordinates/s of chunked decoding at each of ``args.decode_size``^2 (batch 4)."""
  rows = []
  for size in args.decode_size:
    res = {}
    for chunk in args.chunks:
      fn = lainr.make_reconstruct(graphdef, chunk)
      out = fn(params, images, size, size)
      jax.block_until_ready(out)
      t0, reps = time.time(), 3
      for _ in range(reps):
        out = fn(params, images, size, size)
      jax.block_until_ready(out)
      res[chunk] = len(images) * size ** 2 * reps / (time.time() - t0)
      print(f"decode {variant:8s} {size}^2 chunk {chunk:6d}: "
            f"{res[chunk] / 1e6:.3f} M coords/s (includes encoding)", flush=True)
    rows.append(dict(task="decode", variant=variant, size=size, batch=len(images),
                     coords_per_s={str(k): v for k, v in res.items()}))
  return rows


def nvs(args, seeds) -> list[dict]:
  from glue_jax.projects.lainr import multiview_data as multiview
  from glue_jax.projects.lainr import radiance_field as nvs_lib
  config = lainr_configs.get_config(f"task=nvs,model={args.model}")
  config.optim.lr = args.nvs_lr
  if args.num_latents:
    config.model.num_latents = args.num_latents
  nc = config.nvs
  nc.update(num_objects=args.nvs_objects, num_test_objects=args.nvs_test_objects,
            num_samples=args.nvs_samples,
            rays_per_instance=args.nvs_rays, image_size=args.nvs_size,
            patch_size=max(1, args.nvs_size // 8), support_views=args.support_views,
            query_views=2)
  sig, sig_q = lainr_configs.bands(args.nvs_size, base=(64.0, 16.0), base_q=8.0, ref=128)
  nc.update(sigmas=sig, sigma_q=sig_q)
  t0 = time.time()
  train = multiview.procedural(nc.num_objects, nc.num_views, nc.image_size, seed=0)
  test = multiview.procedural(nc.num_test_objects, nc.num_views, nc.image_size, seed=1)
  print(f"procedural multi-view set: {time.time() - t0:.1f}s", flush=True)
  config.train.batch_size = args.nvs_batch
  objects = [{k: train[k][o] for k in ("images", "poses", "focal")}
             for o in range(len(train["images"]))]

  def one_batch(i, s):
    rng = np.random.default_rng([s, i, 7])
    views = [nvs_lib.choose_views(nc.support_views, nc.query_views, objects[o], rng)
             for o in rng.choice(len(objects), args.nvs_batch)]
    return {k: np.stack([v[k] for v in views]) for k in views[0]}
  batch_fn = lambda i: jax.tree.map(lambda *x: np.stack(x), *[one_batch(i, s) for s in seeds])
  n_sup = nc.support_views
  query = lambda d: d["images"][:, n_sup:].reshape(-1, *d["images"].shape[2:])
  shown = {"ground truth": test["images"][:6, n_sup].astype(np.float32) / 255.0}
  rows = reference_rows("nvs", "procedural", query(train), query(test), {
      "ref: white image": lambda tr, te: np.ones_like(te),
      "ref: mean train view": lambda tr, te: tr.mean(0)})
  for variant in ("lainr", "global"):
    config.model.variant = variant
    mcfg, rcfg = novel_views.setup(config)
    graphdef, params = init_seeds(mcfg, seeds)
    tx = step_lib.make_optimizer(lr=config.optim.lr, grad_clip=0.0)
    state = jax.jit(jax.vmap(lambda p: step_lib.init_state(p, tx, ema=False)))(params)
    step = jax.jit(jax.vmap(step_lib.make_step(
        nvs_lib.make_loss(graphdef, rcfg, nc.rays_per_instance), tx)), donate_argnums=(0,))
    state, loss, compile_s, rate, curve = train_seeds(step, state, batch_fn, args.nvs_steps, seeds,
                                               f"nvs/{variant}")
    render = jax.jit(nvs_lib.make_render_views(graphdef, rcfg, nc.chunk))
    per_seed = []
    for k in range(len(seeds)):
      p = jax.tree.map(lambda x: x[k], state["params"])
      scores, renders = nvs_lib.evaluate(render, p, test, nc.support_views)
      per_seed.append(float(scores.mean()))
      if k == 0:
        shown[variant] = renders[:6, 0]                     # first query view, 6 objects
    per_seed = np.asarray(per_seed)
    rows.append(dict(task="nvs", dataset="procedural", size=nc.image_size, variant=variant,
                     psnr_mean=float(per_seed.mean()), psnr_std=float(per_seed.std()),
                     psnr_per_seed=per_seed.tolist(), train_loss=loss.tolist(), loss_curve=curve,
                     steps=args.nvs_steps, batch=args.nvs_batch,
                     support_views=nc.support_views, samples_per_ray=nc.num_samples,
                     rays_per_instance=nc.rays_per_instance,
                     params=num_params(state["params"]), compile_s=compile_s,
                     steps_per_s=rate))
    print(f"nvs     {variant:12s} PSNR {per_seed.mean():6.2f} +- {per_seed.std():.2f}  "
          f"({rate:.1f} steps/s x {len(seeds)} seeds, compile {compile_s:.0f}s)", flush=True)
  save_rows_png(args.out, "nvs", shown)
  return rows


def save_rows_png(out: str, tag: str, shown: dict) -> None:
  """``<out stem>_<tag>.png``: one row per entry of ``shown`` (images in [0, 1]), seed 0."""
  imgs = np.concatenate([np.clip(np.asarray(v, np.float32), 0, 1) for v in shown.values()])
  grid = writers.image_grid((imgs * 255).round().astype(np.uint8),
                            ncols=len(next(iter(shown.values()))))
  path = f"{os.path.splitext(out)[0]}_{tag}.png"
  writers.save_png(path, grid, scale=max(1, 128 // imgs.shape[1]))
  print(f"{path}: rows {', '.join(shown)}", flush=True)


def table(rows) -> str:
  lines = ["| task | data | variant | PSNR (dB) mean ± std | seeds | steps | params | steps/s |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["task"] == "decode":
      continue
    if r["variant"].startswith("ref:"):
      lines.append(f"| {r['task']} | {r['dataset']} {r['size']}px | {r['variant']} | "
                   f"{r['psnr_mean']:.2f} | - | - | - | - |")
      continue
    lines.append(f"| {r['task']} | {r['dataset']} {r['size']}px | {r['variant']} | "
                 f"{r['psnr_mean']:.2f} ± {r['psnr_std']:.2f} | {len(r['psnr_per_seed'])} | "
                 f"{r['steps']} | {r['params']:,} | {r['steps_per_s']:.1f} |")
  dec = [r for r in rows if r["task"] == "decode"]
  if dec:
    lines += ["", "| decode | size | chunk | M coords/s |", "|---|---|---|---|"]
    for r in dec:
      for chunk, v in r["coords_per_s"].items():
        lines.append(f"| {r['variant']} | {r['size']}² x{r['batch']} | {chunk} | {v / 1e6:.3f} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", choices=("all", "recon", "nvs"), default="all")
  ap.add_argument("--datasets", nargs="+", default=["digits", "photos"])
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
  ap.add_argument("--model", default="tiny", help="tiny | small | paper preset")
  ap.add_argument("--num-latents", type=int, default=16, help="R (0: the preset's)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--lr", type=float, default=1e-2)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--num-train", type=int, default=1024)
  ap.add_argument("--num-test", type=int, default=128)
  ap.add_argument("--photo-pixel-fraction", type=float, default=0.25)
  ap.add_argument("--photo-size", type=int, default=0, help="photo crop side (0: config, 32)")
  ap.add_argument("--nvs-steps", type=int, default=600)
  ap.add_argument("--nvs-lr", type=float, default=3e-3)
  ap.add_argument("--nvs-objects", type=int, default=128)
  ap.add_argument("--nvs-test-objects", type=int, default=16)
  ap.add_argument("--nvs-batch", type=int, default=4)
  ap.add_argument("--nvs-samples", type=int, default=16)
  ap.add_argument("--nvs-rays", type=int, default=64)
  ap.add_argument("--nvs-size", type=int, default=32)
  ap.add_argument("--support-views", type=int, default=2)
  ap.add_argument("--decode-size", type=int, nargs="+", default=[256],
                  help="decode resolutions of the throughput rows")
  ap.add_argument("--chunks", type=int, nargs="+", default=[4096, 65536])
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 f"{NAME}.json"))
  args = ap.parse_args()
  seeds = list(range(args.seeds))
  t0, cpu0 = time.time(), time.process_time()
  rows = []
  if args.only in ("all", "recon"):
    for ds in args.datasets:
      rows += recon(ds, args, seeds)
  if args.only in ("all", "nvs"):
    rows += nvs(args, seeds)
  total, cpu = time.time() - t0, time.process_time() - cpu0
  print(table(rows))
  print(f"total {total:.0f}s wall, {cpu:.0f}s CPU, load average {os.getloadavg()}")
  bench_io.write_json(args.out, {"rows": rows, "args": vars(args), "total_s": total,
                                 "cpu_s": cpu})


if __name__ == "__main__":
  main()
