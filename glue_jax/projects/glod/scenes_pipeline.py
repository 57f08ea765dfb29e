"""The GLoD scenes pipeline: dataset -> prompt-conditioned SiT -> probes -> composition.

Stages (each reused when its output exists, so a second run resumes):
 1. the procedural scenes dataset (``glue_jax.projects.glod.scene_data``, TFDS array_record
    under ``<workdir>/tfds``), read back with ``tfds.data_source``;
 2. ``features_{split}.npz``: pixel-tokenizer latents and one prompt per row;
    every scene appears once with its full (concatenated) caption, once with
    its global caption and once per object with that object's local caption,
    so the model learns all three kinds of condition;
 3. the generator: ``glue_jax.train.diffusion_job.train`` (source 'npz', the prompt as
    the label; null prompt = all null tokens, prompt dropout in the network);
 4. probes (``glue_jax.projects.glod.probes``) trained on the real train scenes;
 5. composition evaluation of ``config.eval.methods`` on the test scenes
    (``glue_jax.projects.glod.composition_eval``), a sample grid PNG and metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import ml_collections
import numpy as np

from glue_jax import api
from glue_jax.models import first_stage as first_stage_lib
from glue_jax.projects.glod import composition_eval as ec
from glue_jax.projects.glod import probes as probes_lib
from glue_jax.projects.glod import scene_data as scenes_lib
from glue_jax import diffusion_job
from glue_jax.train import writers


@dataclasses.dataclass
class Context:
  """A trained scenes run, ready to sample and score."""
  config: ml_collections.ConfigDict
  model: object                     # api.LoadedModel
  first_stage: object
  probes: object
  train: dict                       # stacked train scenes
  test: dict                        # stacked test scenes


def builder_config(config):
  d = config.data
  return scenes_lib.builder_config(image_size=d.image_size, identities=tuple(d.identities),
                                   colours=tuple(d.colours), min_objects=d.min_objects,
                                   max_objects=d.max_objects, slots=d.slots,
                                   jitter=d.jitter, num_train=d.num_train, num_test=d.num_test, seed=d.seed)


def dataset(config, workdir: str) -> tuple[dict, dict]:
  """Builds (once) and reads both splits as stacked arrays."""
  data_dir = os.path.join(workdir, "tfds")
  bc = builder_config(config)
  scenes_lib.build(data_dir, bc)
  return (scenes_lib.load_arrays(data_dir, "train", bc),
          scenes_lib.load_arrays(data_dir, "test", bc))


def caption_rows(arrays: dict) -> tuple[np.ndarray, np.ndarray]:
  """(scene index, prompt tokens) of the training rows: full, global, each local."""
  idx, prompts = [], []
  for i in range(len(arrays["image"])):
    idx += [i, i]
    prompts += [arrays["full_tokens"][i], arrays["global_tokens"][i]]
    for k in range(int(arrays["num_objects"][i])):
      idx.append(i)
      prompts.append(arrays["local_tokens"][i, k])
  return np.asarray(idx), np.stack(prompts).astype(np.int32)


def write_features(config, workdir: str, arrays: dict, split: str) -> str:
  path = os.path.join(workdir, f"features_{split}.npz")
  if os.path.exists(path):
    return path
  fs = first_stage_lib.build(dict(config.train.first_stage))
  latents = np.asarray(fs.encode(arrays["image"]))
  idx, prompts = caption_rows(arrays)
  # float16 halves the file (each image is repeated per caption); the trainer
  # casts to float32 and the pixel tokenizer's values lose < 3e-4.
  tmp = path + ".tmp.npz"
  np.savez(tmp, latents=latents[idx].astype(np.float16), label=prompts,
           scene=idx.astype(np.int32))
  os.replace(tmp, path)
  return path


def train_probes(config, workdir: str, train: dict, test: dict):
  path = os.path.join(workdir, "probes.npz")
  s = config.data.image_size
  if os.path.exists(path):
    return probes_lib.load(path, s)
  pc = config.probes
  grid = s // config.train.first_stage["factor"]
  probes = probes_lib.train(train, grid=grid, crop=pc.crop, steps=pc.steps,
                            batch_size=pc.batch_size, lr=pc.lr, seed=config.seed, holdout=test,
                            workdir=os.path.join(workdir, "probes_train"))
  probes_lib.save(probes, path)
  logging.info("probe accuracy on real test scenes: %s", probes.accuracy)
  return probes


def prepare(config, workdir: str) -> tuple[Context, dict]:
  """Stages 1-4; returns the context and the trainer's last metrics."""
  os.makedirs(workdir, exist_ok=True)
  if config.train.data.num_classes != len(scenes_lib.VOCAB):
    raise ValueError(f"train.data.num_classes={config.train.data.num_classes} must be the "
                     f"scenes vocabulary size {len(scenes_lib.VOCAB)}")
  if config.train.model.overrides.get("prompt_length") != scenes_lib.PROMPT_LENGTH:
    raise ValueError(f"train.model.overrides.prompt_length must be {scenes_lib.PROMPT_LENGTH}")
  writers.save_json(os.path.join(workdir, "scenes_config.json"), json.loads(config.to_json()))
  train, test = dataset(config, workdir)
  write_features(config, workdir, train, "train")
  write_features(config, workdir, test, "test")
  tc = config.train
  with tc.unlocked():
    tc.data.path = os.path.join(workdir, "features_{split}.npz")
  metrics = diffusion_job.train(tc, os.path.join(workdir, "generator"))
  probes = train_probes(config, workdir, train, test)
  model = api.load_model(os.path.join(workdir, "generator", "checkpoints"))
  fs = first_stage_lib.build(dict(tc.first_stage))
  return Context(config, model, fs, probes, train, test), metrics


def load(workdir: str) -> Context:
  """The context of a finished run (for ``evaluate_composition`` and benchmarks)."""
  path = os.path.join(workdir, "scenes_config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir}: no scenes_config.json; not a scenes run")
  config = ml_collections.ConfigDict(json.load(open(path)))
  train, test = dataset(config, workdir)
  model = api.load_model(os.path.join(workdir, "generator", "checkpoints"))
  probes = probes_lib.load(os.path.join(workdir, "probes.npz"), config.data.image_size)
  fs = first_stage_lib.build(dict(config.train.first_stage))
  return Context(config, model, fs, probes, train, test)


def run(config, workdir: str) -> dict:
  """The whole pipeline; returns (and writes ``metrics.json``) the composition scores."""
  ctx, train_metrics = prepare(config, workdir)
  ev = config.eval
  result = ec.evaluate(ctx.model, ctx.first_stage, ctx.probes, ctx.test, ev,
                       methods=tuple(ev.methods), seeds=tuple(ev.seeds),
                       num_scenes=ev.num_scenes, image_dir=workdir)
  result["probe_accuracy"] = ctx.probes.accuracy
  result["train"] = train_metrics
  writers.save_json(os.path.join(workdir, "metrics.json"), result)
  logging.info("scenes composition:\n%s", ec.format_table(result))
  return result
