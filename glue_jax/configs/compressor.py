"""Semantic compressor training (REGLUE Sec. 3.2; ``config.kind = 'compressor'``).

  ImageNet (official recipe: DINOv2-B/14-reg blocks 8-11, released statistics,
  3072 -> 256 -> 16, Adam 1e-3, cosine per epoch T_max 100 / eta_min 1e-4, 25 epochs, batch 4096):
    --config=glue_jax/configs/compressor.py:dinov2=/path/dinov2_vitb14_reg
  Last layer only (Table 1 rows i-k):  ...:layers=11,stats=own
  Digits (the demo's encoder, CPU):
    --config=glue_jax/configs/compressor.py:digits,dinov2=workdirs/demo/encoder_vit.npz
  Smoke run: ...:runlocal (2 epochs, small batch)
"""

import ml_collections

from glue_jax.configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, dinov2="", stats="released", data="tfds:imagenet2012",
                       layers="8,9,10,11", epochs=25, batch_size=4096, loss="mse",
                       out_channels=16, digits=False, runlocal=False, seed=0)
  c = ml_collections.ConfigDict()
  c.kind = "compressor"
  c.seed = a.seed
  c.encoder = ml_collections.ConfigDict({"weights": a.dinov2, "variant": ""})
  c.layers = tuple(int(x) for x in a.layers.split(","))
  c.input_size = 224              # DINOv2 input (256 px images -> bicubic 224)
  # 'released': the official statistics (blocks 8-11 only); 'own': computed over
  # `stats_images` train images by compressor_job.feature_statistics; or a path.
  if a.stats == "released":
    if c.layers != (8, 9, 10, 11):
      raise ValueError("the released statistics are for blocks 8-11; use stats=own")
    c.stats = common.RELEASED_STATS
  else:
    c.stats = "" if a.stats == "own" else a.stats
  c.stats_images = 77_000         # the official script saw ~77K images, unshuffled
  c.hidden_channels = (256,)
  c.out_channels = a.out_channels
  c.loss = a.loss                 # 'mse' | 'mse_kl'
  c.kl_weight = 1e-6
  c.epochs = a.epochs             # train.steps = epochs x steps per epoch (set by the job)
  common.trainer_sections(c, steps=0, batch_size=a.batch_size, log_every=50, ckpt_every=500,
                          keep=2, lr=1e-3, grad_clip=0.0)
  c.optim.update(schedule="cosine_per_epoch", t_max_epochs=100, eta_min=1e-4)
  c.data = common.data_defaults(name=a.data, image_size=256, val_split="validation",
                                val_images=10_000, data_dir="")
  if a.digits:
    c.data.update(name="digits", image_size=16, val_split="test", val_images=0)
    c.layers = (0, 1, 2, 3)
    c.input_size = 0              # the demo's ViT reads 16 px digits as they are
    c.stats = "" if a.stats == "released" else c.stats
    c.stats_images = 0
    c.hidden_channels = (64,)
    c.epochs = a.epochs if a.epochs != 25 else 4
    c.train.batch_size = a.batch_size if a.batch_size != 4096 else 128
    c.train.log_every = 5
    c.checkpoint.every = 25
  if a.runlocal:
    c.epochs = 2
    c.train.batch_size = min(c.train.batch_size, 64)
    c.data.val_images = min(c.data.val_images or 256, 256)
  return c
