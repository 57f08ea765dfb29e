"""Trainer: sharded == single-device step, shardings, resume equivalence, errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glue_jax import sharding
from glue_jax.train import checkpoint as ckpt_lib
from glue_jax import diffusion_job
from glue_jax import sharding
from glue_jax.train import step as step_lib
from glue_jax.transport import objective
from tests import train_utils


@pytest.fixture(scope="module")
def features(tmp_path_factory):
  return train_utils.write_features(str(tmp_path_factory.mktemp("f") / "train.npz"))


def _batch(run, n=8):
  ex = [run.source[i] for i in range(n)]
  return {k: np.stack([e[k] for e in ex]) for k in ex[0]}


def test_sharded_step_equals_single_device(features):
  cfg = train_utils.tiny_config(features, mesh={"data": 4, "fsdp": 2})
  run = diffusion_job.build(cfg)
  params = diffusion_job.init_params(run, 0)
  step = objective.make_train_step(run.graphdef, run.tx, run.step_cfg)
  key = jax.random.key(0)
  batch = _batch(run)
  with jax.set_mesh(run.mesh), sharding.logical_rules(run.rules, run.mesh):
    state = jax.jit(lambda p: step_lib.init_state(p, run.tx),
                    out_shardings=run.state_shardings)(params)
    gb = sharding.global_batch(batch, run.batch_shardings)
    # intended shardings: FSDP on the hidden axis, batch over data x fsdp
    qkv = state["params"]["blocks"]["attn"]["qkv"]["kernel"]
    want = lambda spec, nd: jax.sharding.NamedSharding(run.mesh, spec)
    assert qkv.sharding.is_equivalent_to(want(P(None, "fsdp", None), 3), 3)
    assert gb["latents"].sharding.is_equivalent_to(want(P(("data", "fsdp")), 4), 4)
    sharded = jax.jit(step, in_shardings=(run.state_shardings, run.batch_shardings, None),
                      out_shardings=(run.state_shardings, None))
    s1, m1 = sharded(state, gb, key)
    s1, m1b = sharded(s1, gb, key)
  host = jax.device_get(params)
  single = jax.jit(step)
  s2 = step_lib.init_state(jax.tree.map(jnp.asarray, host), run.tx)
  s2, m2 = single(s2, jax.tree.map(jnp.asarray, batch), key)
  s2, m2b = single(s2, jax.tree.map(jnp.asarray, batch), key)
  np.testing.assert_allclose(float(m1b["loss"]), float(m2b["loss"]), rtol=1e-5)
  # Compare what the two AdamW steps moved, in units of the learning rate.
  # Sharding changes only the order of float32 reductions; AdamW divides each
  # gradient element by its own RMS, so an element whose gradient is near the
  # reduction noise can move differently by a fraction of lr that depends on the
  # CPU's kernels (measured up to 1.2e-3 lr over 3 meshes x 3 seeds), while a
  # real sharding bug (a wrong shard, a missing all-reduce) moves parameters by
  # O(lr).  An absolute tolerance on the parameters themselves (atol 1e-6 = 1e-3
  # lr) was at that noise floor and flaked.
  lr = cfg.optim.lr
  for p0, a, b in zip(jax.tree.leaves(host), jax.tree.leaves(s1["params"]),
                      jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose((np.asarray(a) - p0) / lr, (np.asarray(b) - p0) / lr,
                               rtol=0, atol=1e-2)
  for a, b in zip(jax.tree.leaves(s1["opt_state"]), jax.tree.leaves(s2["opt_state"])):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.abs(b).max()), np.finfo(np.float32).tiny) if b.size else 1.0
    np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=1e-4)   # moments, leaf-relative


def _final_params(workdir):
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  step = ck.latest_step()
  r = ck.restore(step, state=ck.abstract_item(step, "state"),
                 ema=ck.abstract_item(step, "ema"))
  ck.close()
  return step, {**r["state"], "ema": r["ema"]}


def _worker(features, workdir, steps, kill=-1, mesh=(8, 1)):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["PYTHONPATH"] = root
  return subprocess.run([sys.executable, "-m", "tests.kill_worker", features, workdir,
                         str(steps), str(kill), str(mesh[0]), str(mesh[1])],
                        cwd=root, env=env, capture_output=True, text=True, timeout=600)


def _iter_state(workdir, step):
  d = os.path.join(workdir, "checkpoints", str(step), "data_iter")
  return {f: open(os.path.join(d, f)).read() for f in sorted(os.listdir(d))
          if f.startswith("process_")}


def test_resume_after_kill_equals_uninterrupted(features, tmp_path):
  straight = str(tmp_path / "straight")
  diffusion_job.train(train_utils.tiny_config(features, steps=6), straight)
  resumed = str(tmp_path / "resumed")
  r = _worker(features, resumed, steps=6, kill=3)       # SIGKILL right after step 3
  assert r.returncode == -9, r.stderr[-2000:]
  assert ckpt_lib.Checkpointer(os.path.join(resumed, "checkpoints")).all_steps() == [3]
  diffusion_job.train(train_utils.tiny_config(features, steps=6), resumed)   # resumes 3 -> 6
  sa, a = _final_params(straight)
  sb, b = _final_params(resumed)
  assert sa == sb == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _iter_state(straight, 6) == _iter_state(resumed, 6)     # same data order


def test_restore_onto_a_different_mesh(features, tmp_path):
  straight = str(tmp_path / "straight")
  diffusion_job.train(train_utils.tiny_config(features, steps=6), straight)
  wd = str(tmp_path / "remesh")
  diffusion_job.train(train_utils.tiny_config(features, steps=3, mesh={"data": 8, "fsdp": 1}), wd)
  diffusion_job.train(train_utils.tiny_config(features, steps=6, mesh={"data": 2, "fsdp": 4}), wd)
  _, a = _final_params(straight)
  _, b = _final_params(wd)
  # Same reasoning as test_sharded_step_equals_single_device: compare how far
  # the 6 AdamW steps moved each parameter, in units of the learning rate.
  cfg = train_utils.tiny_config(features, steps=6)
  p0 = jax.device_get(diffusion_job.init_params(diffusion_job.build(cfg), cfg.seed))
  lr = cfg.optim.lr
  for p, x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(a["params"]),
                     jax.tree.leaves(b["params"])):
    np.testing.assert_allclose((np.asarray(x) - p) / lr, (np.asarray(y) - p) / lr,
                               rtol=0, atol=2e-2)


def test_config_mismatch_is_clear_error(features, tmp_path):
  wd = str(tmp_path / "run")
  cfg = train_utils.tiny_config(features, steps=3)
  cfg.train.profile_steps = (1, 2)
  out = diffusion_job.train(cfg, wd)
  assert os.listdir(os.path.join(wd, "profile"))            # a trace was written
  aot = out["aot"]                                         # AOT memory analysis at start-up
  assert aot["argument_size_gib"] > 0 and aot["temp_size_gib"] >= 0
  other = train_utils.tiny_config(features, steps=6, method="repa")
  with pytest.raises(diffusion_job.ConfigMismatchError, match="method"):
    diffusion_job.train(other, wd)


def test_loaded_model_from_training_run_samples(features, tmp_path):
  import glue_jax
  wd = str(tmp_path / "run")
  diffusion_job.train(train_utils.tiny_config(features, steps=3), wd)
  model = glue_jax.load_model(wd)
  x0, g0 = model.sample(np.array([0, 1]), num_steps=5)
  assert x0.shape == (2, 8, 8, 20) and g0.shape == (2, 32)
  assert np.isfinite(np.asarray(x0)).all()
  raw = glue_jax.load_model(wd, use_ema=False)      # raw params of a training checkpoint
  assert jax.tree.structure(raw.params) == jax.tree.structure(model.params)


def test_sigterm_checkpoints_and_exits_then_resumes(features, tmp_path):
  wd = str(tmp_path / "preempt")
  cfg = train_utils.tiny_config(features, steps=6)
  cfg.debug.sigterm_at_step = 2
  out = diffusion_job.train(cfg, wd)
  assert out["step"] == 2
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints")).all_steps() == [2]
  out = diffusion_job.train(train_utils.tiny_config(features, steps=6), wd)
  assert out["step"] == 6


def test_check_compatible_accepts_new_fields_at_default():
  """A checkpoint written before a SiTConfig field existed still restores when
  the config leaves that field at its default; a non-default value is an error."""
  import dataclasses
  from glue_jax.models import sit
  net = dataclasses.asdict(sit.SiTConfig(input_size=8, depth=2, hidden_size=32, num_heads=2))
  old = {k: v for k, v in net.items() if k != "prompt_pooled"}
  meta = {"network": {"name": "sit", "config": net}, "method": {"name": "sit"}}
  saved = {"network": {"name": "sit", "config": old}, "method": {"name": "sit"}}
  diffusion_job.check_compatible(saved, meta, "ckpt/3")                 # default: fine
  meta["network"]["config"] = dict(net, prompt_pooled=True)
  with pytest.raises(diffusion_job.ConfigMismatchError, match="prompt_pooled"):
    diffusion_job.check_compatible(saved, meta, "ckpt/3")
