"""Feature-store precomputation (``python -m glue_jax.tools.precompute``).

  --config=glue_jax/configs/precompute.py:dataset=imagenet2012,data_dir=D,vae=V,dinov2=E,compressor=C
      ImageNet 256: SD-VAE posterior moments, DINOv2-B/14-reg blocks 8-11 (224 px
      input) standardized with the released statistics and compressed to
      16x16x16, [CLS], REPA targets (bfloat16; 'noalign' leaves them out).
      The argument list is one shell word (no spaces after the commas).
  --config=glue_jax/configs/precompute.py:preset=demo,demo_dir=workdirs/demo,data_dir=D
      the demo's digits at 16 px with the demo's trained ViT/compressor/statistics
      (pixel-tokenizer latents; blocks 0-3 of the 4-block encoder, no resize)

Arguments: dataset (digits|imagenet2012), data_dir (TFDS data dir), split,
image_size (0: 256, or 16 for digits), vae (weights; empty: pixel tokenizer),
dinov2 (weights), compressor (our .npz or the official .pth), stats
('released' or a path), layers ('8.9.10.11'), noalign, align_dtype, batch,
shard (examples per shard), on_corrupt (error|skip), threads.
"""

import os

import ml_collections

from glue_jax.configs import common, demo

RELEASED_STATS = common.RELEASED_STATS


def get_config(arg=None):
  a = common.parse_arg(arg, dataset="digits", data_dir="", split="train", image_size=0,
                       preset="", demo_dir="workdirs/demo", vae="", dinov2="",
                       variant="vitb14_reg", compressor="", stats="released",
                       layers="8.9.10.11", noalign=False, align_dtype="bfloat16", batch=64,
                       shard=1024, on_corrupt="error", threads=8)
  c = ml_collections.ConfigDict()
  c.kind = "precompute"
  c.dataset = a.dataset
  c.data_dir = a.data_dir
  c.split = a.split
  c.image_size = a.image_size or (16 if a.dataset == "digits" else 256)
  c.on_corrupt = a.on_corrupt
  c.first_stage = ml_collections.ConfigDict(
      {"name": "vae" if a.vae else "pixel", "path": a.vae, "factor": 2})
  c.encoder = ml_collections.ConfigDict(dict(
      path=a.dinov2, variant=a.variant, layers=tuple(int(x) for x in a.layers.split(".")),
      input_size=c.image_size * 7 // 8))        # 256 -> 224 (512 -> 448), as REPA/REGLUE
  c.compressor = ml_collections.ConfigDict(dict(
      path=a.compressor, stats=RELEASED_STATS if a.stats == "released" else a.stats,
      eps=0.0))                                 # official: (f - mean) / std
  c.outputs = ("first_stage", "semantic", "cls") + (() if a.noalign else ("align_target",))
  c.align_dtype = a.align_dtype
  c.batch_size = a.batch
  c.examples_per_shard = a.shard
  c.read_threads = a.threads
  c.writer_options = "group_size:1"
  c.data_parallel = True
  c.distributed = None
  if a.preset == "demo":
    # What glue_jax/projects/reglue/digits_demo.py writes and how its _features computes features.
    d = demo.get_config()
    c.dataset, c.image_size = "digits", d.image_size
    c.first_stage.update(name="pixel", factor=d.train.first_stage["factor"])
    c.encoder.update(path=os.path.join(a.demo_dir, "encoder_vit.npz"), variant="",
                     layers=tuple(d.encoder.layers), input_size=0)
    c.compressor.update(path=os.path.join(a.demo_dir, "compressor.npz"),
                        stats=os.path.join(a.demo_dir, "feature_stats.npz"), eps=1e-6)
  elif a.preset:
    raise ValueError(f"preset={a.preset!r}: '' or 'demo'")
  return c
