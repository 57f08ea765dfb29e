"""Parity of glue_jax.models.vae with diffusers' AutoencoderKL (fp32)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from glue_jax.models import torch_weights as tw  # noqa: E402
from glue_jax.models import vae as vae_lib  # noqa: E402
from glue_jax.models import vae_weights as vw  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
VARIANTS = {
    "default": {},
    "no_quant_no_attn": dict(use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False),
}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def reference(request, tmp_path_factory):
  """A perturbed tiny diffusers VAE saved with save_pretrained + its outputs."""
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(
      block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
      latent_channels=4, sample_size=32,
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, **VARIANTS[request.param]).eval()
  with torch.no_grad():
    for p in ref.parameters():  # GroupNorm affines / biases start at 1 / 0
      p.add_(0.1 * torch.randn_like(p))
  directory = str(tmp_path_factory.mktemp(f"vae_{request.param}"))
  ref.save_pretrained(directory)
  x = torch.rand(2, 3, 32, 32) * 2 - 1
  z = torch.randn(2, 4, 16, 16)
  with torch.no_grad():
    post = ref.encode(x).latent_dist
    out = ref.decode(z).sample
  return dict(dir=directory, x=nhwc(x), z=nhwc(z), mean=nhwc(post.mean),
              std=nhwc(post.std), out=nhwc(out))


def check_outputs(model, ref):
  mean, std = vae_lib.jit_method(model, "encode_moments")(ref["x"])
  assert mean.shape == (2, 16, 16, 4) and std.shape == (2, 16, 16, 4)
  assert rel_err(mean, ref["mean"]) <= 1e-4
  assert rel_err(std, ref["std"]) <= 1e-4
  out = vae_lib.jit_method(model, "decode")(ref["z"])
  assert out.shape == (2, 32, 32, 3)
  assert rel_err(out, ref["out"]) <= 1e-4


def copy_with_state_dict(src, dst, sd):
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  safetensors_torch.save_file(sd, os.path.join(dst, WEIGHTS))
  return dst


def saved_state_dict(directory):
  return safetensors_torch.load_file(os.path.join(directory, WEIGHTS))


def test_parity_diffusers_directory(reference):
  model = vw.load_vae(reference["dir"])
  check_outputs(model, reference)
  if "no_quant" in reference["dir"]:
    return  # sampling is config-independent; spare a compilation
  key = jax.random.key(3)
  sample = vae_lib.jit_method(model, "encode")(reference["x"], key)
  eps = jax.random.normal(key, sample.shape)
  np.testing.assert_allclose(sample, reference["mean"] + reference["std"] * eps,
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("as_conv", [False, True], ids=["linear", "conv1x1"])
def test_parity_legacy_attention_keys(reference, tmp_path, as_conv):
  if "no_quant" in reference["dir"]:
    # This variant has no mid-block attention: nothing to rename, and none of
    # its keys may look like attention weights.
    assert not any(".attentions." in k for k in saved_state_dict(reference["dir"]))
    return
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  sd, renamed = {}, 0
  for k, v in saved_state_dict(reference["dir"]).items():
    for new, old in legacy.items():
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        v = v[:, :, None, None].contiguous() if as_conv and v.ndim == 2 else v
        renamed += 1
    sd[k] = v
  assert renamed == 16  # 4 projections x (weight, bias) x encoder/decoder
  directory = copy_with_state_dict(reference["dir"], str(tmp_path / "legacy"), sd)
  check_outputs(vw.load_vae(directory), reference)


def test_single_file_with_config(reference, tmp_path):
  with open(os.path.join(reference["dir"], "config.json")) as f:
    config = json.load(f)
  path = str(tmp_path / "vae.bin")
  torch.save(saved_state_dict(reference["dir"]), path)
  check_outputs(vw.load_vae(path, config), reference)
  st = os.path.join(reference["dir"], WEIGHTS)
  model = vw.load_vae(st, vae_lib.VAEConfig.from_diffusers(config))
  check_outputs(model, reference)


def test_npz_roundtrip(reference, tmp_path):
  model = vw.load_vae(reference["dir"])
  path = str(tmp_path / "vae.npz")
  vw.save_npz(model, path)
  again = vw.load_vae(path)
  assert again.cfg == model.cfg and again is not model
  a, b = tw.flat_params(model), tw.flat_params(again)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k].value), np.asarray(b[k].value))
  # Loading again must not alias the variables of an earlier model.
  key = "encoder/conv_in/bias"
  b[key].value = b[key].value + 1.0
  assert not np.array_equal(np.asarray(a[key].value), np.asarray(b[key].value))


def test_missing_and_unexpected_keys_are_named(reference, tmp_path):
  sd = saved_state_dict(reference["dir"])
  missing = dict(sd)
  del missing["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
  d1 = copy_with_state_dict(reference["dir"], str(tmp_path / "missing"), missing)
  with pytest.raises(tw.WeightsError,
                     match=r"missing.*decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut\.weight"):
    vw.load_vae(d1)
  extra = dict(sd, **{"encoder.bogus.weight": torch.zeros(3)})
  d2 = copy_with_state_dict(reference["dir"], str(tmp_path / "extra"), extra)
  with pytest.raises(tw.WeightsError, match=r"unexpected.*encoder\.bogus\.weight"):
    vw.load_vae(d2)
  bad = dict(sd, **{"encoder.conv_in.weight": torch.zeros(32, 3, 5, 5)})
  d3 = copy_with_state_dict(reference["dir"], str(tmp_path / "bad"), bad)
  with pytest.raises(tw.WeightsError, match=r"encoder/conv_in/kernel"):
    vw.load_vae(d3)


def test_legacy_and_current_names_conflict():
  sd = {"mid_block.attentions.0.query.weight": np.zeros((4, 4)),
        "mid_block.attentions.0.to_q.weight": np.zeros((4, 4))}
  with pytest.raises(tw.WeightsError, match="query.weight"):
    vw.rename_legacy_attention(sd)


def test_ldm_layout_is_a_clear_error():
  model = vw._abstract_model(vae_lib.VAEConfig(block_out_channels=(32,),
                                               norm_num_groups=8))
  with pytest.raises(tw.WeightsError, match="CompVis/LDM"):
    vw.mapping_from_diffusers(model, {"encoder.down.0.block.0.norm1.weight": np.ones(3)})


def test_sd_config_and_latent_spaces():
  sd_vae_ft_mse = {  # config.json of stabilityai/sd-vae-ft-mse
      "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2",
      "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
      "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
      "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
      "out_channels": 3, "sample_size": 256,
      "up_block_types": ["UpDecoderBlock2D"] * 4}
  cfg = vae_lib.VAEConfig.from_diffusers(sd_vae_ft_mse)
  assert cfg == vae_lib.VAEConfig() and cfg.downsample_factor == 8
  assert vae_lib.VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
  with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
    vae_lib.VAEConfig.from_diffusers(
        dict(sd_vae_ft_mse, down_block_types=["AttnDownEncoderBlock2D"] * 4))
  model = vw._abstract_model(vae_lib.VAEConfig(block_out_channels=(32,),
                                               norm_num_groups=8))
  z = np.linspace(-2, 2, 8, dtype=np.float32)
  np.testing.assert_allclose(model.to_model_space(z), z * 0.18215, rtol=1e-6)
  np.testing.assert_allclose(model.from_model_space(model.to_model_space(z)), z,
                             rtol=1e-6)


def test_hub_offline_is_a_prompt_clear_error(tmp_path, monkeypatch):
  pytest.importorskip("huggingface_hub")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(RuntimeError, match="sd-vae-ft-mse"):
    vw.from_pretrained_hub(cache_dir=str(tmp_path))
