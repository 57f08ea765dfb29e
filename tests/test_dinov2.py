"""DINOv2 parity against HF transformers and the torch-hub conventions."""

import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from glue_jax.models import dinov2 as dv  # noqa: E402
from glue_jax.models import dinov2_weights as dw  # noqa: E402
from glue_jax.models import torch_weights as tw  # noqa: E402

DIM, DEPTH, HEADS, REG = 32, 3, 4, 4


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def _perturb(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))


def _hf_model(registers: bool, swiglu: bool = False, seed: int = 0):
  torch.manual_seed(seed)
  kw = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
            image_size=56, patch_size=14, use_swiglu_ffn=swiglu)
  if registers:
    model = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=REG, **kw))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
  _perturb(model, seed + 1)
  return model.eval()


def _hf_reference(model, x_nhwc, n_reg):
  """cls, patches, and every block's normed patch map / cls from HF."""
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    out = model(pixel_values=x, output_hidden_states=True)
    last = out.last_hidden_state.numpy()
    normed = [model.layernorm(h).numpy() for h in out.hidden_states[1:]]
  b, h, w, _ = x_nhwc.shape
  maps = [n[:, 1 + n_reg:].reshape(b, h // 14, w // 14, -1) for n in normed]
  return last[:, 0], last[:, 1 + n_reg:], maps, [n[:, 0] for n in normed]


_JIT = {}


def _features(model, x, indices):
  """Forward and intermediate layers, jitted once per network structure.

  Models with equal configs share a graphdef and so a compiled function;
  this keeps the number of (slow, CPU) XLA compilations small.
  """
  graphdef, state = nnx.split(model)
  key = (graphdef, tuple(indices))
  if key not in _JIT:
    def fn(state, x):
      m = nnx.merge(graphdef, state)
      return m(x), m.intermediate_layers(x, indices=indices)
    _JIT[key] = jax.jit(fn)
  return _JIT[key](state, jnp.asarray(x))


def _check(model, x, ref, indices=tuple(range(DEPTH))):
  cls, patches, maps, layer_cls = ref
  out, (got, got_cls) = _features(model, x, indices)
  assert rel_err(out["x_norm_clstoken"], cls) <= 1e-4
  assert rel_err(out["x_norm_patchtokens"], patches) <= 1e-4
  assert len(got) == len(indices)
  for i, g in zip(indices, got):
    assert g.shape == maps[i].shape
    assert rel_err(g, maps[i]) <= 1e-4, i
  assert rel_err(got_cls, layer_cls[indices[-1]]) <= 1e-4


def _inputs(seed, h=70, w=70, b=3):
  return np.random.default_rng(seed).standard_normal((b, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  out = {}
  for name, reg, swiglu in [("plain", False, False), ("swiglu", False, True),
                            ("reg", True, False)]:
    m = _hf_model(reg, swiglu, seed=len(out))
    d = tmp_path_factory.mktemp(name)
    m.save_pretrained(str(d))
    out[name] = (m, str(d))
  return out


@pytest.mark.parametrize("name", ["plain", "swiglu", "reg"])
def test_hf_parity_interpolated(hf_dirs, name):
  """70x70 (and 70x84) inputs on a 4x4 grid: position interpolation is used."""
  hf, d = hf_dirs[name]
  model = dw.load_dinov2(d)
  n_reg = REG if name == "reg" else 0
  assert model.cfg.num_registers == n_reg and model.cfg.pos_interp == "hf"
  for h, w in [(70, 70), (70, 84)][:2 if name == "reg" else 1]:
    x = _inputs(1, h, w)
    _check(model, x, _hf_reference(hf, x, n_reg))


def test_hf_parity_native_grid_and_subset(hf_dirs):
  hf, d = hf_dirs["reg"]
  model = dw.load_dinov2(d)
  x = _inputs(2, 56, 56, b=2)
  _check(model, x, _hf_reference(hf, x, REG), indices=(2, 0))


def _hub_state_dict(hf_model):
  """Torch-hub key layout, renamed by hand from an HF model."""
  sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
  out = {"cls_token": sd.pop("embeddings.cls_token"),
         "mask_token": sd.pop("embeddings.mask_token"),
         "pos_embed": sd.pop("embeddings.position_embeddings"),
         "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
         "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
         "norm.weight": sd.pop("layernorm.weight"), "norm.bias": sd.pop("layernorm.bias")}
  if "embeddings.register_tokens" in sd:
    out["register_tokens"] = sd.pop("embeddings.register_tokens")
  for i in range(DEPTH):
    p, q = f"encoder.layer.{i}.", f"blocks.{i}."
    for leaf in ("weight", "bias"):
      out[q + "attn.qkv." + leaf] = torch.cat(
          [sd.pop(f"{p}attention.{c}_proj.{leaf}") for c in "qkv"])
      out[q + "attn.proj." + leaf] = sd.pop(f"{p}attention.o_proj.{leaf}")
      for n in ("norm1", "norm2"):
        out[q + n + "." + leaf] = sd.pop(p + n + "." + leaf)
      if p + "mlp.fc1." + leaf in sd:
        out[q + "mlp.fc1." + leaf] = sd.pop(p + "mlp.fc1." + leaf)
        out[q + "mlp.fc2." + leaf] = sd.pop(p + "mlp.fc2." + leaf)
      else:
        out[q + "mlp.w12." + leaf] = torch.cat(
            [sd.pop(p + "mlp.gate_proj." + leaf), sd.pop(p + "mlp.up_proj." + leaf)])
        out[q + "mlp.w3." + leaf] = sd.pop(p + "mlp.down_proj." + leaf)
    out[q + "ls1.gamma"] = sd.pop(p + "layer_scale1.lambda1")
    out[q + "ls2.gamma"] = sd.pop(p + "layer_scale2.lambda1")
  assert not sd, sorted(sd)
  return out


def _hub_pos_encoding(embeddings, offset, antialias):
  """HF embeddings' interpolate_pos_encoding replaced by the hub's code path."""
  def interp(x, h, w):  # arguments as the hub's (x, w, h): rows first
    pos = embeddings.position_embeddings.float()
    npatch, n = x.shape[1] - 1, pos.shape[1] - 1
    if npatch == n and h == w:
      return pos
    m, dim = int(n ** 0.5), x.shape[-1]
    h0, w0 = h // 14, w // 14
    kw = ({"scale_factor": ((h0 + offset) / m, (w0 + offset) / m)} if offset
          else {"size": (h0, w0)})
    grid = F.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
                         mode="bicubic", antialias=antialias, **kw)
    assert (h0, w0) == grid.shape[-2:]
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos[:, :1], grid), dim=1)
  return interp


@pytest.mark.parametrize("name", ["swiglu", "reg"])
def test_hub_pth(hf_dirs, tmp_path, name):
  """.pth in the hub layout; 'hub' interpolation vs the hub's F.interpolate call."""
  hf, d = hf_dirs[name]
  n_reg = REG if name == "reg" else 0
  path = str(tmp_path / "hub.pth")
  torch.save(_hub_state_dict(hf), path)
  model = dw.load_dinov2(path, num_heads=HEADS)
  assert model.cfg.pos_interp == "hub" and model.cfg.ffn == ("swiglu" if name == "swiglu" else "mlp")
  assert model.cfg.offset == (0.0 if n_reg else 0.1) and model.cfg.antialias == bool(n_reg)
  emb = hf.embeddings
  original = emb.interpolate_pos_encoding
  emb.interpolate_pos_encoding = _hub_pos_encoding(emb, model.cfg.offset, model.cfg.antialias)
  try:
    x = _inputs(3, 84, 70, b=2)
    _check(model, x, _hf_reference(hf, x, n_reg))
  finally:
    emb.interpolate_pos_encoding = original
  # the same .pth with HF's convention reproduces the unpatched HF model
  model_hf = dw.load_dinov2(path, num_heads=HEADS, pos_interp="hf")
  x = _inputs(4, 70, 70)
  _check(model_hf, x, _hf_reference(hf, x, n_reg))


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True),
                                              (0.0, False)])
@pytest.mark.parametrize("hw", [(224, 224), (224, 252), (518, 518), (70, 42)])
def test_pos_interp_vs_torch(offset, antialias, hw):
  """A 37x37 grid resized as the hub calls F.interpolate."""
  d = 8
  cfg = dv.Dinov2Config(dim=d, depth=1, num_heads=1, pos_grid=37,
                        interpolate_offset=offset, interpolate_antialias=antialias)
  model = nnx.eval_shape(lambda: dv.Dinov2(cfg, rngs=nnx.Rngs(0)))
  pos = np.random.default_rng(5).standard_normal((1, 1 + 37 * 37, d)).astype(np.float32)
  model.pos_embed.set_value(jnp.asarray(pos))
  emb = type("E", (), {"position_embeddings": torch.from_numpy(pos)})()
  x = torch.zeros(1, 1 + (hw[0] // 14) * (hw[1] // 14), d)
  ref = _hub_pos_encoding(emb, offset, antialias)(x, *hw).numpy()
  got = model.interpolated_pos_embed(*hw)
  assert got.shape == ref.shape
  assert rel_err(got, ref) <= 1e-5


def test_preprocess_matches_torch():
  rng = np.random.default_rng(0)
  mean = torch.tensor(dv.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(dv.IMAGENET_STD).view(1, 3, 1, 1)
  img = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
  t = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0
  ref = F.interpolate((t - mean) / std, 224, mode="bicubic").permute(0, 2, 3, 1).numpy()
  got = dv.preprocess_for_dinov2(jnp.asarray(img), 224)
  assert got.shape == (2, 224, 224, 3) and rel_err(got, ref) <= 1e-5
  f = rng.random((1, 64, 48, 3), dtype=np.float32)
  t = torch.from_numpy(f).permute(0, 3, 1, 2)
  ref = F.interpolate((t - mean) / std, (56, 42), mode="bicubic").permute(0, 2, 3, 1).numpy()
  assert rel_err(dv.preprocess_for_dinov2(f, (56, 42)), ref) <= 1e-5


def test_npz_roundtrip(hf_dirs, tmp_path):
  _, d = hf_dirs["reg"]
  model = dw.load_dinov2(d)
  path = str(tmp_path / "m.npz")
  dw.save_npz(model, path)
  again = dw.load_dinov2(path)
  assert again.cfg == model.cfg
  x = _inputs(1, 70, 70)
  a, b = _features(model, x, range(DEPTH)), _features(again, x, range(DEPTH))
  np.testing.assert_array_equal(a[0]["x_norm_patchtokens"], b[0]["x_norm_patchtokens"])
  assert dw.load_dinov2(path, pos_interp="hub").cfg.pos_interp == "hub"


def test_hf_key_layouts_agree(hf_dirs):
  """In-memory transformers-5 names (q_proj, gate_proj) == saved legacy names."""
  from safetensors.numpy import load_file
  for name in ("swiglu", "reg"):
    hf, d = hf_dirs[name]
    legacy = dw.hf_to_hub(load_file(os.path.join(d, "model.safetensors")))
    renamed = dw.hf_to_hub({k: v.numpy() for k, v in hf.state_dict().items()})
    assert sorted(legacy) == sorted(renamed)
    for k in legacy:
      np.testing.assert_array_equal(legacy[k], renamed[k])


def test_variant_names():
  for name, (dim, reg) in {"s": (384, 0), "vitb14_reg": (768, 4), "L/14": (1024, 0),
                           "dinov2_vitg14_reg": (1536, 4),
                           "facebook/dinov2-with-registers-large": (1024, 4),
                           "facebook/dinov2-giant": (1536, 0)}.items():
    cfg = dv.dinov2_config(name)
    assert (cfg.dim, cfg.num_registers) == (dim, reg), name
  assert dv.dinov2_config("g").ffn_hidden == 4096
  assert dv.dinov2_config("b", registers=True).num_registers == 4
  with pytest.raises(ValueError, match="unknown DINOv2 variant"):
    dv.dinov2_config("vitx14")


def test_weight_errors(hf_dirs, tmp_path):
  hf, _ = hf_dirs["plain"]
  sd = _hub_state_dict(hf)
  bad = dict(sd)
  del bad["blocks.1.ls2.gamma"]
  torch.save(bad, tmp_path / "missing.pth")
  with pytest.raises(tw.WeightsError, match=r"blocks\.1\.ls2\.gamma"):
    dw.load_dinov2(str(tmp_path / "missing.pth"), num_heads=HEADS)
  bad = dict(sd, **{"blocks.0.attn.extra": torch.zeros(3)})
  torch.save(bad, tmp_path / "extra.pth")
  with pytest.raises(tw.WeightsError, match=r"blocks\.0\.attn\.extra"):
    dw.load_dinov2(str(tmp_path / "extra.pth"), num_heads=HEADS)
  bad = dict(sd, **{"blocks.2.attn.proj.bias": torch.zeros(DIM + 1)})
  torch.save(bad, tmp_path / "shape.pth")
  with pytest.raises(tw.WeightsError, match=r"blocks\.2\.attn\.proj\.bias"):
    dw.load_dinov2(str(tmp_path / "shape.pth"), num_heads=HEADS)
  torch.save(sd, tmp_path / "ok.pth")
  with pytest.raises(tw.WeightsError, match="register"):
    dw.load_dinov2(str(tmp_path / "ok.pth"), registers=True, num_heads=HEADS)
  with pytest.raises(tw.WeightsError, match="dim"):
    dw.load_dinov2(str(tmp_path / "ok.pth"), variant="vitb14")
  hf_sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  hf_sd["encoder.layer.0.mystery.weight"] = np.zeros(2)
  with pytest.raises(tw.WeightsError, match="mystery"):
    dw.hf_to_hub(hf_sd)
  np.savez(tmp_path / "foreign.npz", a=np.zeros(2))
  with pytest.raises(tw.WeightsError, match="save_npz"):
    dw.load_dinov2(str(tmp_path / "foreign.npz"))


@pytest.mark.parametrize("variant,reg,hf_kw", [
    ("vitb14_reg", True, dict(hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12)),
    ("g", False, dict(hidden_size=1536, num_hidden_layers=40,
                      num_attention_heads=24, use_swiglu_ffn=True)),
])
def test_variant_shapes_match_hf(variant, reg, hf_kw):
  cfg = dv.dinov2_config(variant)
  assert cfg.num_registers == (4 if reg else 0)
  model = nnx.eval_shape(lambda: dv.Dinov2(cfg, rngs=nnx.Rngs(0)))
  ours = sum(int(np.prod(v.shape)) for v in tw.flat_params(model).values())
  hf_cls = transformers.Dinov2WithRegistersModel if reg else transformers.Dinov2Model
  hf_cfg = (transformers.Dinov2WithRegistersConfig if reg else transformers.Dinov2Config)(
      image_size=518, patch_size=14, **hf_kw)
  with torch.device("meta"):
    hf = hf_cls(hf_cfg)
  theirs = sum(p.numel() for k, p in hf.named_parameters() if "mask_token" not in k)
  assert ours == theirs


def test_from_pretrained_hub_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  t0 = time.time()
  with pytest.raises(RuntimeError, match="dinov2-with-registers-base"):
    dw.from_pretrained_hub("vitb14_reg", cache_dir=str(tmp_path))
  assert time.time() - t0 < 10


def _inter(model, x):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s).intermediate_layers(x, (1,)))(state, x)


def test_unscanned_and_bf16(hf_dirs):
  _, d = hf_dirs["reg"]
  x = jnp.asarray(_inputs(8, 56, 56, b=1))
  (ref,), ref_cls = _inter(dw.load_dinov2(d), x)
  (got,), cls = _inter(dw.load_dinov2(d, scan_layers=False), x)
  assert rel_err(got, ref) <= 1e-5 and rel_err(cls, ref_cls) <= 1e-5
  (low,), _ = _inter(dw.load_dinov2(d, dtype="bfloat16"), x)
  assert low.dtype == jnp.bfloat16
  assert rel_err(low.astype(jnp.float32), ref) < 0.1
