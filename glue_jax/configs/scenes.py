"""GLoD on procedural scenes: a prompt-conditioned SiT trained on CPU, then composed.

  python -m glue_jax.main --config=glue_jax/configs/scenes.py --workdir=workdirs/scenes
  --config=glue_jax/configs/scenes.py:runlocal    (smoke run: tiny data, few steps)
  --config=glue_jax/configs/scenes.py:steps=6000,batch=256  (longer generator training)
  --config=glue_jax/configs/scenes.py:patch=2,train_scenes=3000,steps=3000  (the first generator)

Arguments: runlocal, steps, batch, scenes (evaluated test scenes), patch (SiT patch on the
8x8 latent grid), hidden, depth, heads, train_scenes.

Stages (``glue_jax/projects/glod/scenes_pipeline.py``): TFDS scenes dataset -> npz of pixel-tokenizer
latents + prompt tokens -> ``glue_jax.train.diffusion_job.train`` -> probes ->
composition evaluation (``glue_jax/projects/glod/composition_eval.py``).
"""

import ml_collections

from glue_jax.configs import common

# The scenes vocabulary (glue_jax.projects.glod.scene_data.VOCAB) has 26 words; id 26 is null.
VOCAB_SIZE = 26
PROMPT_LENGTH = 14


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, steps=0, scenes=0, batch=0, patch=1, hidden=128,
                       depth=4, heads=4, train_scenes=0)
  fast = a.runlocal
  c = ml_collections.ConfigDict()
  c.kind = "scenes"
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      # Shapes only and four colours keep the CPU-sized generator learnable; the
      # dataset also draws digit glyphs ("zero".."nine") and cyan/magenta.
      image_size=24, identities=("square", "circle", "triangle", "cross"),
      colours=("red", "green", "blue", "yellow"),
      min_objects=2, max_objects=3, slots=2, jitter=False, num_train=a.train_scenes or (300 if fast else 20000),
      num_test=32 if fast else 200, seed=0))
  c.probes = ml_collections.ConfigDict(dict(
      crop=12, steps=60 if fast else 400, batch_size=128, lr=2e-3))
  t = common.diffusion_defaults()
  t.method = "sit"
  t.model.arch = "S/2"
  # 24 px canvas, pixel tokenizer factor 3 -> 8x8x27 latents; patch 1 -> 64 image
  # tokens of 3x3 pixels + 14 in-context prompt tokens.  Patch 2 (16 tokens of 6x6
  # pixels, the first generator) drew objects as patch-sized colour quadrants;
  # patch 1 with 20,000 scenes draws clean objects (bench/RESULTS.md, GLoD).
  t.model.overrides = {"depth": a.depth, "hidden_size": a.hidden, "num_heads": a.heads,
                       "patch_size": a.patch,
                       "prompt_length": PROMPT_LENGTH, "prompt_pooled": True,
                       "class_dropout_prob": 0.1}
  t.data = common.data_defaults(name="npz", path="", num_classes=VOCAB_SIZE)
  t.first_stage = {"name": "pixel", "factor": 3, "channels": 3, "scale": 1.0, "shift": 0.0}
  # hidden_size must be >= patch^2*27 outputs per token (108 at patch 2).  With hidden 96 (the
  # first runs, bench/results/composition_h96*.json) 12 noise directions per
  # token were never removed by the sampler (SiT warns) and samples kept
  # per-pixel noise; 128 removes that bound.
  t.train.update(steps=a.steps or (20 if fast else 4000), batch_size=a.batch or (32 if fast else 128),
                 log_every=10 if fast else 100, ema_decay=0.999, ema_warmup=True,
                 sample_every=0)   # the trainer's grid sampler draws class labels, not prompts
  t.optim.lr = 1e-3
  t.checkpoint.every = 500
  t.sampler = {"sampler": "sde", "num_steps": 50, "t_last": 0.04, "cfg_scale": 3.0,
               "global_cfg_scale": None, "interval": (0.0, 1.0), "vae_cfg": False}
  c.train = t
  c.eval = ml_collections.ConfigDict(dict(
      num_scenes=a.scenes or (8 if fast else 48), seeds=(0,),
      methods=("global", "single", "composable", "glod_A", "glod_B", "glod_C"),
      sampler="sde", num_steps=5 if fast else 20, batch_size=64,
      cfg_scale=3.0,            # w_g: global prompt (and the single/global CFG baselines)
      # w_l: local prompts (GLoD) / concept weight (Composable).  With w_l == w_g
      # and one global prompt, variants B and C are the same function.
      local_scale=2.0,
      local_interval=(0.0, 1.0), overlap="sum", feather=0.0,
      layout_scale=0.0, layout_t_min=0.7))
  return c
