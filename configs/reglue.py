"""ImageNet 256 diffusion runs: SiT / REPA / REG / ReDi / REGLUE and ablations.

  --config=configs/reglue.py:model=XL/2,method=reglue
  --config=configs/reglue.py:model=B/2,method=h          (Table 1 row h = REG)
  --config=configs/reglue.py:runlocal                    (tiny smoke run)
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, model="XL/2", method="reglue", runlocal=False,
                       features="", bf16=False)
  c = common.diffusion_defaults()
  c.model.arch = a.model
  c.method = a.method
  if "XL" in a.model and a.method in ("reglue", "m", "n"):
    # Released code: lambda_s x0.5 from 250K steps and x0.25 from 500K (XL only).
    c.loss.semantic_weight_schedule = ((250_000, 0.5), (500_000, 0.25))
  c.data.path = a.features
  if a.bf16:
    c.model.overrides = {"dtype": "bfloat16"}
  if a.runlocal:
    c.batch_size, c.total_steps, c.log_every = 8, 20, 5
    c.ckpt_every, c.sample_every, c.sample_steps = 10, 0, 10
    c.model.overrides = {"depth": 2, "hidden_size": 64, "num_heads": 2, "encoder_depth": 1}
  return c
