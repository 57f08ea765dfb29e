"""Writes a small feature store (tiny random encoder, 64 digits, 8 shards).

  python -m tests.faults.precompute_worker OUT_DIR

Deterministic: two runs write byte-identical shards.
"""
import os
import sys


def main():
  out = sys.argv[1]
  from tests import jax_setup
  jax_setup.configure(1)
  from tests.test_feature_store import _random_module, _records
  import numpy as np
  from flax import nnx
  from glue_jax.data import feature_store as fst, imagenet
  from glue_jax.models import compressor as compressor_lib, dinov2
  from glue_jax.models import semantic_encoder as se
  from glue_jax.tools import precompute
  vit_cfg = dinov2.Dinov2Config(dim=32, depth=4, num_heads=2, patch_size=4, pos_grid=4)
  vit = _random_module(lambda: dinov2.Dinov2(vit_cfg, rngs=nnx.Rngs(0)), 0)
  comp = _random_module(lambda: compressor_lib.Compressor(
      compressor_lib.CompressorConfig(channels=(128, 16, 16)), rngs=nnx.Rngs(1)), 1)
  rng = np.random.default_rng(0)
  stats = (rng.normal(size=128).astype(np.float32) * 0.1, (1 + rng.random(128)).astype(np.float32))
  senc = se.SemanticEncoder(vit, se.SemanticSpec((0, 1, 2, 3), None, "compressor"),
                            stats=stats, compressor=comp)
  extract, identity = precompute.make_extractor(precompute.pixel_first_stage(2),
                                                precompute.semantic_component(senc))
  fst.write_split(out, source=imagenet.ImageSource(_records(64), image_size=16, name="toy/train"),
                  extract=extract, identity=identity, split="train",
                  dataset={"name": "toy", "fingerprint": "f0"},
                  preprocessing={"crop": "adm_center_crop", "image_size": 16},
                  examples_per_shard=8, batch_size=8, progress=False, read_threads=1)


if __name__ == "__main__":
  main()
