"""convert_weights CLI: upstream format -> torch-free .npz -> same outputs."""
import numpy as np
import pytest

from glue_jax.tools import convert_weights


def test_vae_directory_to_npz_roundtrip(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  from glue_jax.models import vae_weights
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1,
                                norm_num_groups=8, latent_channels=4, sample_size=16,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2)
  ref.save_pretrained(tmp_path / "vae")
  out = str(tmp_path / "vae.npz")
  assert convert_weights.main(["--kind", "vae", "--src", str(tmp_path / "vae"),
                               "--out", out]) == 0
  a = vae_weights.load_vae(str(tmp_path / "vae"))
  b = vae_weights.load_vae(out)
  x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(a.encode_moments(x)[0]),
                                np.asarray(b.encode_moments(x)[0]))
  # refuses to overwrite, and bad inputs are a clear one-line error (exit 2)
  assert convert_weights.main(["--kind", "vae", "--src", str(tmp_path / "vae"),
                               "--out", out]) == 2
  assert convert_weights.main(["--kind", "vae", "--src", str(tmp_path / "nope"),
                               "--out", str(tmp_path / "x.npz")]) == 2
