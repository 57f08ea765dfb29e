"""README "Reproduce the published numbers", run end to end so the path cannot rot.

The section's bash block is parsed (continuations joined, ``#`` lines skipped)
and every ``python -m MODULE ARGS`` line runs in-process as
``MODULE.main(ARGS)``, in order, in a temporary working directory in which the
README's relative paths exist.  The commands are the README's, except for
these documented placeholders (each must occur in the README, so a changed
command fails here instead of silently running something else):

- ``--model SiT-XL/2`` -> the tiny fixture config (``--model custom --set
  num_heads=4 --set encoder_depth=2``; see tests/fixtures/official/README.md);
- ``--num_samples=50000`` -> ``--num_samples=8``;
- ``--per_device_batch=64`` -> ``--per_device_batch=1`` (8 devices: one step).

The files the README's paths name are built here:

- each ``import_torch --checkpoint X.pt``: a copy of the official tiny fixture
  ``tests/fixtures/official/<arch>_tiny.pt`` (random weights, official layout);
- ``weights/sd_vae_ft_ema.npz``: a tiny random SD-VAE (two stages: the
  fixtures' 8x8 latents decode to 16x16 images) in glue_jax's own ``.npz``;
- ``weights/fid_inception.npz``: the weights of a stand-in Inception (fixed
  random projections to 6-d pool, 5-d spatial, 10 logits) that replaces
  ``glue_jax.eval.features.inception`` for this test: FID with the real
  2048-d features needs a 2048x2048 ``sqrtm`` (~40 s on the 2-core CI CPU,
  twice per run); the real network is covered by tests/test_inception.py;
- ``VIRTUAL_imagenet256_labeled.npz``: an ADM-layout reference batch
  (``arr_0`` uint8 images + ``mu, sigma, mu_s, sigma_s``, no glue_jax keys).

Checked: the imports store the arch's preset, every evaluation samples with
the preset the README names (``presets.PUBLISHED``), decodes through the VAE
and writes finite FID/sFID/IS/P/R against the reference batch, and the
README's table lists each preset with its published FID.
"""
import json
import os
import re
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")                 # import_torch reads the .pt fixtures

from glue_jax import api  # noqa: E402
from glue_jax.eval import features, frechet  # noqa: E402
from glue_jax.sampling import presets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "official")
SECTION = "## Reproduce the published numbers"

NUM_SAMPLES = 8
PLACEHOLDERS = [   # (README tokens, test tokens)
    (["--model", "SiT-XL/2"], ["--model", "custom", "--set", "num_heads=4",
                               "--set", "encoder_depth=2"]),
    (["--num_samples=50000"], [f"--num_samples={NUM_SAMPLES}"]),
    (["--per_device_batch=64"], ["--per_device_batch=1"]),
]
IMAGE = 16                 # fixtures: 8x8 latents; the tiny VAE upsamples 2x
REF_IMAGES = 16
POOL, SPATIAL, CLASSES = 6, 5, 10


def section_text() -> str:
  text = open(os.path.join(ROOT, "README.md")).read()
  m = re.search(rf"^{re.escape(SECTION)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
  assert m, f"README has no section {SECTION!r}"
  return m.group(1)


def section_commands() -> list[tuple[str, list[str]]]:
  """``(module, args)`` of every ``python -m`` line of the section's bash block."""
  blocks = re.findall(r"```bash\n(.*?)```", section_text(), re.S)
  assert len(blocks) == 1, "the section holds one bash block"
  cmds = []
  for line in blocks[0].replace("\\\n", " ").splitlines():
    if not line.strip() or line.strip().startswith("#"):
      continue
    words = shlex.split(line)
    assert words[:2] == ["python", "-m"], f"not a 'python -m' command: {line}"
    cmds.append((words[2], words[3:]))
  return cmds


def substitute(args: list[str], used: set) -> list[str]:
  out, i = [], 0
  while i < len(args):
    for k, (old, new) in enumerate(PLACEHOLDERS):
      if args[i:i + len(old)] == old:
        out += new
        used.add(k)
        i += len(old)
        break
    else:
      out.append(args[i])
      i += 1
  return out


def flag(args: list[str], name: str) -> str:
  for i, a in enumerate(args):
    if a == f"--{name}":
      return args[i + 1]
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  raise AssertionError(f"no --{name} in {args}")


# ------------------------------------------------------------- tiny assets

def write_tiny_vae(path: str) -> None:
  from glue_jax.models import vae, vae_weights
  cfg = vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)
  model = vae_weights._abstract_model(cfg)
  state = nnx.state(model)
  rng = np.random.default_rng(0)

  def init(kp, s):
    name = str(kp[-1])
    if "scale" in name:
      return np.ones(s.shape, s.dtype)
    if "bias" in name:
      return np.zeros(s.shape, s.dtype)
    fan_in = int(np.prod(s.shape[:-1])) or 1
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
      init, nnx.to_pure_dict(state)))
  nnx.update(model, state)
  vae_weights.save_npz(model, path)


def standin_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  d = IMAGE * IMAGE * 3
  return {"w": rng.normal(size=(d, POOL)) / np.sqrt(d),
          "s": rng.normal(size=(d, SPATIAL)) / np.sqrt(d),
          "v": rng.normal(size=(POOL, CLASSES))}


def standin_features(p, images):
  x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
  pool = x @ p["w"]
  return {"pool": pool, "spatial": x @ p["s"], "logits": 4.0 * pool @ p["v"]}


def standin_inception(weights=None, *, mode="adm", model=None):
  """Stands in for ``features.inception``: reads the README's weights file."""
  assert model is None and mode == "adm", (model, mode)
  assert os.path.exists(weights), weights
  with np.load(weights) as f:
    params = {k: jnp.asarray(f[k], jnp.float32) for k in f.files}
  return features.FeatureNet(f"inception-{mode}", standin_features, params, IMAGE)


def write_adm_reference(path: str, params: dict) -> None:
  images = np.random.default_rng(1).integers(0, 256, (REF_IMAGES, IMAGE, IMAGE, 3), np.uint8)
  f = jax.tree.map(np.asarray, standin_features(
      jax.tree.map(jnp.asarray, params), jnp.asarray(images)))
  mu, sigma = frechet.statistics(f["pool"])
  mu_s, sigma_s = frechet.statistics(f["spatial"])
  np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)


# ------------------------------------------------------------------- test

def test_readme_table_lists_every_published_preset():
  text, cmds = section_text(), section_commands()
  named = [flag(a, "preset") for m, a in cmds if m == "glue_jax.evaluate"]
  assert sorted(named) == sorted(presets.PUBLISHED), named
  for name, row in presets.PUBLISHED.items():
    line = next((l for l in text.splitlines() if l.startswith("|") and f"`{name}`" in l), None)
    assert line, f"README table has no row for preset {name}"
    assert f"| {row.fid:g} |" in line, (name, row.fid, line)


@pytest.fixture
def fresh_flags():
  """absl keeps parsed flag values across ``app.run`` calls in one process:
  every run starts from the defaults, and so do later tests."""
  from absl import flags
  flags.FLAGS.unparse_flags()
  yield flags.FLAGS
  flags.FLAGS.unparse_flags()


def test_readme_reproduction_commands_run(tmp_path, monkeypatch, fresh_flags):
  from glue_jax import evaluate
  from glue_jax.tools import import_torch
  cmds = section_commands()
  monkeypatch.chdir(tmp_path)
  os.makedirs("weights")
  write_tiny_vae("weights/sd_vae_ft_ema.npz")
  params = standin_params()
  np.savez("weights/fid_inception.npz", **params)
  monkeypatch.setattr(features, "inception", standin_inception)

  used, ran, archs = set(), [], {}
  for module, readme_args in cmds:
    args = substitute(readme_args, used)
    if module == "glue_jax.tools.import_torch":
      arch, src = flag(args, "arch"), flag(args, "checkpoint")
      os.makedirs(os.path.dirname(src) or ".", exist_ok=True)
      shutil.copy(os.path.join(FIX, f"{arch}_tiny.pt"), src)
      assert import_torch.main(args) == 0, args
      out = flag(args, "out")
      archs[out] = arch
      model = api.load_model(out)
      assert model.meta["method"] == arch
      assert model.preset == presets.PRESETS[import_torch.ARCHS[arch][2]]
    elif module == "glue_jax.evaluate":
      for ref in {flag(args, "reference")} - set(os.listdir(".")):
        write_adm_reference(ref, params)
      fresh_flags.unparse_flags()          # each run parses only its own flags
      with pytest.raises(SystemExit) as e:
        evaluate.main(["evaluate", *args, "--noprogress"])
      assert e.value.code in (0, None), args
      preset = flag(args, "preset")
      with open(os.path.join(flag(args, "out_dir"), "metrics.json")) as f:
        m = json.load(f)
      assert m["preset"] == presets.PUBLISHED[preset].preset.to_dict(), preset
      assert m["num_samples"] == m["num_scored"] == NUM_SAMPLES
      assert m["first_stage"] == "vae" and m["image_shape"] == [IMAGE, IMAGE, 3]
      assert m["feature_net"] == "inception-adm"
      assert m["inception_score_splits"] == "splits of 5000 rows (ADM)"
      assert m["pr_reference_size"] == REF_IMAGES
      for k in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(m[k]), (preset, k, m[k])
      assert m["fid"] > 0 and 1 <= m["inception_score"] <= CLASSES
      with np.load(m["npz"]) as f:
        assert f["arr_0"].shape == (NUM_SAMPLES, IMAGE, IMAGE, 3)
        assert f["arr_0"].std() > 0
      ran.append((archs[flag(args, "checkpoint")], preset))
    else:
      raise AssertionError(f"unexpected module {module}")
  assert used == set(range(len(PLACEHOLDERS))), "a placeholder no longer occurs in README"
  assert sorted({a for a, _ in ran}) == ["reg", "reglue", "repa", "sit"], ran
  assert sorted(p for _, p in ran) == sorted(presets.PUBLISHED), ran
