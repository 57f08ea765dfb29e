"""Input-pipeline throughput per host vs. what the train step consumes.

Rows (images/s of wall time, steady state after a warm-up, this host; and
images per CPU-second of this process, which other load on a shared host
does not change; worker processes' CPU is not in it):
- ``jpeg+crop``: ImageNet-like decoding: a TFDS-like ArrayRecord source of
  skimage photos resized to typical ImageNet sizes and re-encoded as JPEG
  (q 90), decoded with PIL and ADM-center-cropped to 256, through the Grain
  training pipeline with 0 and 2 worker processes;
- ``feature store``: the training reader over a store with REGLUE's 256 px
  shapes (latent_moments 32x32x8 f32, semantic 16x16x16 f32, cls 768 f32, and
  with/without align_target 256x768 bf16), 0 and 2 workers;
- ``store write``: writing those records (ArrayRecord, group_size:1, zstd);
- ``precompute``: tools/precompute's writer end to end with a small random
  DINOv2 + SD-VAE-structured VAE + compressor (``--full``: DINOv2-B/14 and the
  full SD VAE; meant for accelerators);
- ``train step``: a tiny SiT/REGLUE config's step on this host (for reference:
  on an H100 a SiT-XL/2 REGLUE step consumes ~500 img/s).

  python bench/loader.py            # quick (a few minutes on 2 CPU cores)
  python bench/loader.py --n 2048 --batch 64 --full
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_io  # noqa: E402

NAME = "loader"
SIZES = [(500, 375), (500, 333), (375, 500), (500, 500), (640, 480), (800, 600),
         (333, 500), (1024, 768)]


class JpegRecords:
  """TFDS-like random access ``i -> {'image': jpeg bytes, 'label'}`` over an
  ArrayRecord file (picklable: the reader opens lazily in each process)."""

  def __init__(self, path: str, n: int):
    self.path, self.n, self._reader = path, n, None

  def __getstate__(self):
    return {"path": self.path, "n": self.n, "_reader": None}

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if self._reader is None:
      from array_record.python import array_record_module
      self._reader = array_record_module.ArrayRecordReader(self.path, "readahead_buffer_size:0")
    return {"image": self._reader.read([int(i)])[0], "label": int(i) % 1000}


def make_jpegs(path: str, n: int) -> float:
  """Writes ``n`` JPEGs; returns their mean size in bytes."""
  import skimage.data as sd
  from array_record.python import array_record_module
  from PIL import Image
  photos = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket(), sd.retina(),
            sd.hubble_deep_field(), sd.coffee()[::-1], sd.immunohistochemistry()]
  encoded = []
  for k in range(len(photos) * 2):
    img = Image.fromarray(photos[k % len(photos)]).resize(SIZES[k % len(SIZES)],
                                                          Image.BICUBIC)
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=90)
    encoded.append(b.getvalue())
  w = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for i in range(n):
    w.write(encoded[i % len(encoded)])
  w.close()
  return float(np.mean([len(e) for e in encoded]))


def time_iter(it, batches: int, batch: int, warmup: int = 2) -> tuple[float, float]:
  """``(images/s wall, images per CPU-second of this process)``; the second
  is robust to other load on the host (it misses worker processes' CPU)."""
  for _ in range(warmup):
    next(it)
  t, c = time.perf_counter(), time.process_time()
  for _ in range(batches):
    b = next(it)
    for v in b.values():         # a host copy, as the transfer to devices makes
      np.array(v, copy=True)
  n = batches * batch
  return n / (time.perf_counter() - t), n / max(time.process_time() - c, 1e-9)


def bench_jpeg(tmp, args, rows):
  from glue_jax.data import imagenet
  path = os.path.join(tmp, "jpegs.array_record")
  mean_bytes = make_jpegs(path, args.n)
  src = imagenet.ImageSource(JpegRecords(path, args.n), image_size=256, name="synthetic")
  for workers in (0, 2):
    ds = imagenet.make_image_dataset(src, batch_size=args.batch, seed=0,
                                     worker_count=workers, read_threads=args.threads)
    it = iter(ds)
    rate, cpu = time_iter(it, args.batches, args.batch)
    rows.append({"stage": "jpeg+crop 256", "workers": workers, "img_per_s": rate,
                 "img_per_cpu_s": cpu if not workers else None,
                 "note": f"PIL decode, mean JPEG {mean_bytes / 1e3:.0f} kB, "
                         f"{args.threads} threads/process"})
    _close(it)


def _close(it):
  close = getattr(it, "close", None)
  if close:
    close()


def _store_features(align: bool) -> dict:
  f = {"latent_moments": {"shape": [32, 32, 8], "dtype": "float32"},
       "semantic": {"shape": [16, 16, 16], "dtype": "float32"},
       "cls": {"shape": [768], "dtype": "float32"}}
  if align:
    f["align_target"] = {"shape": [256, 768], "dtype": "bfloat16"}
  return f


def bench_store(tmp, args, rows):
  import ml_dtypes
  from glue_jax.data import feature_reader, feature_store, pipeline
  n = args.n
  source = _FakeImages(n)
  feats = _store_features(True)
  rng = np.random.default_rng(0)
  table = {k: rng.normal(size=(args.batch, *v["shape"])).astype(
      ml_dtypes.bfloat16 if v["dtype"] == "bfloat16" else np.float32) for k, v in feats.items()}
  extract = lambda x: table
  directory = os.path.join(tmp, "store", "train")
  t, c = time.perf_counter(), time.process_time()
  m = feature_store.write_split(directory, source=source, extract=extract, split="train",
                                dataset={"name": "synthetic"}, identity={}, preprocessing={},
                                features=feats, examples_per_shard=256,
                                batch_size=args.batch, progress=False, read_threads=0)
  rate, cpu = n / (time.perf_counter() - t), n / (time.process_time() - c)
  size = sum(s["bytes"] for s in m["shards"]) / n
  rows.append({"stage": "store write", "workers": 0, "img_per_s": rate, "img_per_cpu_s": cpu,
               "note": f"{size / 1e3:.0f} kB/example incl. align_target (zstd:3)"})
  for keys, label in ((["latent_moments", "semantic", "cls"], "no align_target"),
                      (None, "with align_target")):
    src = feature_reader.open_store(directory, keys=keys)
    for workers in (0, 2):
      it = iter(pipeline.make_dataset(src, batch_size=args.batch, seed=0,
                                      worker_count=workers, read_threads=args.threads))
      rate, cpu = time_iter(it, args.batches, args.batch)
      rows.append({"stage": f"feature store read ({label})", "workers": workers,
                   "img_per_s": rate, "img_per_cpu_s": cpu if not workers else None,
                   "note": ""})
      _close(it)


class _FakeImages:
  """Images are not needed when the extractor is a constant table."""

  def __init__(self, n):
    self.n = n
    self.ex = {"image": np.zeros((256, 256, 3), np.uint8), "label": 0}

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.ex


def bench_precompute(tmp, args, rows):
  import jax
  from flax import nnx
  from glue_jax.data import feature_store, imagenet
  from glue_jax.models import compressor as compressor_lib
  from glue_jax.models import dinov2, semantic_encoder as se, vae as vae_lib
  from glue_jax.tools import precompute
  path = os.path.join(tmp, "jpegs.array_record")
  n = args.precompute_n
  if not os.path.exists(path):
    make_jpegs(path, n)
  src = imagenet.ImageSource(JpegRecords(path, n), image_size=256, name="synthetic")
  if args.full:
    vit_cfg = dinov2.dinov2_config("vitb14_reg")
    vae_cfg = vae_lib.VAEConfig()
    hidden = 256
  else:
    vit_cfg = dinov2.Dinov2Config(dim=192, depth=4, num_heads=3, num_registers=4)
    vae_cfg = vae_lib.VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
    hidden = 64
  layers = tuple(range(vit_cfg.depth - 4, vit_cfg.depth))
  vit = _random(lambda: dinov2.Dinov2(vit_cfg, rngs=nnx.Rngs(0)))
  comp = _random(lambda: compressor_lib.Compressor(compressor_lib.CompressorConfig(
      channels=(4 * vit_cfg.dim, hidden, 16)), rngs=nnx.Rngs(0)))
  vae = _random(lambda: vae_lib.AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)))
  stats = (np.zeros(4 * vit_cfg.dim, np.float32), np.ones(4 * vit_cfg.dim, np.float32))
  senc = se.SemanticEncoder(vit, se.SemanticSpec(layers, 224, "compressor"), stats=stats,
                            compressor=comp)
  extract, identity = precompute.make_extractor(precompute.vae_first_stage(vae),
                                                precompute.semantic_component(senc))
  bs = args.precompute_batch
  x = np.stack([src.load(i)["image"] for i in range(bs)])
  t = time.perf_counter()
  jax.block_until_ready(extract(x))
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(extract(x))
  compute_rate = bs / (time.perf_counter() - t)
  directory = os.path.join(tmp, "pre", "train")
  t, c = time.perf_counter(), time.process_time()
  feature_store.write_split(directory, source=src, extract=extract, split="train",
                            dataset={"name": "synthetic"}, identity=identity,
                            preprocessing={"image_size": 256}, examples_per_shard=4 * bs,
                            batch_size=bs, progress=False, read_threads=args.threads)
  rate, cpu = n / (time.perf_counter() - t), n / (time.process_time() - c)
  what = "DINOv2-B/14-reg + SD-VAE" if args.full else \
      f"random DINOv2 {vit_cfg.dim}x{vit_cfg.depth} + VAE {vae_cfg.block_out_channels}"
  rows.append({"stage": "precompute end to end", "workers": 0, "img_per_s": rate,
               "img_per_cpu_s": cpu,
               "note": f"{what}, batch {bs}; compute alone {compute_rate:.1f} img/s, "
                       f"compile {compile_s:.0f} s"})


def _random(make, seed=0):
  """Random weights drawn with numpy (no init compile; values do not matter)."""
  from flax import nnx
  module = nnx.eval_shape(make)
  rng = np.random.default_rng(seed)
  for path, v in nnx.to_flat_state(nnx.state(module)):
    shape = v.shape
    if path[-1] in ("var", "scale") or "gamma" in path:
      v.set_value(np.ones(shape, np.float32))
    elif len(shape) <= 1 or path[-1] in ("mean", "bias"):
      v.set_value(np.zeros(shape, np.float32))
    else:
      fan_in = int(np.prod(shape[:-1]))
      v.set_value((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))
  return module


def bench_train_step(args, rows):
  import jax
  from glue_jax import sharding
  from glue_jax import diffusion_job
  from glue_jax import sharding
  from glue_jax.train import step as step_lib
  from glue_jax.transport import objective
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests import train_utils
  tmp = tempfile.mkdtemp()
  try:
    path = train_utils.write_features(os.path.join(tmp, "train.npz"), n=64)
    cfg = train_utils.tiny_config(path, batch=args.train_batch)
    run = diffusion_job.build(cfg)
    params = diffusion_job.init_params(run, 0)
    with jax.set_mesh(run.mesh), sharding.logical_rules(run.rules, run.mesh):
      state = jax.jit(lambda p: step_lib.init_state(p, run.tx),
                      out_shardings=run.state_shardings)(params)
      step = jax.jit(objective.make_train_step(run.graphdef, run.tx, run.step_cfg),
                     in_shardings=(run.state_shardings, run.batch_shardings, None),
                     donate_argnums=(0,))
      ex = [run.source[i] for i in range(args.train_batch)]
      batch = sharding.global_batch({k: np.stack([e[k] for e in ex]) for k in ex[0]},
                                    run.batch_shardings)
      key = jax.random.key(0)
      state, m = step(state, batch, key)
      jax.block_until_ready(m)
      t, c = time.perf_counter(), time.process_time()
      for _ in range(args.train_steps):
        state, m = step(state, batch, key)
      jax.block_until_ready(m)
      n = args.train_steps * args.train_batch
      rate, cpu = n / (time.perf_counter() - t), n / (time.process_time() - c)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  rows.append({"stage": "train step (tiny SiT, this CPU)", "workers": 0, "img_per_s": rate,
               "img_per_cpu_s": cpu,
               "note": f"tests/train_utils.tiny_config, batch {args.train_batch}, "
                       f"{jax.device_count()} devices"})
  rows.append({"stage": "train step (SiT-XL/2 REGLUE, H100, reference)", "workers": 0,
               "img_per_s": 500.0, "img_per_cpu_s": None, "note": "given, not measured here"})


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=512, help="examples in the synthetic sources")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=16, help="timed batches per row")
  p.add_argument("--threads", type=int, default=8, help="Grain read threads per process")
  p.add_argument("--precompute_n", type=int, default=64)
  p.add_argument("--precompute_batch", type=int, default=16)
  p.add_argument("--train_batch", type=int, default=16)
  p.add_argument("--train_steps", type=int, default=10)
  p.add_argument("--full", action="store_true", help="full-size DINOv2-B + SD-VAE")
  p.add_argument("--skip", default="", help="comma list of: jpeg,store,precompute,train")
  args = p.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()       # Grain's worker processes read absl flags
  skip = set(filter(None, args.skip.split(",")))
  rows = []
  tmp = tempfile.mkdtemp(prefix="bench_loader_")
  try:
    if "jpeg" not in skip:
      bench_jpeg(tmp, args, rows)
    if "store" not in skip:
      bench_store(tmp, args, rows)
    if "precompute" not in skip:
      bench_precompute(tmp, args, rows)
    if "train" not in skip:
      bench_train_step(args, rows)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"\n{'stage':<48} {'workers':>7} {'img/s':>9} {'img/CPU-s':>9}  note")
  for r in rows:
    cpu = r.get("img_per_cpu_s")
    cpu = f"{cpu:>9.1f}" if cpu else f"{'-':>9}"
    print(f"{r['stage']:<48} {r['workers']:>7} {r['img_per_s']:>9.1f} {cpu}  {r['note']}")
  bench_io.write_json(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{NAME}.json"), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
  main()
