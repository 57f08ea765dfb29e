"""LA-INR (locality-aware generalizable INR): reconstruction, novel views, generation.

  python -m glue_jax.main --config=glue_jax/configs/lainr.py --workdir=workdirs/lainr
  --config=glue_jax/configs/lainr.py:runlocal                   (CI sizes, a few steps)
  --config=glue_jax/configs/lainr.py:task=nvs                   (procedural multi-view set)
  --config=glue_jax/configs/lainr.py:task=generate              (SiT over the latent tokens)
  --config=glue_jax/configs/lainr.py:dataset=photos,variant=global
  --config=glue_jax/configs/lainr.py:dataset=tfds:imagenette,model=paper   (178 px, the paper's sizes)

Arguments: task=reconstruct|nvs|generate, dataset=digits|photos|tfds:<name>,
variant=lainr|global|single_band|no_select, model=tiny|small|paper (small:
CPU default; paper: widths/depths of the LA-INR paper), steps=N, size=N (image side).

Paper recipe (IPC's, which LA-INR follows): Adam lr 1e-4, batch 16, epochs
CelebA 300 / FFHQ 1000 / ImageNette 4000 -> set train.steps = epochs *
num_train / 16; 10% pixel subsampling at >= 512 px; coordinate jitter for
ImageNette; ImageNette train: random crop + flip.
"""

import ml_collections

from glue_jax.configs import common

_PRESETS = {   # enc width, depth, heads, R, dec width, freqs per axis
    "tiny": dict(enc_width=32, enc_depth=1, enc_heads=2, num_latents=8, dec_width=32,
                 num_freqs=8),
    "small": dict(enc_width=64, enc_depth=2, enc_heads=4, num_latents=16, dec_width=64,
                  num_freqs=16),
    "paper": dict(enc_width=768, enc_depth=6, enc_heads=12, num_latents=256, dec_width=256,
                  num_freqs=64),
}
_TFDS_TEST_SPLIT = {"celeb_a": "test", "imagenette": "validation"}


def patching(size: int) -> tuple[int, int]:
  """(patch, padding): 178 -> 9 with padding 1 (20x20 grid, IPC); >= 512 -> 32;
  256 -> 16; small CPU images: a 4x4 (<= 16 px) or 8x8 grid."""
  if size == 178:
    return 9, 1
  if size >= 512:
    return 32, 0
  if size >= 128:
    return size // 16, 0
  return (max(1, size // 4), 0) if size <= 16 else (max(1, size // 8), 0)


def bands(size: int, base=(128.0, 32.0), base_q=16.0, ref=178) -> tuple[tuple, float]:
  """Bandwidths (cycles per image side).  The paper's (128, 32), sigma_q 16 at
  178 px; smaller images scale them by size/178 (floored at 1) so sigma_1
  stays ~0.7x the pixel count, larger images keep them (IPC's single-band FF
  grew only 2x from 178 to 1024 px; LA-INR's rule is uncertain)."""
  s = min(1.0, size / ref)
  return tuple(max(1.0, round(b * s, 2)) for b in base), max(1.0, round(base_q * s, 2))


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, task="reconstruct", dataset="digits",
                       variant="lainr", model="", steps=0, size=0)
  fast = a.runlocal
  if a.task not in ("reconstruct", "nvs", "generate"):
    raise ValueError(f"task={a.task!r}: reconstruct | nvs | generate")
  is_tfds = a.dataset.startswith("tfds:")
  if a.dataset not in ("digits", "photos") and not is_tfds:
    raise ValueError(f"dataset={a.dataset!r}: digits | photos | tfds:<name>")
  preset = a.model or ("tiny" if fast else "paper" if is_tfds else "small")
  if preset not in _PRESETS:
    raise ValueError(f"model={preset!r}: one of {sorted(_PRESETS)}")
  paper = preset == "paper"
  size = a.size or (178 if is_tfds else 32 if a.dataset == "photos" else 16)
  tfds_name = a.dataset[5:] if is_tfds else ""

  c = ml_collections.ConfigDict()
  c.kind = "lainr"
  c.task = a.task
  c.seed = 0
  c.data = common.data_defaults(
      name=a.dataset, image_size=size, num_train=0 if is_tfds else (256 if fast else 2048),
      num_test=64 if fast else 256, tfds_dir="", train_split="train",
      test_split=_TFDS_TEST_SPLIT.get(tfds_name, "test"), image_key="image",
      augment=tfds_name == "imagenette", pixel_fraction=0.1 if size >= 512 else 1.0,
      jitter=tfds_name == "imagenette")
  patch, pad = patching(size)
  sig, sig_q = bands(size)
  c.model = ml_collections.ConfigDict(dict(
      **_PRESETS[preset], variant=a.variant, patch_size=patch, patch_padding=pad,
      mlp_ratio=4.0, dropout=0.0, attn_heads=2, token_init_std=1.0, pos_init_std=1.0,
      sigmas=sig, sigma_q=sig_q, ff_pi=True,
      query_mlp=True, output_bias=0.5, single_band_mode="same_sigma", dtype="float32"))
  # Adam (IPC): paper recipe 1e-4; the small CPU presets leave the early
  # mean-image plateau much sooner at 3e-3 (bench/inr.py measures it).
  nvs_batch = 8 if fast else (32 if paper else 16)
  common.trainer_sections(
      c, steps=a.steps or (20 if fast else 200_000 if paper else 1000),
      batch_size=(nvs_batch if a.task == "nvs" else
                  16 if (paper or a.dataset == "photos") else 32),
      log_every=10 if fast else 100, ckpt_every=10 if fast else 500, keep=2,
      lr=1e-4 if paper else 3e-3, grad_clip=0.0)
  c.eval = ml_collections.ConfigDict(dict(num_images=16 if fast else 64, batch_size=16,
                                          chunk=4096, upsample=2, clip_psnr=False))

  nvs_size = a.size or (16 if fast else 128 if paper else 32)
  nvs_patch = 8 if nvs_size == 128 else max(1, nvs_size // 8)
  nsig, nsig_q = bands(nvs_size, base=(64.0, 16.0), base_q=8.0, ref=128)
  c.nvs = ml_collections.ConfigDict(dict(
      dataset="procedural", root="", category="chair", num_objects=32 if fast else 256,
      num_test_objects=8 if fast else 32, num_views=6 if fast else 8,
      image_size=nvs_size, patch_size=nvs_patch, sigmas=nsig, sigma_q=nsig_q,
      support_views=1 if fast else 2, query_views=1 if fast else 2,
      rays_per_instance=64 if fast else 128, num_samples=16 if fast else (128 if paper else 32),
      near=2.0, far=6.0, white_background=True, density_activation="softplus",
      scene_scale=1.5, view_dirs=False, last_bin="far", chunk=1024))

  c.generate = ml_collections.ConfigDict(dict(
      inr_workdir="", hidden_size=32 if fast else (384 if paper else 128),
      depth=1 if fast else (12 if paper else 4), num_heads=2 if fast else (6 if paper else 4),
      steps=a.steps or (20 if fast else 2000), batch_size=32 if fast else 64,
      lr=1e-3 if not paper else 1e-4, sampler="heun", sample_steps=4 if fast else 50,
      num_samples=16 if fast else 64, upsample=2))
  return c
