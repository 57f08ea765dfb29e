"""ImageNet 256 diffusion runs: SiT / REPA / REG / ReDi / REGLUE and ablations.

  --config=glue_jax/configs/reglue.py:model=XL/2,method=reglue
  --config=glue_jax/configs/reglue.py:model=B/2,method=h          (Table 1 row h = REG)
  --config=glue_jax/configs/reglue.py:runlocal                    (tiny smoke run)
  --config=glue_jax/configs/reglue.py:online,dinov2=DIR,compressor=compression_model.pth
      (DINOv2 + compressor inside the train step; the data source carries images)
  --config=glue_jax/configs/reglue.py:model=XL/2,bf16,tpu=v5e
      (TPU preset of the generation: mesh, remat, unrolled blocks; TPU_PRESETS,
      chosen with bench/tpu_compile.py, see bench/RESULTS.md)
"""

from glue_jax.configs import common
from glue_jax import methods

# Per TPU generation, for global batch 256 (XLA's compiler predictions,
# bench/tpu_compile.py; bench/RESULTS.md "TPU compile").  Blocks unrolled:
# XLA schedules and fuses across layers (and its cost model sees each one).
TPU_PRESETS = {
    "v5p": {"mesh": {"data": -1, "fsdp": 1}, "model": {"scan_layers": False, "remat": "none"}},
    "v6e": {"mesh": {"data": 1, "fsdp": -1}, "model": {"scan_layers": False, "remat": "none"}},
    # 'dots' (matmul outputs saved) needs 15.87 GiB of temporaries for XL/2: over 16 GiB HBM.
    "v5e": {"mesh": {"data": 1, "fsdp": -1}, "model": {"scan_layers": False, "remat": "full"}},
}


def get_config(arg=None):
  a = common.parse_arg(arg, model="XL/2", method="reglue", runlocal=False,
                       features="", bf16=False, online=False, dinov2="", compressor="",
                       pca="", stats="", tpu="")
  c = common.diffusion_defaults()
  c.model.arch = a.model
  c.method = a.method
  # Which encoder outputs the method's semantic grid needs (used by online
  # features and by tools/precompute): compressor on blocks 8-11 (multi-layer)
  # or on the last block, ReDi's PCA on the last block, or none.
  m = methods.get(a.method)
  c.features.mode = "online" if a.online else "precomputed"
  c.features.local = {"nonlinear": "compressor", "linear": "pca", "none": "none"}[m.local]
  c.features.layers = (8, 9, 10, 11) if m.multi_layer else (11,)
  if a.stats or not m.multi_layer:
    c.features.stats = a.stats     # released statistics exist for blocks 8-11 only
  c.features.dinov2, c.features.compressor, c.features.pca = a.dinov2, a.compressor, a.pca
  if "XL" in a.model and a.method in ("reglue", "m", "n"):
    # Released code: lambda_s x0.5 from 250K steps and x0.25 from 500K (XL only).
    c.loss.semantic_weight_schedule = ((250_000, 0.5), (500_000, 0.25))
  c.data.path = a.features
  if a.bf16:
    c.model.overrides = {"dtype": "bfloat16"}
  if a.tpu:
    if a.tpu not in TPU_PRESETS:
      raise ValueError(f"tpu={a.tpu!r}; one of {sorted(TPU_PRESETS)}")
    preset = TPU_PRESETS[a.tpu]
    c.mesh = dict(preset["mesh"])
    c.model.overrides = {**dict(c.model.overrides), **preset["model"]}
  if a.runlocal:
    c.train.update(batch_size=8, steps=20, log_every=5, sample_every=0, sample_steps=10)
    c.checkpoint.every = 10
    # hidden 96 >= 2 x 2 x (4 + 16) values per REGLUE token; merged so that
    # runlocal,bf16 (or a tpu preset) keeps its overrides.
    c.model.overrides = {**dict(c.model.overrides), "depth": 2, "hidden_size": 96,
                         "num_heads": 2, "encoder_depth": 1}
  return c
