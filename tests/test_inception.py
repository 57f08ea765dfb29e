"""Parity of glue_jax.models.inception with pytorch-fid's FID Inception v3.

The reference is built by pytorch-fid's own ``fid_inception_v3()`` with its
weight download stubbed out, then given seeded random weights (BatchNorm
statistics included), saved as a ``.pth`` state dict (the format of
``pt_inception-2015-12-05-6726825d.pth``) and loaded with our loader.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pfi = pytest.importorskip("pytorch_fid.inception")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from glue_jax.models import inception as inc  # noqa: E402
from glue_jax.models import inception_weights as incw  # noqa: E402
from glue_jax.models.torch_weights import WeightsError  # noqa: E402


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def _build_reference(monkeypatch):
  """pytorch-fid's fid_inception_v3() without downloading, random weights."""
  monkeypatch.setattr(pfi, "load_state_dict_from_url",
                      lambda *a, **k: {"stub": None})
  monkeypatch.setattr(pfi.torchvision.models.Inception3, "load_state_dict",
                      lambda self, sd, *a, **k: None)
  torch.manual_seed(0)
  net = pfi.fid_inception_v3()
  monkeypatch.undo()
  assert isinstance(net.Mixed_7c, pfi.FIDInceptionE_2)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, m in net.named_modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
      elif isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    net.fc.weight.copy_(0.01 * torch.randn(net.fc.weight.shape, generator=g))
    net.fc.bias.copy_(0.1 * torch.randn(net.fc.bias.shape, generator=g))
  return net.eval()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """Torch model + its .pth + reference outputs on two 64x64 images."""
  mp = pytest.MonkeyPatch()
  net = _build_reference(mp)
  path = str(tmp_path_factory.mktemp("inception") / "pt_inception.pth")
  torch.save(net.state_dict(), path)
  images = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
  # pytorch-fid's InceptionV3 wrapper (resize + normalize + blocks) for pool3.
  mp.setattr(pfi, "fid_inception_v3", lambda: net)
  wrapper = pfi.InceptionV3([3], use_fid_inception=True).eval()
  mp.undo()
  taps = {}
  hooks = [net.Mixed_6d.branch1x1.register_forward_hook(
               lambda m, i, o: taps.__setitem__("branch1x1", o)),
           net.Mixed_6d.register_forward_hook(
               lambda m, i, o: taps.__setitem__("mixed_6d", o))]
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  with torch.no_grad():
    pool3 = wrapper(x)[0].flatten(1)
    logits = net.fc(pool3)  # = net(preprocessed x) in eval mode
  for h in hooks:
    h.remove()
  spatial = taps["branch1x1"][:, :7].permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(taps["branch1x1"][:, :7].numpy(),
                                taps["mixed_6d"][:, :7].numpy())
  return dict(path=path, images=images, pool3=pool3.numpy(),
              logits=logits.numpy(),
              spatial=spatial, state_dict=net.state_dict())


@pytest.fixture(scope="module")
def jax_run(ref):
  """Our model loaded from the .pth; one jit shared by all tests."""
  model = incw.load_inception(ref["path"])
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  out = jax.device_get(fn(state, jnp.asarray(ref["images"])))
  return dict(model=model, fn=fn, out=out)


def test_pool3_logits_spatial_match_pytorch_fid(ref, jax_run):
  out = jax_run["out"]
  assert out["pool3"].shape == (2, 2048)
  assert out["logits"].shape == (2, 1008)
  assert out["spatial"].shape == (2, 17, 17, 7)
  assert rel_err(out["pool3"], ref["pool3"]) <= 1e-4
  assert rel_err(out["logits"], ref["logits"]) <= 1e-4
  assert rel_err(out["spatial"], ref["spatial"]) <= 1e-4
  # The features are not degenerate (BN statistics and ReLUs matter).
  assert np.std(out["pool3"]) > 1e-2 and np.std(out["spatial"]) > 1e-2


def test_npz_roundtrip_is_torch_free(ref, jax_run, tmp_path, monkeypatch):
  path = str(tmp_path / "inception.npz")
  incw.save_npz(jax_run["model"], path)
  import glue_jax.models.torch_weights as tw
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # no torch
  model = incw.load_inception(path)
  monkeypatch.undo()
  a = tw.flat_params(jax_run["model"], (nnx.Param, nnx.BatchStat))
  b = tw.flat_params(model, (nnx.Param, nnx.BatchStat))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]))
  out = jax_run["fn"](nnx.state(model), jnp.asarray(ref["images"]))
  np.testing.assert_array_equal(np.asarray(out["pool3"]), jax_run["out"]["pool3"])


@pytest.mark.parametrize("shape", [(64, 64), (37, 50), (400, 320), (299, 299)])
def test_resize_matches_f_interpolate(shape):
  x = np.random.default_rng(1).normal(size=(2, 3) + shape).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(x), size=(299, 299), mode="bilinear",
      align_corners=False).permute(0, 2, 3, 1).numpy()
  got = inc.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), (299, 299))
  assert rel_err(got, want) <= 1e-6


def test_resize_tf1_legacy_sampling():
  # TF1 ResizeBilinear (half_pixel_centers=False) samples src = dst * in / out.
  x = jnp.arange(4, dtype=jnp.float32).reshape(1, 4, 1, 1)
  got = inc.resize_bilinear(x, (8, 1), half_pixel=False)[0, :, 0, 0]
  np.testing.assert_allclose(got, [0, .5, 1, 1.5, 2, 2.5, 3, 3])
  got = inc.resize_bilinear(x, (3, 1), half_pixel=False)[0, :, 0, 0]
  np.testing.assert_allclose(got, [0, 4 / 3, 8 / 3], rtol=1e-6)


def test_bad_keys_are_named(ref, tmp_path):
  sd = {k: v.numpy() for k, v in ref["state_dict"].items()}
  missing = dict(sd)
  del missing["Mixed_6d.branch1x1.bn.running_var"]
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(WeightsError, match=r"Mixed_6d\.branch1x1\.bn\.running_var"):
    incw.load_inception(str(tmp_path / "missing.npz"))
  extra = dict(sd)
  extra["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  np.savez(tmp_path / "extra.npz", **extra)
  with pytest.raises(WeightsError, match=r"AuxLogits\.fc\.weight"):
    incw.load_inception(str(tmp_path / "extra.npz"))
  shaped = dict(sd)
  shaped["fc.weight"] = np.zeros((1000, 2048), np.float32)
  np.savez(tmp_path / "shaped.npz", **shaped)
  with pytest.raises(WeightsError, match=r"fc\.weight: got \(2048, 1000\)"):
    incw.load_inception(str(tmp_path / "shaped.npz"))
  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    incw.load_inception(str(tmp_path / "absent.pth"))


def test_download_fails_clearly_offline(tmp_path, monkeypatch):
  import urllib.error
  import urllib.request

  def offline(*a, **k):
    raise urllib.error.URLError("network unreachable")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  with pytest.raises(RuntimeError, match="could not download.*pt_inception"):
    incw.download_fid_weights(str(tmp_path / "w.pth"))
