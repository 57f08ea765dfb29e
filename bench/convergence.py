"""Convergence on the digits benchmark: SiT vs REPA vs REG vs REGLUE at equal steps.

  python bench/convergence.py                       # 4 methods x 3 seeds, CPU-sized
  python bench/convergence.py --steps=1200 --methods=sit,repa,reg,reglue,redi
  python bench/convergence.py --steps=1200 --methods=reglue --dtypes=float32,bfloat16 \
      --out=bench/results/convergence_precision.json      # bf16 vs fp32 within the seed spread

Every method trains the demo's network (glue_jax/configs/demo.py: SiT depth 4, hidden 128) on the
demo's precomputed digits features (the same encoder, compressor and data for
all methods; only the switches of ``glue_jax.methods`` differ) with the same
steps, batch, optimizer and seeds.  ``--dtypes`` also trains each method in
several compute dtypes (``model.overrides.dtype``: parameters and optimizer stay
fp32, activations and matmuls in the given dtype, as ``configs/reglue.py:bf16``).  Samples (SDE + CFG, balanced labels) are
scored with a digits CNN trained separately on the train split
(``glue_jax.eval.digits_classifier``, not the demo's encoder):

- FD: Frechet distance of its 64-d penultimate features, samples vs the test split;
- acc: its accuracy on the conditional samples (label = requested class).

Prints mean +- std over seeds and writes ``bench/results/convergence.json`` plus
a sample-grid PNG per method beside it (seed 0).  Runs are resumable (the trainer's checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_io  # noqa: E402  (bench/ is sys.path[0] when run as a script)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--workdir", default="workdirs/convergence")
  ap.add_argument("--methods", default="sit,repa,reg,reglue")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--dtypes", default="float32", help="compute dtypes, e.g. float32,bfloat16")
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--num_samples", type=int, default=500)
  ap.add_argument("--sample_steps", type=int, default=50)
  ap.add_argument("--cfg_scale", type=float, default=2.0)
  ap.add_argument("--out", default="bench/results/convergence.json")
  args = ap.parse_args()

  import jax
  # Seeds of a method share programs: compile each once (persistent cache).
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from glue_jax.configs import demo as demo_config
  from glue_jax import api
  from glue_jax.projects.reglue import digits_demo as demo
  from glue_jax.data import digits
  from glue_jax.eval import digits_classifier, frechet
  from glue_jax import diffusion_job
  from glue_jax.train import writers

  base = demo_config.get_config()
  enc, fs, test = demo.prepare(base, os.path.join(args.workdir, "shared"))
  clf = digits_classifier.load_or_train(os.path.join(args.workdir, "digits_cnn.npz"),
                                        image_size=base.image_size, seed=1234)
  ref = clf.features(test["image"])
  mu_r, sig_r = frechet.statistics(ref)
  rows = []
  runs = [(m, d, s) for m in args.methods.split(",") for d in args.dtypes.split(",")
          for s in (int(s) for s in args.seeds.split(","))]
  for method, dtype, seed in runs:
    tc = base.train.copy_and_resolve_references()
    with tc.unlocked():
      tc.method, tc.seed, tc.train.steps = method, seed, args.steps
      tc.train.sample_every = 0
      tc.checkpoint.every = args.steps
      tc.model.overrides = dict(tc.model.overrides, dtype=dtype)
    name = method if dtype == "float32" else f"{method}_{dtype}"
    wd = os.path.join(args.workdir, f"{name}_seed{seed}")
    t0 = time.time()
    metrics = diffusion_job.train(tc, wd)
    train_s = time.time() - t0
    model = api.load_model(os.path.join(wd, "checkpoints"))
    labels = np.arange(args.num_samples) % digits.NUM_CLASSES
    imgs = []
    t0 = time.time()
    for i in range(0, args.num_samples, 250):
      idx = np.arange(i, min(i + 250, args.num_samples))
      x0, _ = model.sample(labels[idx], seed=10_000 + seed, indices=idx,
                           cfg_scale=args.cfg_scale, num_steps=args.sample_steps)
      imgs.append(np.asarray(fs.decode_uint8(x0[..., :model.config.latent_channels])))
    imgs = np.concatenate(imgs)
    sample_s = time.time() - t0
    feats = clf.features(imgs)
    fd = frechet.frechet_distance(*frechet.statistics(feats), mu_r, sig_r)
    acc = float((clf.logits(imgs).argmax(-1) == labels).mean())
    rows.append(dict(method=name, dtype=dtype, seed=seed, fd=float(fd), acc=acc,
                     final_loss=float(metrics.get("loss", np.nan)),
                     train_seconds=train_s, sample_seconds=sample_s))
    if seed == 0:   # next to the JSON: <out>_samples_<method>.png
      writers.save_png(f"{os.path.splitext(args.out)[0]}_samples_{name}.png",
                       writers.image_grid(imgs[:100], ncols=10), scale=2)
    print(json.dumps(rows[-1]))
  summary = {}
  for method in dict.fromkeys(r["method"] for r in rows):
    rs = [r for r in rows if r["method"] == method]
    summary[method] = {k: (float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs])))
                       for k in ("fd", "acc", "final_loss")}
  real_acc = clf.accuracy(test["image"], test["label"])
  print(f"\nDigits convergence: {args.steps} steps, batch {base.train.train.batch_size}, "
        f"{args.num_samples} samples ({args.sample_steps}-step SDE, CFG {args.cfg_scale}), "
        f"seeds {args.seeds}; classifier test accuracy {real_acc:.3f}")
  print(f"{'method':10s} {'FD (lower better)':>20s} {'class acc':>16s} {'final loss':>16s}")
  for m, s in summary.items():
    print(f"{m:10s} {s['fd'][0]:12.3f} ± {s['fd'][1]:5.3f} {s['acc'][0]:9.3f} ± {s['acc'][1]:.3f}"
          f" {s['final_loss'][0]:9.4f} ± {s['final_loss'][1]:.4f}")
  bench_io.write_json(args.out, dict(
      config=vars(args), classifier_test_accuracy=real_acc, rows=rows, summary=summary,
      batch_size=base.train.train.batch_size, jax_devices=str(jax.devices())))


if __name__ == "__main__":
  main()
