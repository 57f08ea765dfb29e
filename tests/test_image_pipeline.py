"""Image pipeline: ADM center crop, digits TFDS builder, Grain sharding/state, bad input."""
import io
import logging

import numpy as np
import pytest
import skimage.data
from PIL import Image

from glue_jax.data import digits, imagenet, tfds_digits
from glue_jax.train import checkpoint as ckpt_lib


def adm_reference(pil_image, image_size):
  """guided-diffusion's center_crop_arr as REPA's dataset_tools applies it
  (after PIL's convert('RGB')), written out independently of the library."""
  pil_image = pil_image.convert("RGB")
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def _photos():
  d = skimage.data
  big = np.asarray(Image.fromarray(d.astronaut()).resize((1100, 1500), Image.BICUBIC))
  small = np.asarray(Image.fromarray(d.coffee()).resize((90, 61), Image.BICUBIC))
  return {"astronaut": d.astronaut(), "coffee": d.coffee(), "chelsea": d.chelsea(),
          "camera_grey": d.camera(), "rocket": d.rocket(), "retina": d.retina(),
          "hubble": d.hubble_deep_field(), "logo_rgba": d.logo(), "portrait_big": big,
          "small_upsampled": small}


def _png(a):
  b = io.BytesIO()
  Image.fromarray(a).save(b, format="png")
  return b.getvalue()


def _jpeg(a, quality=90):
  b = io.BytesIO()
  Image.fromarray(a).save(b, format="JPEG", quality=quality)
  return b.getvalue()


def test_center_crop_matches_adm_reference():
  for name, arr in _photos().items():
    for size in (256, 64):
      got = imagenet.center_crop_arr(arr, size)
      want = adm_reference(Image.fromarray(arr), size)
      assert got.shape == (size, size, 3) and got.dtype == np.uint8, name
      np.testing.assert_array_equal(got, want, err_msg=f"{name} @ {size}")
  # Independent check of the halving: 512 -> 256 is one BOX halving (PIL rounds
  # each separable pass half-up), then a same-size resize and no crop.
  x = skimage.data.astronaut().astype(np.int32)
  h = (x[:, 0::2] + x[:, 1::2] + 1) >> 1
  v = (h[0::2] + h[1::2] + 1) >> 1
  np.testing.assert_array_equal(imagenet.center_crop_arr(x.astype(np.uint8), 256), v)
  # Offsets floor((H - S) / 2): a 3-row-taller image crops from row 1.
  tall = np.arange(19 * 16 * 3, dtype=np.uint8).reshape(19, 16, 3)
  np.testing.assert_array_equal(imagenet.center_crop_arr(tall, 16), tall[1:17])


def test_image_source_decodes_jpeg_like_pil():
  photos = [skimage.data.chelsea(), skimage.data.rocket(), skimage.data.camera()]
  recs = [{"image": _jpeg(p), "label": i} for i, p in enumerate(photos)]
  src = imagenet.ImageSource(recs, image_size=64, name="toy/train")
  for i, r in enumerate(recs):
    want = adm_reference(Image.open(io.BytesIO(r["image"])), 64)
    ex = src[i]
    np.testing.assert_array_equal(ex["image"], want)
    assert int(ex["label"]) == i


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """The digits TFDS dataset, prepared once per session (a no-op when present)."""
  from glue_jax.tools import prepare_data
  d = str(tmp_path_factory.getbasetemp() / "tfds_digits")
  splits = prepare_data.prepare("digits", d)
  assert {k: v["num_examples"] for k, v in splits.items()} == {"train": 1500, "test": 297}
  return d


def test_digits_builder_roundtrip(digits_dir):
  tfds = imagenet._tfds()
  ds = tfds.data_source("digits", split="test", data_dir=digits_dir)
  images, labels = tfds_digits.native_images()
  assert len(ds) == 297
  for i in (0, 1, 150, 296):                 # stored in scikit-learn's order, lossless
    np.testing.assert_array_equal(ds[i]["image"], images[1500 + i])
    assert ds[i]["label"] == labels[1500 + i]
  # The ADM crop of the native 8x8 digits is exactly the demo's 16 px dataset.
  src, fp = imagenet.open_image_source("digits", "test", digits_dir, image_size=16)
  ref = digits.load("test", size=16)
  got = imagenet.load_images("digits", "test", image_size=16, data_dir=digits_dir)
  np.testing.assert_array_equal(got, ref["image"])
  np.testing.assert_array_equal([int(src[i]["label"]) for i in range(297)], ref["label"])
  assert fp["num_examples"] == 297 and fp["full_name"] == "digits/1.0.0"
  _, fp2 = imagenet.open_image_source("digits", "train[:100]", digits_dir, image_size=16)
  assert fp2["num_examples"] == 100 and fp2["fingerprint"] != fp["fingerprint"]
  with pytest.raises(FileNotFoundError, match="prepare_data --dataset=digits"):
    imagenet.open_tfds("digits", "train", digits_dir + "_missing")


def _toy_source(n=24, **kw):
  images, labels = tfds_digits.native_images()
  recs = [{"image": _png(images[i]), "label": int(labels[i])} for i in range(n)]
  return imagenet.ImageSource(recs, image_size=16, name="toy/train", **kw), recs


def test_processes_read_disjoint_examples_covering_the_split():
  src, _ = _toy_source(24)
  seen = []
  for p in range(2):
    ds = imagenet.make_image_dataset(src, batch_size=4, seed=5, process_index=p,
                                     process_count=2, num_epochs=1, with_index=True,
                                     read_threads=2)
    batches = list(ds)
    idx = np.concatenate([b["index"] for b in batches])
    for b in batches[:1]:
      for j, i in enumerate(b["index"]):
        np.testing.assert_array_equal(b["image"][j], src.load(i)["image"])
    assert len(batches) == 3 and len(set(idx.tolist())) == 12
    seen.append(set(idx.tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


def test_iterator_state_roundtrips_through_orbax(tmp_path):
  src, _ = _toy_source(24)
  make = lambda: iter(imagenet.make_image_dataset(src, batch_size=4, seed=3, with_index=True))
  it = make()
  for _ in range(7):                         # past the first epoch (6 batches)
    next(it)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(7, data_iter=it)
  ck.wait()
  expected = [next(it) for _ in range(4)]
  it2 = make()
  ck.restore(7, data_iter=it2)
  got = [next(it2) for _ in range(4)]
  ck.close()
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(expected[0]["index"], next(make())["index"])


def test_corrupt_images_error_or_skip(caplog):
  src, recs = _toy_source(24)
  recs[3]["image"] = b"not an image at all"
  recs[7]["image"] = _jpeg(skimage.data.chelsea())[:2000]      # truncated JPEG
  recs[11]["image"] = b""
  with pytest.raises(imagenet.CorruptImageError, match=r"toy/train: example 3: cannot decode"):
    src[3]
  with pytest.raises(imagenet.CorruptImageError, match=r"example 7: .*truncated"):
    src[7]
  with pytest.raises(imagenet.CorruptImageError, match="example 11: no image bytes"):
    src[11]
  with pytest.raises(imagenet.CorruptImageError, match="toy/train: example"):
    list(imagenet.make_image_dataset(src, batch_size=4, seed=0, num_epochs=1))
  skip = imagenet.ImageSource(recs, image_size=16, name="toy/train", on_corrupt="skip")
  with caplog.at_level(logging.WARNING):
    batches = list(imagenet.make_image_dataset(skip, batch_size=3, seed=0, num_epochs=1,
                                               with_index=True))
  idx = np.concatenate([b["index"] for b in batches])
  assert len(batches) == 7 and all(len(b["index"]) == 3 for b in batches)
  assert set(idx.tolist()) == set(range(24)) - {3, 7, 11}
  assert skip.num_corrupt == 3
  assert "skipping corrupt image (3 so far" in caplog.text
  with pytest.raises(ValueError, match="on_corrupt"):
    imagenet.ImageSource(recs, image_size=16, on_corrupt="zero")


def test_global_batches_on_the_mesh():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from glue_jax.data import pipeline
  src, _ = _toy_source(24)
  mesh = jax.make_mesh((8,), ("data",))
  shardings = {k: NamedSharding(mesh, P("data")) for k in ("image", "label")}
  local = iter(imagenet.make_image_dataset(src, batch_size=8, seed=0, num_epochs=1))
  first = next(iter(imagenet.make_image_dataset(src, batch_size=8, seed=0, num_epochs=1)))
  batch = next(pipeline.global_batches(local, shardings))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].sharding == shardings["image"]
  np.testing.assert_array_equal(np.asarray(batch["image"]), first["image"])
