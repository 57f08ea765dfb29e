"""Official PyTorch checkpoints -> glue_jax: parity with golden outputs.

The fixtures (tests/fixtures/official) hold tiny official models' weights and
their outputs, generated once from the official code (see the README there).
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import glue_jax  # noqa: E402
from glue_jax.models import torch_weights  # noqa: E402
from glue_jax.tools import import_torch  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "official")
TINY = ["--model", "custom", "--set", "num_heads=4", "--set", "encoder_depth=2"]


def _import(tmp_path, variant, *extra):
  out = tmp_path / variant
  rc = import_torch.main(["--arch", variant, "--checkpoint",
                          os.path.join(FIX, f"{variant}_tiny.pt"), "--out", str(out),
                          *TINY, *extra])
  assert rc == 0
  return out


def _rel(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("variant", ["reglue", "reg", "repa", "sit"])
def test_official_outputs_reproduced(tmp_path, variant):
  cfg = json.load(open(os.path.join(FIX, f"{variant}_config.json")))
  model = glue_jax.load_model(str(_import(tmp_path, variant)))
  g = np.load(os.path.join(FIX, f"{variant}_golden.npz"))
  x = g["x"].transpose(0, 2, 3, 1)
  t, sign = g["t"], 1.0
  if variant == "sit":         # official SiT: t=0 noise; our API: t=0 data
    t, sign = 1.0 - g["t"], -1.0
  v, v_g, proj = model(x, t, g["y"], g["cls_token"] if "cls_token" in g.files else None)
  assert _rel(sign * np.asarray(v).transpose(0, 3, 1, 2), g["out_x"]) < 1e-5
  if "out_cls" in g.files:
    assert _rel(v_g, g["out_cls"]) < 1e-5
  if "out_zs" in g.files:
    assert _rel(proj, g["out_zs"][0]) < 1e-5
  else:
    assert proj is None
  assert model.step == cfg.get("checkpoint_steps", model.step)


def test_wrapped_checkpoint_imports_ema_and_model(tmp_path):
  out = _import(tmp_path, "reglue")
  ema = glue_jax.load_model(str(out))
  raw = glue_jax.load_model(str(out), use_ema=False)
  assert ema.step == 123 and ema.meta["method"] == "reglue"
  assert ema.preset.cfg_scale == 2.8 and ema.preset.interval == (0.0, 0.9)
  g = np.load(os.path.join(FIX, "reglue_golden.npz"))
  args = (g["x"].transpose(0, 2, 3, 1), g["t"], g["y"], g["cls_token"])
  assert _rel(ema(*args)[0], np.asarray(raw(*args)[0])) > 1e-3   # different weights


def _write(tmp_path, sd, name="bad.pt"):
  path = tmp_path / name
  torch.save(sd, path)
  return str(path)


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
  sd = torch.load(os.path.join(FIX, "repa_tiny.pt"), weights_only=True)
  bad = dict(sd)
  del bad["blocks.1.mlp.fc1.bias"]
  bad["extra.weight"] = torch.zeros(3)
  with pytest.raises(torch_weights.WeightsError, match=r"blocks\.1\.mlp\.fc1\.bias"):
    import_torch.import_checkpoint(_write(tmp_path, bad), str(tmp_path / "o1"),
                                   arch="repa", model="custom",
                                   overrides={"num_heads": 4, "encoder_depth": 2})
  bad = dict(sd)
  del bad["blocks.1.mlp.fc1.bias"]
  with pytest.raises(torch_weights.WeightsError, match="missing key"):
    import_torch.import_checkpoint(_write(tmp_path, bad, "b2.pt"), str(tmp_path / "o2"),
                                   arch="repa", model="custom",
                                   overrides={"num_heads": 4, "encoder_depth": 2})
  bad = dict(sd)
  bad["extra.weight"] = torch.zeros(3)
  with pytest.raises(torch_weights.WeightsError, match=r"unexpected keys.*extra\.weight"):
    import_torch.import_checkpoint(_write(tmp_path, bad, "b3.pt"), str(tmp_path / "o3"),
                                   arch="repa", model="custom",
                                   overrides={"num_heads": 4, "encoder_depth": 2})


def test_wrong_preset_and_arch_are_clear_errors(tmp_path):
  path = os.path.join(FIX, "repa_tiny.pt")
  with pytest.raises(torch_weights.WeightsError, match="hidden_size=48.*SiT-XL/2 has 1152"):
    import_torch.import_checkpoint(path, str(tmp_path / "a"), arch="repa",
                                   model="SiT-XL/2")
  with pytest.raises(torch_weights.WeightsError, match=r"\[CLS\]"):
    import_torch.import_checkpoint(path, str(tmp_path / "b"), arch="reglue",
                                   model="custom",
                                   overrides={"num_heads": 4, "encoder_depth": 2})


def test_refuses_to_overwrite(tmp_path):
  _import(tmp_path, "reg")
  rc = import_torch.main(["--arch", "reg", "--checkpoint", os.path.join(FIX, "reg_tiny.pt"),
                          "--out", str(tmp_path / "reg"), *TINY])
  assert rc == 2
