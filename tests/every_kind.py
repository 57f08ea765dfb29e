"""Tiny configs of every training kind, for the kill -9 / resume test.

``python -m tests.every_kind KIND WORKDIR`` runs ``glue_jax.main.run`` on the
kind's tiny config (with ``GLUE_JAX_TEST_KILL_AT`` in the environment the job
of that name dies by SIGKILL after that step).  ``CASES[kind]`` gives the name
of the job to kill, the step to kill it after and the checkpoint directory of
that job inside the workdir.
"""
import os
import sys

# kind: (job name to kill, kill after step, checkpoints of that job)
CASES = {
    "diffusion": ("diffusion", 4, "checkpoints"),
    "compressor": ("compressor", 7, "checkpoints"),
    "lainr_reconstruct": ("lainr", 5, "checkpoints"),
    "lainr_nvs": ("lainr-nvs", 5, "checkpoints"),
    "lainr_generate": ("latent-sit", 5, "generator/checkpoints"),
    "scenes": ("diffusion", 5, "generator/checkpoints"),
    "demo_encoder": ("encoder", 5, "encoder_run/checkpoints"),
    "demo_compressor": ("compressor", 5, "compressor_run/checkpoints"),
    "demo_reglue": ("diffusion", 5, "reglue/checkpoints"),
}


def config(kind: str, workdir: str):
  """The kind's tiny config; fixtures it needs are written next to the workdir."""
  fixtures = os.path.join(os.path.dirname(os.path.abspath(workdir)), "fixtures")
  os.makedirs(fixtures, exist_ok=True)
  if kind == "diffusion":
    from tests import train_utils
    path = os.path.join(fixtures, "features.npz")
    if not os.path.exists(path):
      train_utils.write_features(path)
    c = train_utils.tiny_config(path, steps=6)
    c.checkpoint.every = 2
    return c
  if kind == "compressor":
    from flax import nnx
    from glue_jax.configs import compressor as compressor_config
    from glue_jax.models import dinov2, dinov2_weights
    vit_path = os.path.join(fixtures, "vit.npz")
    if not os.path.exists(vit_path):
      vit = dinov2.Dinov2(dinov2.Dinov2Config(dim=16, depth=4, num_heads=2, patch_size=4,
                                              pos_grid=4), rngs=nnx.Rngs(0))
      dinov2_weights.save_npz(vit, vit_path)
    c = compressor_config.get_config(f"digits,dinov2={vit_path},epochs=2,batch_size=256")
    c.hidden_channels = (8,)
    c.checkpoint.every = 3        # 5 steps per epoch: a checkpoint mid-epoch 2 (step 6)
    return c
  if kind.startswith("lainr"):
    from glue_jax.configs import lainr as lainr_config
    task = kind.split("_", 1)[1]
    c = lainr_config.get_config(f"runlocal,task={task},steps=6")
    c.model.update(enc_width=16, enc_depth=1, num_latents=4, dec_width=16, num_freqs=4)
    c.data.num_train = 32
    c.checkpoint.every = 2
    c.eval.num_images = 4
    if task == "nvs":
      c.nvs.update(num_objects=8, num_test_objects=2, num_views=3, image_size=8, patch_size=4,
                   num_samples=4, rays_per_instance=16)
    if task == "generate":
      c.train.steps = 4           # the reconstruction model; the generator runs 6 steps
      c.generate.update(steps=6, num_samples=4, sample_steps=2)
    return c
  if kind == "scenes":
    from glue_jax.configs import scenes as scenes_config
    c = scenes_config.get_config("runlocal")
    c.data.num_train, c.data.num_test, c.data.seed = 12, 4, 3
    c.train.model.overrides = {**dict(c.train.model.overrides), "depth": 1,
                               "hidden_size": 112, "num_heads": 2}
    c.train.train.update(batch_size=8, steps=6, log_every=2)
    c.train.checkpoint.every = 2
    c.probes.update(steps=2, batch_size=8)
    c.eval.update(num_scenes=2, num_steps=2, methods=("single",))
    return c
  if kind.startswith("demo"):
    from glue_jax.configs import demo as demo_config
    c = demo_config.get_config("runlocal,steps=6")
    c.encoder.update(steps=6, dim=16, depth=4, heads=2)
    c.compressor.update(steps=6, hidden=8)
    c.train.model.overrides = {**dict(c.train.model.overrides), "depth": 1, "encoder_depth": 1}
    c.train.checkpoint.every = 2
    c.eval.update(num_samples=10, batch_size=10, num_steps=2)
    return c
  raise ValueError(f"unknown kind {kind!r}")


def main():
  kind, workdir = sys.argv[1:3]
  from tests import jax_setup
  jax_setup.configure(8)   # the settings of tests/conftest.py: programs compile identically
  from glue_jax import main as main_lib
  main_lib.run(config(kind, workdir), workdir)


if __name__ == "__main__":
  main()
