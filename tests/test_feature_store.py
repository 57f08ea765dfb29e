"""Feature store: writer/reader round trip, multi-process shards, resume, corruption,
manifest checks, the precompute CLI path and training from the store."""
import io
import json
import os
import shutil
import types

import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from glue_jax.data import digits, feature_reader as fsr, feature_store as fst, imagenet
from glue_jax.data import pipeline, tfds_digits
from glue_jax.models import compressor as compressor_lib
from glue_jax.models import dinov2, dinov2_weights, pixel_tokenizer
from glue_jax.models import semantic_encoder as se
from glue_jax.tools import precompute
from glue_jax.train import checkpoint as ckpt_lib
from glue_jax.train import writers
from glue_jax.configs import common
from tests import train_utils

N, PER_SHARD, BATCH = 20, 8, 8
SHARDS = ["train-0000%d-of-00003.array_record" % k for k in range(3)]


def _png(a):
  b = io.BytesIO()
  Image.fromarray(a).save(b, format="png")
  return b.getvalue()


def _records(n=N):
  images, labels = tfds_digits.native_images()
  return [{"image": _png(images[i]), "label": int(labels[i])} for i in range(n)]


def _random_module(make, seed):
  """A module of the given structure filled with random numbers (no init compile)."""
  module = nnx.eval_shape(make)
  rng = np.random.default_rng(seed)
  for path, v in nnx.to_flat_state(nnx.state(module)):
    a = rng.normal(size=v.shape).astype(np.float32) * 0.2
    v.set_value(np.abs(a) + 0.5 if path[-1] == "var" else a)
  return module


@pytest.fixture(scope="module")
def tiny():
  """A 4-block random ViT (patch 4: 4x4 grid at 16 px), compressor 128->16->16."""
  vit_cfg = dinov2.Dinov2Config(dim=32, depth=4, num_heads=2, patch_size=4, pos_grid=4)
  vit = _random_module(lambda: dinov2.Dinov2(vit_cfg, rngs=nnx.Rngs(0)), 0)
  comp = _random_module(lambda: compressor_lib.Compressor(
      compressor_lib.CompressorConfig(channels=(128, 16, 16)), rngs=nnx.Rngs(1)), 1)
  rng = np.random.default_rng(0)
  stats = (rng.normal(size=128).astype(np.float32) * 0.1,
           (1 + rng.random(128)).astype(np.float32))
  senc = se.SemanticEncoder(vit, se.SemanticSpec((0, 1, 2, 3), None, "compressor"),
                            stats=stats, compressor=comp)
  extract, identity = precompute.make_extractor(precompute.pixel_first_stage(2),
                                                precompute.semantic_component(senc))
  return types.SimpleNamespace(vit=vit, comp=comp, stats=stats, extract=extract,
                               identity=identity)


def _write(directory, tiny, source=None, p=0, n=1, **kw):
  kw.setdefault("identity", tiny.identity)
  kw.setdefault("extract", tiny.extract)
  return fst.write_split(
      str(directory), source=source or imagenet.ImageSource(_records(), image_size=16,
                                                            name="toy/train"),
      split="train", dataset={"name": "toy", "fingerprint": "f0"},
      preprocessing={"crop": "adm_center_crop", "image_size": 16},
      examples_per_shard=PER_SHARD, batch_size=BATCH, process_index=p, process_count=n,
      progress=False, read_threads=2, **kw)


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
  d = tmp_path_factory.mktemp("store") / "train"
  assert _write(d, tiny) is not None
  return str(d)


def test_two_processes_write_a_store_equal_to_direct_features(tiny, tmp_path, store):
  d = tmp_path / "train"
  assert _write(d, tiny, p=0, n=2) is None            # shards 0, 2: not complete yet
  assert sorted(f for f in os.listdir(d) if f.endswith(".array_record")) == SHARDS[::2]
  with pytest.raises(fst.FeatureStoreError, match="incomplete feature store .2 of 3"):
    fsr.load_manifest(str(d))
  manifest = _write(d, tiny, p=1, n=2)                # the last shard completes it
  assert manifest["count"] == N and manifest["num_shards"] == 3
  assert manifest["features"]["semantic"] == {"shape": [4, 4, 16], "dtype": "float32"}
  assert manifest["features"]["align_target"] == {"shape": [16, 32], "dtype": "bfloat16"}
  assert manifest["features"]["latents"]["shape"] == [8, 8, 12]
  assert manifest["identity"]["encoder"]["hash"] == tiny.identity["encoder"]["hash"]
  for s in manifest["shards"]:
    assert s["sha256"] == fst.file_sha256(os.path.join(d, s["file"]))
  for f in SHARDS:                                    # same bytes as one process writing all
    assert open(d / f, "rb").read() == open(os.path.join(store, f), "rb").read()
  src = fsr.open_store(str(d), verify_checksums=True)
  images = np.stack([imagenet.ImageSource(_records(), image_size=16).load(i)["image"]
                     for i in range(N)])
  np.testing.assert_array_equal(images, digits.load("train", 16)["image"][:N])
  for start in range(0, N, BATCH):                    # the writer's batches (last padded)
    x = images[start:start + BATCH]
    x = np.concatenate([x, np.repeat(x[-1:], BATCH - len(x), 0)])
    want = {k: np.asarray(v) for k, v in tiny.extract(x).items()}
    for j in range(min(BATCH, N - start)):
      ex = src[start + j]
      assert int(ex["label"]) == digits.load("train", 16)["label"][start + j]
      for k, v in want.items():
        np.testing.assert_array_equal(ex[k], v[j], err_msg=f"{k}[{start + j}]")
  np.testing.assert_array_equal(src[5]["latents"], pixel_tokenizer.encode(images[5:6], 2)[0])


def test_readers_on_two_processes_and_iterator_state(store, tmp_path):
  src = fsr.open_store(store, keys=["semantic"])
  assert sorted(src[0]) == ["label", "semantic"]
  seen = []
  for p in range(2):
    ds = pipeline.make_dataset(src, batch_size=5, seed=2, process_index=p, process_count=2,
                               num_epochs=1, with_index=True)
    seen.append(set(np.concatenate([b["index"] for b in ds]).tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(N))
  make = lambda: iter(pipeline.make_dataset(src, batch_size=4, seed=1, with_index=True))
  it = make()
  for _ in range(6):
    next(it)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(6, data_iter=it)
  expected = [next(it) for _ in range(3)]
  it2 = make()
  ck.restore(6, data_iter=it2)
  ck.close()
  for a in expected:
    b = next(it2)
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["semantic"], b["semantic"])


def test_resume_after_a_crash_rewrites_partial_shards_identically(tiny, tmp_path, store):
  d = tmp_path / "train"
  with pytest.raises(fst.InjectedFault):
    _write(d, tiny, fault_after_shards=1)
  files = set(os.listdir(d))
  assert SHARDS[0] in files and SHARDS[0] + ".done.json" in files
  assert SHARDS[1] + ".tmp" in files and SHARDS[1] not in files   # partial, unfinished
  assert "manifest.json" not in files
  open(d / SHARDS[2], "wb").write(b"stale file without a sidecar")
  t0 = os.stat(d / SHARDS[0]).st_mtime_ns
  manifest = _write(d, tiny)
  assert os.stat(d / SHARDS[0]).st_mtime_ns == t0      # finished shard skipped
  assert not any(f.endswith(".tmp") for f in os.listdir(d))
  for f in SHARDS + ["manifest.json"]:
    assert open(d / f, "rb").read() == open(os.path.join(store, f), "rb").read(), f
  assert manifest == fsr.load_manifest(store)


def test_missing_truncated_and_corrupt_shards_are_named(store, tmp_path):
  d = tmp_path / "train"
  shutil.copytree(store, d)
  data = open(d / SHARDS[1], "rb").read()
  open(d / SHARDS[1], "wb").write(data[:len(data) // 2])
  with pytest.raises(fst.FeatureStoreError,
                     match=r"shard train-00001-of-00003.array_record \(examples 8..15\): "
                           r"\d+ bytes, manifest says \d+ \(truncated"):
    fsr.open_store(str(d))
  # a same-size file with a flipped byte: checksums catch it, and so does reading
  flipped = bytearray(data)
  flipped[len(data) // 8] ^= 0x5A
  open(d / SHARDS[1], "wb").write(bytes(flipped))
  with pytest.raises(fst.FeatureStoreError, match="train-00001.*SHA-256 differs"):
    fsr.open_store(str(d), verify_checksums=True)
  src = fsr.open_store(str(d))
  src[0], src[19]                                      # other shards still read
  with pytest.raises(fst.FeatureStoreError, match=r"train-00001-of-00003.array_record: "
                                                  r"(cannot open|example \d+)"):
    [src[i] for i in range(8, 16)]
  os.remove(d / SHARDS[2])
  with pytest.raises(fst.FeatureStoreError, match="train-00002.*file missing"):
    fsr.open_store(str(d))


def test_manifest_and_config_mismatches(store, tiny, tmp_path):
  with pytest.raises(fst.ManifestMismatchError) as e:
    fsr.open_store(store, keys=["semantic", "depth"], shapes={"semantic": [8, 8, 16]},
                   dtypes={"cls": "bfloat16"}, identity={"encoder": "deadbeef"},
                   dataset="imagenet2012")
  msg = str(e.value)
  for part in ("feature 'depth' missing", "store shape [4, 4, 16] != config [8, 8, 16]",
               "store dtype float32 != config bfloat16", "identity.encoder: store hash",
               "dataset: store 'toy' != config 'imagenet2012'"):
    assert part in msg, (part, msg)
  cfg = ml_collections.ConfigDict({
      "name": "feature_store", "path": os.path.dirname(store),
      "identity": {"encoder": tiny.identity["encoder"]["hash"],
                   "compressor": tiny.identity["compressor"]["hash"]},
      "expect_shapes": {"semantic": [4, 4, 16], "cls": [32]}, "split_fingerprint": "f0"})
  assert len(fsr.open_source(cfg, "train")) == N
  cfg.split_fingerprint = "other"
  with pytest.raises(fst.ManifestMismatchError, match="dataset fingerprint: store f0"):
    fsr.open_source(cfg, "train")
  with pytest.raises(FileNotFoundError, match="no feature store for split 'val'"):
    fsr.open_source(cfg, "val")
  # resuming into a store made with other weights is refused, listing the difference
  d = tmp_path / "train"
  shutil.copytree(store, d)
  other = json.loads(json.dumps(tiny.identity))
  other["encoder"]["hash"] = "0" * 64
  with pytest.raises(fst.ManifestMismatchError, match=r"different configuration.*\n.*"
                                                      r"identity.encoder.hash"):
    _write(d, tiny, identity=other)


def test_bad_extractor_output_and_corrupt_images(tiny, tmp_path):
  spec = fst.infer_features(tiny.extract, BATCH, (16, 16, 3))
  half = lambda x: {**tiny.extract(x), "semantic": np.asarray(tiny.extract(x)["semantic"],
                                                               np.float16)}
  with pytest.raises(fst.FeatureStoreError,
                     match=r"toy/train: shard train-00000-of-00003.array_record: examples "
                           r"0..7: extractor output 'semantic' is float16\[4, 4, 16\], the "
                           r"store holds float32\[4, 4, 16\]"):
    _write(tmp_path / "a", tiny, extract=half, features=spec)

  def nan_at_5(x):
    out = {k: np.array(v) for k, v in tiny.extract(x).items()}
    out["cls"][5] = np.nan
    return out
  with pytest.raises(fst.FeatureStoreError, match=r"shard train-00000.*example 5: "
                                                  r"non-finite values in 'cls'"):
    _write(tmp_path / "b", tiny, extract=nan_at_5, features=spec)

  recs = _records()
  recs[5]["image"] = b"\x89PNG garbage"
  with pytest.raises(imagenet.CorruptImageError, match="toy/train: example 5"):
    _write(tmp_path / "c", tiny, source=imagenet.ImageSource(recs, image_size=16,
                                                             name="toy/train"))
  skip = imagenet.ImageSource(recs, image_size=16, name="toy/train", on_corrupt="skip")
  manifest = _write(tmp_path / "d", tiny, source=skip)
  assert manifest["skipped"] == [{"index": 5, "reason": "corrupt image"}]
  src = fsr.open_store(str(tmp_path / "d"))
  assert len(src) == N - 1 and src.store_index(5) == 6
  with pytest.raises(fst.FeatureStoreError, match="example 5: example was skipped"):
    src.read(5)
  img6 = skip.load(6)["image"][None]
  np.testing.assert_array_equal(src[5]["latents"], pixel_tokenizer.encode(img6, 2)[0])


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """The digits TFDS dataset, prepared once per session (a no-op when present)."""
  from glue_jax.tools import prepare_data
  d = str(tmp_path_factory.getbasetemp() / "tfds_digits")
  prepare_data.prepare("digits", d)
  return d


def test_precompute_cli_demo_preset_then_training(tiny, digits_dir, tmp_path):
  """The CLI's run() with the demo preset (weights as the demo writes them), the
  training reader joining the TFDS images, and a few steps of the trainer."""
  from glue_jax.configs import precompute as precompute_config
  from glue_jax import diffusion_job
  demo = tmp_path / "demo"
  demo.mkdir()
  dinov2_weights.save_npz(tiny.vit, str(demo / "encoder_vit.npz"))
  writers.save_module(tiny.comp, str(demo / "compressor.npz"))
  writers.save_npz(str(demo / "feature_stats.npz"), mean=tiny.stats[0], std=tiny.stats[1])
  cfg = precompute_config.get_config(f"preset=demo,demo_dir={demo},data_dir={digits_dir},"
                                     "split=test[:40],shard=16,batch=8")
  out = str(tmp_path / "features")
  summary = precompute.run(cfg, out, process_index=0, process_count=1)
  assert summary["complete"] and summary["count"] == 40 and summary["num_shards"] == 3
  manifest = fsr.load_manifest(os.path.join(out, "test_40"))
  assert manifest["dataset"]["full_name"] == "digits/1.0.0"
  assert manifest["identity"]["encoder"]["hash"] == tiny.identity["encoder"]["hash"]
  # the weights and statistics loaded from the demo's files are exactly the saved ones
  assert manifest["identity"]["compressor"]["hash"] == tiny.identity["compressor"]["hash"]
  assert manifest["identity"]["compressor"]["stats_eps"] == 1e-6
  data = ml_collections.ConfigDict({
      "name": "feature_store", "path": out, "num_classes": 10, "workers": 0,
      "images": {"data_dir": digits_dir},
      "identity": {"encoder": tiny.identity["encoder"]["hash"]}})
  src = fsr.open_source(data, "test[:40]")
  ref = digits.load("test", 16)
  for i in (0, 17, 39):
    np.testing.assert_array_equal(src[i]["image"], ref["image"][i])
    assert int(src[i]["label"]) == ref["label"][i]
  # The same features as the demo computes them (eps 1e-6 standardization).
  x = ref["image"][:8]
  senc = se.SemanticEncoder(tiny.vit, se.SemanticSpec((0, 1, 2, 3), None, "compressor", 1e-6),
                            stats=tiny.stats, compressor=tiny.comp)
  direct = nnx.jit(lambda m, x: m(x))(senc, x)
  for i in range(8):
    np.testing.assert_allclose(src[i]["semantic"], direct["semantic"][i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(src[i]["cls"], direct["cls"][i], rtol=1e-5, atol=1e-5)
  # The trainer reads the store (data.name='feature_store') and runs.
  tc = train_utils.tiny_config("", steps=2, batch=8)
  tc.data = common.data_defaults(name="feature_store", path=out, num_classes=10)
  tc.checkpoint.every = 2
  with pytest.raises(FileNotFoundError, match="no feature store for split 'train'"):
    diffusion_job.train(tc, str(tmp_path / "run0"))
  os.rename(os.path.join(out, "test_40"), os.path.join(out, "train"))
  metrics = diffusion_job.train(tc, str(tmp_path / "run"))
  assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2" / "data_iter")
  # README's smoke command, as written, on this store: nothing but the data is
  # needed (no SD-VAE weights: runlocal draws no sample grids), and SiT's
  # hidden-size warning (12 + 16 channels here need hidden >= 112) comes once,
  # not once per network build.
  import re
  import subprocess
  import sys
  readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "README.md")).read()
  cmd = re.search(r"^python -m glue_jax\.main --config=glue_jax/configs/reglue\.py:runlocal "
                  r"--config\.data\.path=\.\.\. --workdir=\S+", readme, re.M).group(0)
  argv = [a.replace("--config.data.path=...", f"--config.data.path={out}")
          for a in cmd.split()[3:] if not a.startswith("--workdir")]
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  r = subprocess.run([sys.executable, "-m", "glue_jax.main", *argv,
                      f"--workdir={tmp_path / 'smoke'}"],
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert '"step": 20' in r.stdout, r.stdout[-2000:]
  assert r.stderr.count("SiT: hidden_size") <= 1, r.stderr[-3000:]
  # progress on the console (#18 finding 1: absl's WARNING level used to hide it)
  assert re.search(r"diffusion step 20/20 \(100\.0%\)  loss \S+  .* ETA", r.stderr), \
      r.stderr[-3000:]
