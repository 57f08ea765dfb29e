"""Evaluation at scale: resumable sharded sampling, .npz, references, scoring, CLI.

A tiny REGLUE-shaped SiT (1 block, width 32, 4x4x16 input = 8x8 RGB pixels
through the exact pixel tokenizer + 4 semantic channels, an 8-d global token)
with random weights is saved with ``api.save_network``; the sampler preset
stored with it uses 3 SDE steps with CFG and an interval.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glue_jax import sharding
from glue_jax import api, evaluate
from glue_jax.eval import features, generate, reference, sample_store
from glue_jax.sampling import presets
from tests import train_utils

N = 13                       # samples: two 8-device steps, the second padded
PRESET = presets.SamplerPreset(num_steps=3, cfg_scale=2.0, interval=(0.0, 0.7))


def make_checkpoint(d: str) -> str:
  """A tiny random REGLUE-shaped SiT saved with its sampler preset (also used
  by tests/faults)."""
  cfg, state = train_utils.tiny_random_sit()
  api.save_network(d, "sit", cfg, state, ema=state, step=7, extra={
      "sampler": PRESET.to_dict(),
      "first_stage": {"name": "pixel", "factor": 2, "channels": 3, "scale": 1.0,
                      "shift": 0.0}})
  return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def model(ckpt):
  return api.load_model(ckpt)


def _opts(out_dir, **kw):
  base = dict(out_dir=str(out_dir), num_samples=N, per_device_batch=1, shard_size=1,
              features="none", progress=False)
  base.update(kw)
  return evaluate.EvalOptions(**base)


@pytest.fixture(scope="module")
def full(model, tmp_path_factory):
  """An uninterrupted run on all 8 devices."""
  out = tmp_path_factory.mktemp("full")
  result = evaluate.sample(_opts(out), model=model)
  with np.load(result["npz"]) as f:
    return dict(result, images=f["arr_0"], labels=f["arr_1"])


def test_full_run_outputs(full, model):
  images, labels = full["images"], full["labels"]
  assert images.shape == (N, 8, 8, 3) and images.dtype == np.uint8
  assert full["preset"] == PRESET.to_dict()           # the stored preset is the default
  assert full["checkpoint_step"] == 7
  np.testing.assert_array_equal(labels, generate.host_labels(0, np.arange(N), 5, "random"))
  assert labels.min() >= 0 and labels.max() < 5 and len(set(labels.tolist())) > 2
  assert images.std() > 20 and len({im.tobytes() for im in images}) == N
  assert os.path.exists(os.path.join(full["out_dir"], "samples.png"))
  # Sample i is a function of (seed, i): the API's sampler agrees.
  idx = np.array([3, 11])
  x0, _ = model.sample(labels[idx], seed=0, indices=idx)
  from glue_jax.models import pixel_tokenizer
  want = pixel_tokenizer.to_uint8(pixel_tokenizer.decode(x0[..., :12], 2, 3))
  # (Same per-sample computation at another batch size: equal up to float
  # rounding, which uint8 truncation can turn into one level.)
  diff = np.abs(np.asarray(want, int) - images[idx])
  assert diff.max() <= 1 and (diff > 0).mean() < 0.02


def test_crash_and_resume_gives_identical_samples(full, model, tmp_path):
  written = []

  def crash_after_5(shard):
    written.append(shard)
    if len(written) == 5:
      raise KeyboardInterrupt("simulated kill")

  with pytest.raises(KeyboardInterrupt):
    evaluate.sample(_opts(tmp_path), model=model, on_shard=crash_after_5)
  store_dir = tmp_path / "shards"
  assert len(list(store_dir.glob("shard_*.npz"))) == 5
  assert not list(tmp_path.glob("*.npz"))               # no npz before completion
  resumed = []
  result = evaluate.sample(_opts(tmp_path), model=model, on_shard=resumed.append)
  assert result["sampling"]["skipped_shards"] == 5
  assert sorted(resumed) == sorted(set(range(N)) - set(written))    # no duplicates
  with np.load(result["npz"]) as f:
    np.testing.assert_array_equal(f["arr_0"], full["images"])
    np.testing.assert_array_equal(f["arr_1"], full["labels"])


def test_one_device_gives_identical_samples(full, model, tmp_path):
  one = sharding.data_mesh(jax.devices()[:1])
  result = evaluate.sample(_opts(tmp_path), model=model, mesh=one)
  with np.load(result["npz"]) as f:
    np.testing.assert_array_equal(f["arr_0"], full["images"])


def test_store_refuses_other_settings_and_redoes_corrupt_shards(full, model, tmp_path):
  import shutil
  shutil.copytree(os.path.dirname(full["npz"]), tmp_path, dirs_exist_ok=True)
  os.remove(tmp_path / os.path.basename(full["npz"]))
  with pytest.raises(sample_store.StoreError, match="seed"):
    evaluate.sample(_opts(tmp_path, seed=1), model=model)
  bad = tmp_path / "shards" / "shard_000004.npz"
  bad.write_bytes(bad.read_bytes()[:100])                # a torn write
  np.savez(tmp_path / "shards" / "shard_000006.npz", images=np.zeros((1, 8, 8, 3), np.uint8),
           labels=np.array([99], np.int32), indices=np.array([6]))   # wrong label
  redone = []
  result = evaluate.sample(_opts(tmp_path), model=model, on_shard=redone.append)
  assert sorted(redone) == [4, 6]
  with np.load(result["npz"]) as f:
    np.testing.assert_array_equal(f["arr_0"], full["images"])
  with pytest.raises(sample_store.StoreError, match="multiple of the store's shard size"):
    evaluate.sample(_opts(tmp_path, per_device_batch=1, shard_size=2), model=model)


def test_npz_roundtrip_and_streaming_reader(full, tmp_path):
  path = full["npz"]
  assert sample_store.npz_array_info(path) == ((N, 8, 8, 3), np.dtype(np.uint8))
  for bs in (1, 4, 100):
    got = np.concatenate(list(sample_store.iter_npz_batches(path, "arr_0", bs)))
    np.testing.assert_array_equal(got, full["images"])
  assert len(np.concatenate(list(sample_store.iter_npz_batches(path, limit=5)))) == 5
  # Round trip through the streaming writer from arbitrary batches.
  imgs, labels = full["images"], full["labels"]
  out = str(tmp_path / "rt.npz")
  sample_store.write_npz_streaming(out, imgs.shape, [(imgs[:6], labels[:6]),
                                                     (imgs[6:], labels[6:])])
  with np.load(out) as f:
    assert sorted(f.files) == ["arr_0", "arr_1"]
    np.testing.assert_array_equal(f["arr_0"], imgs)
    np.testing.assert_array_equal(f["arr_1"], labels)
  with pytest.raises(sample_store.StoreError, match="only 6 of 13"):
    sample_store.write_npz_streaming(str(tmp_path / "short.npz"), imgs.shape,
                                     [(imgs[:6], labels[:6])])
  assert not os.path.exists(tmp_path / "short.npz")
  with pytest.raises(sample_store.StoreError, match="no array 'images'"):
    sample_store.npz_array_info(path, "images")


def test_label_modes():
  idx = np.arange(20)
  rand = generate.host_labels(3, idx, 7, "random")
  np.testing.assert_array_equal(generate.host_labels(3, idx[[5, 17]], 7, "random"),
                                rand[[5, 17]])         # depends on (seed, i) only
  assert not np.array_equal(rand, generate.host_labels(4, idx, 7, "random"))
  assert set(rand.tolist()) <= set(range(7)) and len(set(rand.tolist())) > 3
  np.testing.assert_array_equal(generate.host_labels(0, idx, 7, "balanced"), idx % 7)
  np.testing.assert_array_equal(generate.host_labels(0, idx, 7, "null"), 7)
  with pytest.raises(ValueError, match="label mode"):
    generate.sample_labels(0, idx, 7, "sorted")


def test_label_modes_at_imagenet_scale():
  """Issue 19 item 7.  Official (REGLUE/REPA generate.py): i.i.d. uniform
  labels (torch.randint), so 50K samples do not give 50 per class; the
  balanced option gives exactly 50 of each of 1000 classes."""
  idx = np.arange(50_000)
  bal = generate.label_counts(generate.host_labels(0, idx, 1000, "balanced"), 1000)
  assert bal == {"min": 50, "max": 50, "classes": 1000}
  rand = generate.host_labels(0, idx, 1000, "random")
  counts = np.bincount(rand, minlength=1000)
  # Multinomial(50K, 1/1000): the chi-square statistic has mean 999 and sd
  # sqrt(2 * 999) ~ 45; 5 sd either side.
  chi2 = ((counts - 50.0) ** 2 / 50.0).sum()
  assert abs(chi2 - 999) < 5 * 45, chi2
  assert counts.min() < 50 < counts.max()
  assert generate.label_counts(rand, 1000)["max"] == counts.max()


def test_metadata_records_labels_and_vae_cfg(model, tmp_path):
  """The label mode and per-class counts reach metrics.json's result; the
  vae_cfg switch reaches the sampler (guiding the network's latent channels)."""
  opts = _opts(tmp_path, labels="balanced", vae_cfg="true", num_samples=10)
  result = evaluate.sample(opts, model=model)
  assert result["labels"] == "balanced"
  assert result["label_counts"] == {"min": 2, "max": 2, "classes": 5}
  assert result["preset"]["vae_cfg"] is True
  with open(tmp_path / "shards" / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["labels"] == "balanced" and manifest["preset"]["vae_cfg"] is True
  with pytest.raises(ValueError, match="vae_cfg"):
    _opts(tmp_path, vae_cfg="yes").sampler_overrides()


def _standin_net():
  """A fixed random projection standing in for the Inception."""
  rng = np.random.default_rng(5)
  params = {"w": jnp.asarray(rng.normal(size=(192, 16)) / 8, jnp.float32),
            "v": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)}

  def apply(p, images):
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
    pool = x @ p["w"]
    return {"pool": pool, "spatial": x[:, :12], "logits": pool @ p["v"]}
  return features.FeatureNet("standin", apply, params, 8)


def test_score_against_reference_tool(full, tmp_path):
  from glue_jax.eval import metrics
  from glue_jax.tools import reference_stats
  net = _standin_net()
  ref_path = reference_stats.compute(f"npz:{full['npz']}", net, image_size=8,
                                     out=str(tmp_path / "ref.npz"), per_device_batch=2,
                                     progress=False)
  opts = _opts(tmp_path, reference=ref_path, feature_batch=2)
  result = evaluate.score(full["npz"], opts, feature_net=net)
  assert result["pr_reference_size"] == N
  assert result["inception_score_splits"] == "splits of 5000 rows (ADM)"
  assert result["fid"] == pytest.approx(0, abs=1e-6)
  assert result["sfid"] == pytest.approx(0, abs=1e-6)
  assert (result["precision"], result["recall"]) == (1.0, 1.0)
  x = full["images"].reshape(N, -1).astype(np.float32) / 255.0
  logits = x @ np.asarray(net.params["w"]) @ np.asarray(net.params["v"])
  assert result["inception_score"] == pytest.approx(metrics.inception_score(logits), rel=1e-4)
  # Against a shifted reference the distances are positive.
  ref = reference.load(ref_path)
  assert ref.tag == "standin" and ref.pool.shape == (N, 16)
  ref.mu = ref.mu + 0.5
  assert metrics.fid_from_features(x @ np.asarray(net.params["w"]), ref.mu, ref.sigma) \
      == pytest.approx(16 * 0.25, rel=1e-3)
  other = features.FeatureNet("other", net.apply, net.params, 8)
  with pytest.raises(reference.ReferenceError, match="feature net 'standin'"):
    evaluate.score(full["npz"], opts, feature_net=other)


def _adm_reads(path):
  """What the ADM evaluator needs of a reference batch (its read_activations
  opens arr_0 first: uint8 NHWC; read_statistics then takes mu.. if present)."""
  with np.load(path) as f:
    return "arr_0" in f.files and f["arr_0"].dtype == np.uint8 and f["arr_0"].ndim == 4


def test_reference_stats_layouts(full, tmp_path):
  """Issue 19 item 6: the default file is a complete ADM reference batch whose
  P/R reference is every image (ADM's rule); --num_pool keeps the same random
  subset in pool and arr_0; --no-include_images is glue_jax-only."""
  from glue_jax.tools import reference_stats
  net, images = _standin_net(), full["images"]
  src = f"npz:{full['npz']}"
  kw = dict(image_size=8, per_device_batch=2, progress=False)
  default = reference_stats.compute(src, net, out=str(tmp_path / "d.npz"), **kw)
  with np.load(default) as f:
    assert set(f.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s", "pool",
                            "feature_net", "num_images"}
    np.testing.assert_array_equal(f["arr_0"], images)
    assert int(f["num_images"]) == N
  assert _adm_reads(default)
  ref = reference.load(default)
  assert ref.num_images == N and len(ref.pool) == N and ref.pool_indices is None
  sub = reference_stats.compute(src, net, out=str(tmp_path / "s.npz"), num_pool=5, seed=3,
                                **kw)
  keep = reference.pool_subset(N, 5, 3)
  with np.load(sub) as f:
    np.testing.assert_array_equal(f["arr_0"], images[keep])
    np.testing.assert_array_equal(f["pool_indices"], keep)
    np.testing.assert_allclose(f["pool"], reference.load(default).pool[keep], rtol=1e-6)
    np.testing.assert_array_equal(f["mu"], reference.load(default).mu)   # all images
  assert _adm_reads(sub)
  bare = reference_stats.compute(src, net, out=str(tmp_path / "b.npz"), include_images=False,
                                 **kw)
  assert not _adm_reads(bare)
  assert reference.load(bare).num_images is None and len(reference.load(bare).pool) == N
  np.savez(tmp_path / "mixed.npz", mu=ref.mu, sigma=ref.sigma, pool=ref.pool[:4],
           arr_0=images)
  with pytest.raises(reference.ReferenceError, match="pool has 4 rows but arr_0 13"):
    reference.load(str(tmp_path / "mixed.npz"))


def test_adm_reference_batch(full, tmp_path):
  net = _standin_net()
  rng = np.random.default_rng(0)
  mu, a = rng.normal(size=16), rng.normal(size=(16, 16))
  mu_s, b = rng.normal(size=12), rng.normal(size=(12, 12))
  path = str(tmp_path / "VIRTUAL_test.npz")
  np.savez(path, mu=mu, sigma=a @ a.T, mu_s=mu_s, sigma_s=b @ b.T, arr_0=full["images"])
  ref = reference.load(path)
  assert ref.tag is None and ref.num_images == N and ref.pool is None
  np.testing.assert_array_equal(ref.mu, mu)
  extractor = features.Extractor(net, per_device_batch=2)
  done = reference.complete(ref, extractor)
  np.testing.assert_array_equal(done.mu, mu)             # stats come from the file
  np.testing.assert_array_equal(done.sigma_s, b @ b.T)
  want = extractor(features.batches_of(full["images"], 5))["pool"]
  np.testing.assert_allclose(done.pool, want, rtol=1e-6)  # P/R features from arr_0
  np.savez(tmp_path / "bad.npz", mu=mu, sigma=np.eye(3))
  with pytest.raises(reference.ReferenceError, match="sigma"):
    reference.load(str(tmp_path / "bad.npz"))
  np.savez(tmp_path / "empty.npz", labels=np.zeros(3))
  with pytest.raises(reference.ReferenceError, match="no statistics"):
    reference.load(str(tmp_path / "empty.npz"))


@pytest.fixture
def optimized_xla():
  """Compiler optimizations on: conv training runs ~10x slower without them."""
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", True)


def test_digits_classifier_cache(tmp_path, optimized_xla):
  from glue_jax.data import digits
  from glue_jax.eval import digits_classifier
  path = str(tmp_path / "clf.npz")
  clf = digits_classifier.load_or_train(path, image_size=8, steps=100, batch_size=64)
  test = digits.load("test", 8)
  acc = clf.accuracy(test["image"], test["label"])
  assert acc > 0.6, acc                   # chance: 0.1
  again = digits_classifier.load_or_train(path, image_size=8)     # cached, not retrained
  np.testing.assert_array_equal(again.features(test["image"][:7]),
                                clf.features(test["image"][:7]))
  assert again.features(test["image"][:7]).shape == (7, 64)
  assert again.logits(test["image"][:7]).shape == (7, 10)
  assert again.meta["test_accuracy"] == pytest.approx(acc)
  with pytest.raises(ValueError, match="seed"):
    digits_classifier.load_or_train(path, image_size=8, seed=1)
  with pytest.raises(ValueError, match=r"\(N, 8, 8, 3\)"):
    clf.features(np.zeros((2, 16, 16, 3), np.uint8))


def test_cli(ckpt, full, tmp_path):
  out = tmp_path / "cli"
  with pytest.raises(SystemExit) as e:
    evaluate.main(["evaluate", f"--checkpoint={ckpt}", f"--out_dir={out}",
                   f"--num_samples={N}", "--per_device_batch=1", "--shard_size=1",
                   "--features=none", "--noprogress"])
  assert e.value.code in (0, None)
  with open(out / "metrics.json") as f:
    result = json.load(f)
  assert result["num_samples"] == N and result["preset"] == PRESET.to_dict()
  with np.load(result["npz"]) as f:
    np.testing.assert_array_equal(f["arr_0"], full["images"])


@pytest.fixture(scope="module")
def abstract_inception():
  from glue_jax.models import inception
  return nnx.eval_shape(lambda: inception.FIDInception(rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("mode", ["adm", "pytorch_fid"])
def test_inception_feature_net_shapes(mode, abstract_inception):
  """The Inception adapter's outputs (traced only: shapes, no weights)."""
  net = features.inception(model=abstract_inception, mode=mode)
  out = jax.eval_shape(net.apply, net.params, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8))
  assert {k: v.shape for k, v in out.items()} == {
      "pool": (2, 2048), "spatial": (2, 17 * 17 * 7), "logits": (2, 1008)}
  assert net.tag == f"inception-{mode}"
  with pytest.raises(ValueError, match="inception_weights"):
    features.inception(None)
