"""The semantic compressor: official layout, weight port parity, losses, PCA,
the SemanticEncoder bundle (the training job: tests/test_compressor_job.py)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from glue_jax.models import compressor as compressor_lib
from glue_jax.models import compressor_weights, dinov2, pca as pca_lib
from glue_jax.models import semantic_encoder as se
from glue_jax.models import torch_weights as tw


def _torch_reference(channels):
  """The official EncoderDecoder layout (nn.Sequential of Conv2d and
  ResidualBlock), written from the spec for the parity test."""
  import torch
  from torch import nn

  class Res(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.conv1 = nn.Conv2d(c, c, 3, 1, 1)
      self.bn1 = nn.BatchNorm2d(c)
      self.conv2 = nn.Conv2d(c, c, 3, 1, 1)
      self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(out)) + x)

  def coder(ch):
    mods = []
    for i in range(len(ch) - 1):
      mods.append(nn.Conv2d(ch[i], ch[i + 1], 3, padding=1))
      if i < len(ch) - 2:
        mods.append(Res(ch[i + 1]))
    seq = nn.Module()
    seq.model = nn.Sequential(*mods)
    seq.forward = lambda x: seq.model(x)
    return seq

  m = nn.Module()
  m.encoder, m.decoder = coder(channels), coder(channels[::-1])
  torch.manual_seed(0)
  with torch.no_grad():
    for mod in m.modules():
      if isinstance(mod, nn.BatchNorm2d):
        mod.running_mean.uniform_(-0.5, 0.5)
        mod.running_var.uniform_(0.5, 2.0)
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.uniform_(-0.2, 0.2)
  return m.eval()


def test_default_size_matches_official():
  m = nnx.eval_shape(lambda: compressor_lib.Compressor(compressor_lib.CompressorConfig(),
                                                       rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(v.value.shape)) for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)))
  assert n == 16_595_472
  n_enc = sum(int(np.prod(v.value.shape))
              for _, v in nnx.to_flat_state(nnx.state(m.encoder, nnx.Param)))
  assert n_enc == 3072 * 256 * 9 + 256 + 2 * (256 * 256 * 9 + 256 + 512) + 256 * 16 * 9 + 16


@pytest.mark.parametrize("channels", [(24, 12, 4), (24, 16, 8, 4)])
def test_official_weights_parity(tmp_path, channels):
  import torch
  ref = _torch_reference(channels)
  sd = {"module." + k: v for k, v in ref.state_dict().items()}     # DDP-saved
  path = str(tmp_path / "compression_model.pth")
  torch.save(sd, path)
  model = compressor_weights.load_compressor(path)
  assert model.cfg.channels == channels and not model.cfg.variational
  x = np.random.default_rng(0).standard_normal((2, 5, 6, channels[0])).astype(np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    z_ref = ref.encoder(xt).permute(0, 2, 3, 1).numpy()
    r_ref = ref.decoder(ref.encoder(xt)).permute(0, 2, 3, 1).numpy()
  z = np.asarray(jax.jit(lambda m, x: m.encode(x))(model, x))
  r = np.asarray(jax.jit(lambda m, x: m(x))(model, x))
  np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(r, r_ref, rtol=1e-4, atol=1e-5)


def test_official_weights_errors_name_keys(tmp_path):
  ref = _torch_reference((8, 6, 2))
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  del sd["encoder.model.1.bn1.running_var"]
  with pytest.raises(tw.WeightsError, match="encoder.model.1.bn1.running_var"):
    compressor_weights.from_state_dict(sd)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  sd["encoder.model.9.extra"] = np.zeros(3)
  with pytest.raises(tw.WeightsError, match="encoder.model.9.extra"):
    compressor_weights.from_state_dict(sd)


def test_losses_mse_and_kl():
  cfg = compressor_lib.CompressorConfig(channels=(6, 5, 2), variational=True)
  m = compressor_lib.Compressor(cfg, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 6))
  loss, aux = jax.jit(lambda m, x: compressor_lib.compressor_loss(
      m, x, jax.random.key(1), kind="mse_kl", kl_weight=0.5, train=False))(m, x)
  mean, logvar = jax.jit(lambda m, x: m.moments(x))(m, x)
  kl = 0.5 * np.mean(np.sum(np.square(mean) + np.exp(logvar) - 1 - logvar, -1))
  np.testing.assert_allclose(aux["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(loss, aux["mse"] + 0.5 * kl, rtol=1e-5)
  assert m.encode(x).shape == (3, 4, 4, 2)
  with pytest.raises(ValueError, match="variational"):
    compressor_lib.compressor_loss(m, x, jax.random.key(1), kind="mse")
  det = compressor_lib.Compressor(compressor_lib.CompressorConfig(channels=(6, 5, 2)),
                                  rngs=nnx.Rngs(1))
  loss, aux = compressor_lib.compressor_loss(det, x, jax.random.key(1), train=False)
  np.testing.assert_allclose(loss, np.mean(np.square(np.asarray(det(x)) - np.asarray(x))),
                             rtol=1e-5)


def test_pca_matches_numpy_svd_and_streaming():
  rng = np.random.default_rng(0)
  basis = rng.standard_normal((12, 12))
  feats = (rng.standard_normal((500, 12)) * np.linspace(3, 0.1, 12)) @ basis + 2.0
  proj = pca_lib.fit(feats, k=3)
  z = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
  _, s, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
  for i in range(3):   # same subspace, same variance, sign fixed by convention
    assert abs(abs(np.dot(proj.components[:, i], vt[i])) - 1) < 1e-4
    np.testing.assert_allclose(proj.explained_variance[i], s[i] ** 2 / len(z), rtol=1e-4)
  out = np.asarray(pca_lib.project(jnp.asarray(feats, jnp.float32), proj))
  np.testing.assert_allclose(out.var(0), proj.explained_variance, rtol=1e-3)
  f = pca_lib.PCAFitter(12)
  for chunk in np.split(feats, 5):
    f.add_moments(chunk)
  for chunk in np.split(feats, 5):
    f.add_covariance(chunk)
  streamed = f.finish(3)
  np.testing.assert_allclose(streamed.components, proj.components, atol=1e-5)


def _tiny_vit():
  cfg = dinov2.Dinov2Config(dim=16, depth=3, num_heads=2, patch_size=4, pos_grid=4,
                            num_registers=2)
  return dinov2.Dinov2(cfg, rngs=nnx.Rngs(0))


def test_semantic_encoder_outputs_match_manual_pipeline():
  vit = _tiny_vit()
  stats = (np.linspace(-0.1, 0.1, 48).astype(np.float32), np.linspace(0.5, 2, 48).astype(np.float32))
  comp = compressor_lib.Compressor(compressor_lib.CompressorConfig(channels=(48, 8, 4)),
                                   rngs=nnx.Rngs(2))
  enc = se.SemanticEncoder(vit, se.SemanticSpec((0, 1, 2), None, "compressor"),
                           stats=stats, compressor=comp)
  imgs = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  out = jax.jit(lambda e, x: e(x))(enc, imgs)
  x = se._normalize_only(imgs)
  maps, full = jax.jit(lambda v, x: (v.intermediate_layers(x, (0, 1, 2), norm=True)[0], v(x)))(
      vit, x)
  np.testing.assert_allclose(out["cls"], full["x_norm_clstoken"], atol=1e-5)
  np.testing.assert_allclose(out["align_target"], full["x_norm_patchtokens"], atol=1e-5)
  std = (np.concatenate([np.asarray(m) for m in maps], -1) - stats[0]) / stats[1]
  np.testing.assert_allclose(out["semantic"], jax.jit(lambda c, s: c.encode(s))(comp, std),
                             atol=1e-5)
  assert out["semantic"].shape == (2, 4, 4, 4)
  with pytest.raises(ValueError, match="end at the last block"):
    se.SemanticEncoder(vit, se.SemanticSpec((0, 1), None, "none"))
  with pytest.raises(ValueError, match="compressor takes 48"):
    se.SemanticEncoder(vit, se.SemanticSpec((2,), None, "compressor"), stats=stats,
                       compressor=comp)


def test_semantic_encoder_pca():
  vit = _tiny_vit()
  imgs = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  last = jax.jit(lambda v, x: v(x)["x_norm_patchtokens"])(vit, se._normalize_only(imgs))
  proj = pca_lib.fit(np.asarray(last), k=3)
  enc = se.SemanticEncoder(vit, se.SemanticSpec((2,), None, "pca"), pca=proj)
  out = jax.jit(lambda e, x: e(x))(enc, imgs)
  assert enc.semantic_channels == 3
  np.testing.assert_allclose(out["semantic"].reshape(6, 16, 3),
                             pca_lib.project(last, proj), atol=1e-4)


def test_released_stats_load():
  import os
  path = os.path.join(os.path.dirname(compressor_lib.__file__), "..", "assets",
                      "dinov2_vitb14_reg_blocks8-11_norm_stats.npz")
  mean, std = se.load_stats(path, 3072)
  per_layer = std.reshape(4, 768).mean(1)   # spec: ~ (1.09, 1.06, 0.97, 0.85)
  np.testing.assert_allclose(per_layer, [1.09, 1.06, 0.97, 0.85], atol=0.02)
  with pytest.raises(ValueError, match="768"):
    se.load_stats(path, 768)
