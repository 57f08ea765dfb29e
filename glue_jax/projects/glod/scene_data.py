"""Procedural scenes for GLoD: canvases of 2-3 objects with captions, boxes, relations.

Each example is a small RGB canvas (black background) with 2-3 non-overlapping
objects, by default each centred in its own cell of a 2x2 grid of slots
(``jitter``: anywhere inside its cell; ``slots=0``: anywhere on the canvas; the
CPU-sized generator learns the slotted layout much faster).  An object has an identity (a shape, or a digit glyph drawn from a
random scikit-learn digits image of that class), a colour and a size
(small/large); consecutive objects in caption order are linked by the
relation of their box centres along the dominant axis (left_of, right_of,
above, below).  Captions are word-level token sequences over a fixed
vocabulary (:data:`VOCAB`, null/padding id ``len(VOCAB)``):

- global: ``A rel B [rel C]`` (identities and relations: the layout);
- local k: ``size colour identity`` (the details of object k);
- full: the global caption followed by every local caption (the single
  concatenated prompt).

Examples are written by a TFDS ``GeneratorBasedBuilder`` (array_record
files, generated with numpy; no TensorFlow call in this module) and read back
with ``tfds.data_source``.  Generation is deterministic per (config, split).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

MAX_OBJECTS = 3
COLOURS = {"red": (235, 40, 40), "green": (40, 205, 60), "blue": (60, 100, 245),
           "yellow": (240, 225, 40), "magenta": (225, 55, 225), "cyan": (40, 225, 235)}
SIZES = ("small", "large")
SHAPES = ("square", "circle", "triangle", "cross")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IDENTITIES = SHAPES + DIGITS
RELATIONS = ("left_of", "right_of", "above", "below")
VOCAB = tuple(COLOURS) + SIZES + IDENTITIES + RELATIONS
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
NULL_TOKEN = len(VOCAB)
PROMPT_LENGTH = 2 * MAX_OBJECTS - 1 + 3 * MAX_OBJECTS   # full caption of 3 objects: 14
GLOBAL_LENGTH = 2 * MAX_OBJECTS - 1


@dataclasses.dataclass(frozen=True)
class SceneParams:
  """What the generator draws from."""
  image_size: int = 24
  identities: tuple[str, ...] = ("square", "circle", "triangle", "two", "seven")
  colours: tuple[str, ...] = tuple(COLOURS)
  min_objects: int = 2
  max_objects: int = 3
  small: float = 0.3              # object side / canvas side
  large: float = 0.46
  relation_margin: float = 1.5    # dominant / other centre offset of captioned pairs
  slots: int = 2                  # objects in distinct cells of a slots x slots grid; 0: anywhere
  jitter: bool = False            # slots: anywhere inside the cell (False: centred)

  def __post_init__(self):
    bad = [i for i in self.identities if i not in IDENTITIES] + \
        [c for c in self.colours if c not in COLOURS]
    if bad:
      raise ValueError(f"unknown identities/colours {bad}")
    if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
      raise ValueError(f"objects {self.min_objects}..{self.max_objects} outside 1..{MAX_OBJECTS}")
    if self.slots and (self.slots ** 2 < self.max_objects or
                       round(self.large * self.image_size) > self.image_size // self.slots):
      raise ValueError(f"{self.slots}x{self.slots} slots cannot hold {self.max_objects} "
                       "large objects")
    if len(self.identities) < self.max_objects or len(self.colours) < self.max_objects:
      raise ValueError("objects of a scene have distinct identities and colours: need at "
                       f"least {self.max_objects} of each")


# -- rendering ------------------------------------------------------------------------------

def _glyphs():
  from sklearn.datasets import load_digits
  d = load_digits()
  return d.images / 16.0, d.target


_GLYPHS = None


def shape_alpha(identity: str, side: int, rng: np.random.Generator, supersample: int = 4
                ) -> np.ndarray:
  """(side, side) coverage in [0, 1] of an object drawn in its box."""
  if identity in DIGITS:
    global _GLYPHS
    if _GLYPHS is None:
      _GLYPHS = _glyphs()
    images, target = _GLYPHS
    choices = np.flatnonzero(target == DIGITS.index(identity))
    glyph = images[rng.choice(choices)]
    from PIL import Image
    im = Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    return np.clip(np.asarray(im, np.float32) / 255.0 * 1.3, 0, 1)
  n = side * supersample
  c = (np.arange(n) + 0.5) / n                       # sub-pixel centres in [0, 1]
  yy, xx = np.meshgrid(c, c, indexing="ij")
  if identity == "square":
    m = np.ones_like(xx, bool)
  elif identity == "circle":
    m = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25
  elif identity == "triangle":                        # apex up, base at the bottom
    m = np.abs(xx - 0.5) <= 0.5 * yy
  elif identity == "cross":
    m = (np.abs(xx - 0.5) <= 1 / 6) | (np.abs(yy - 0.5) <= 1 / 6)
  else:
    raise ValueError(f"unknown identity {identity!r}")
  return m.reshape(side, supersample, side, supersample).mean((1, 3)).astype(np.float32)


def relation(box_a, box_b) -> str:
  """Relation of a to b from the box centres, along the dominant axis."""
  dx = (box_a[0] + box_a[2]) - (box_b[0] + box_b[2])
  dy = (box_a[1] + box_a[3]) - (box_b[1] + box_b[3])
  if abs(dx) >= abs(dy):
    return "left_of" if dx < 0 else "right_of"
  return "above" if dy < 0 else "below"


def _clear(box_a, box_b, margin: float) -> bool:
  """The dominant axis of a relation dominates by ``margin`` (unambiguous relations)."""
  dx = abs((box_a[0] + box_a[2]) - (box_b[0] + box_b[2]))
  dy = abs((box_a[1] + box_a[3]) - (box_b[1] + box_b[3]))
  return max(dx, dy) >= margin * min(dx, dy) and max(dx, dy) > 0


def random_scene(rng: np.random.Generator, p: SceneParams) -> dict:
  """A scene specification: objects (identity, colour, size, pixel box) in caption order."""
  s = p.image_size
  sides = {"small": max(3, round(p.small * s)), "large": max(4, round(p.large * s))}
  n = int(rng.integers(p.min_objects, p.max_objects + 1))
  while True:
    idents = rng.choice(p.identities, n, replace=False)
    colours = rng.choice(p.colours, n, replace=False)
    sizes = rng.choice(SIZES, n)
    boxes = []
    free_slots = list(rng.permutation(p.slots ** 2)) if p.slots else []
    cell = s // p.slots if p.slots else s
    for k in range(n):
      side = sides[sizes[k]]
      for _ in range(200):
        if p.slots:          # a free slot; centred in it, or anywhere inside with jitter
          r, c = divmod(int(free_slots[k]), p.slots)
          x0 = c * cell + (rng.integers(0, cell - side + 1) if p.jitter else (cell - side) // 2)
          y0 = r * cell + (rng.integers(0, cell - side + 1) if p.jitter else (cell - side) // 2)
        else:
          x0, y0 = rng.integers(0, s - side + 1, 2)
        box = (int(x0), int(y0), int(x0) + side, int(y0) + side)
        if all(box[0] >= b[2] + 1 or b[0] >= box[2] + 1 or box[1] >= b[3] + 1 or
               b[1] >= box[3] + 1 for b in boxes):
          boxes.append(box)
          break
      else:
        break
    if len(boxes) == n and all(_clear(boxes[k], boxes[k + 1], p.relation_margin)
                               for k in range(n - 1)):
      return {"identity": [str(i) for i in idents], "colour": [str(c) for c in colours],
              "size": [str(z) for z in sizes], "box": boxes}


def render(scene: dict, p: SceneParams, rng: np.random.Generator):
  """-> (image (S,S,3) uint8, segmentation (S,S) uint8: 0 background, k+1 object k)."""
  s = p.image_size
  img = np.zeros((s, s, 3), np.float32)
  seg = np.zeros((s, s), np.uint8)
  for k, (ident, colour, box) in enumerate(zip(scene["identity"], scene["colour"],
                                               scene["box"])):
    x0, y0, x1, y1 = box
    a = shape_alpha(ident, x1 - x0, rng)
    img[y0:y1, x0:x1] += a[..., None] * np.asarray(COLOURS[colour], np.float32)
    seg[y0:y1, x0:x1][a > 0.5] = k + 1
  return np.clip(np.round(img), 0, 255).astype(np.uint8), seg


# -- captions -------------------------------------------------------------------------------

def tokens(words: list[str], length: int = PROMPT_LENGTH) -> np.ndarray:
  if len(words) > length:
    raise ValueError(f"caption {' '.join(words)!r} longer than {length} tokens")
  out = np.full((length,), NULL_TOKEN, np.int32)
  out[:len(words)] = [WORD_ID[w] for w in words]
  return out


def captions(scene: dict) -> dict:
  """Word lists: 'global', 'locals' (one per object), 'full'; relation names."""
  n = len(scene["identity"])
  rels = [relation(scene["box"][k], scene["box"][k + 1]) for k in range(n - 1)]
  glob = [scene["identity"][0]]
  for k in range(n - 1):
    glob += [rels[k], scene["identity"][k + 1]]
  locs = [[scene["size"][k], scene["colour"][k], scene["identity"][k]] for k in range(n)]
  return {"global": glob, "locals": locs, "full": glob + sum(locs, []), "relations": rels}


def example(scene: dict, p: SceneParams, rng: np.random.Generator) -> dict:
  """The stored record of a scene (fixed-size arrays, padded to MAX_OBJECTS)."""
  image, seg = render(scene, p, rng)
  caps = captions(scene)
  n = len(scene["identity"])
  pad = lambda vals, fill: np.array(list(vals) + [fill] * (MAX_OBJECTS - len(vals)), np.int32)
  boxes = np.zeros((MAX_OBJECTS, 4), np.float32)
  boxes[:n] = np.asarray(scene["box"], np.float32) / p.image_size
  local_tokens = np.full((MAX_OBJECTS, PROMPT_LENGTH), NULL_TOKEN, np.int32)
  for k, words in enumerate(caps["locals"]):
    local_tokens[k] = tokens(words)
  return {
      "image": image, "segmentation": seg, "num_objects": np.int32(n),
      "identity": pad([IDENTITIES.index(i) for i in scene["identity"]], -1),
      "colour": pad([list(COLOURS).index(c) for c in scene["colour"]], -1),
      "size": pad([SIZES.index(z) for z in scene["size"]], -1),
      "boxes": boxes,
      "relation": pad([RELATIONS.index(r) for r in caps["relations"]], -1)[:MAX_OBJECTS - 1],
      "global_tokens": tokens(caps["global"]),
      "local_tokens": local_tokens,
      "full_tokens": tokens(caps["full"]),
      # position of object k's identity word in the global caption
      "object_position": pad([2 * k for k in range(n)], -1),
      "global_caption": " ".join(caps["global"]),
      "full_caption": " ".join(caps["full"]),
  }


def generate(p: SceneParams, num: int, seed: int):
  """Yields ``(index, record)`` for ``num`` scenes from ``seed``."""
  rng = np.random.default_rng(seed)
  for i in range(num):
    yield i, {"index": np.int32(i), **example(random_scene(rng, p), p, rng)}


# -- TFDS builder ---------------------------------------------------------------------------

def _builder_class():
  import tensorflow_datasets as tfds

  @dataclasses.dataclass(eq=False)
  class ScenesConfig(tfds.core.BuilderConfig):
    image_size: int = 24
    identities: tuple = SceneParams.identities
    min_objects: int = 2
    max_objects: int = 3
    slots: int = 2
    jitter: bool = False
    colours: tuple = tuple(COLOURS)
    num_train: int = 2000
    num_test: int = 200
    seed: int = 0

    def params(self) -> SceneParams:
      return SceneParams(image_size=self.image_size, identities=tuple(self.identities),
                         min_objects=self.min_objects, max_objects=self.max_objects,
                         slots=self.slots, jitter=self.jitter, colours=tuple(self.colours))

  class GlueScenes(tfds.core.GeneratorBasedBuilder):
    """Procedural multi-object scenes with global/local captions (glue_jax)."""
    VERSION = tfds.core.Version("1.3.0")
    RELEASE_NOTES = {"1.0.0": "First version.", "1.1.0": "Records carry their index.",
                     "1.2.0": "Slotted layouts, larger objects.",
                     "1.3.0": "Objects centred in their slot unless jitter."}
    BUILDER_CONFIGS = []       # configs are made by builder_config(), named by their values
    # Nothing is downloaded: no checksums file to locate next to the code (which
    # would need the optional importlib_resources package).
    code_path = None

    def _info(self):
      s = self.builder_config.image_size
      f = tfds.features
      ints = lambda *shape: f.Tensor(shape=shape, dtype=np.int32)
      return self.dataset_info_from_configs(features=f.FeaturesDict({
          "index": f.Scalar(dtype=np.int32),
          "image": f.Tensor(shape=(s, s, 3), dtype=np.uint8),
          "segmentation": f.Tensor(shape=(s, s), dtype=np.uint8),
          "num_objects": f.Scalar(dtype=np.int32),
          "identity": ints(MAX_OBJECTS), "colour": ints(MAX_OBJECTS),
          "size": ints(MAX_OBJECTS),
          "boxes": f.Tensor(shape=(MAX_OBJECTS, 4), dtype=np.float32),
          "relation": ints(MAX_OBJECTS - 1),
          "global_tokens": ints(PROMPT_LENGTH),
          "local_tokens": ints(MAX_OBJECTS, PROMPT_LENGTH),
          "full_tokens": ints(PROMPT_LENGTH),
          "object_position": ints(MAX_OBJECTS),
          "global_caption": f.Text(), "full_caption": f.Text(),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      c = self.builder_config
      return {"train": self._generate_examples(c.num_train, c.seed * 2),
              "test": self._generate_examples(c.num_test, c.seed * 2 + 1)}

    def _generate_examples(self, num, seed):
      yield from generate(self.builder_config.params(), num, seed)

  return ScenesConfig, GlueScenes


_CLASSES = None


def classes():
  """``(ScenesConfig, GlueScenes)``; defined on first use (TFDS import is lazy)."""
  global _CLASSES
  if _CLASSES is None:
    _CLASSES = _builder_class()
  return _CLASSES


def builder_config(**kw):
  """A builder config named after its values (so different data never share files)."""
  import hashlib
  cls = classes()[0]
  fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name in (
      "image_size", "identities", "colours", "min_objects", "max_objects", "slots", "jitter",
      "num_train", "num_test", "seed")}
  unknown = set(kw) - set(fields)
  if unknown:
    raise ValueError(f"unknown scenes builder options {sorted(unknown)}")
  fields.update(kw)
  fields["identities"] = tuple(fields["identities"])
  fields["colours"] = tuple(fields["colours"])
  SceneParams(image_size=fields["image_size"], identities=fields["identities"],
              colours=fields["colours"], min_objects=fields["min_objects"],
              max_objects=fields["max_objects"], slots=fields["slots"], jitter=fields["jitter"])
  ids = hashlib.sha1(",".join(fields["identities"] + ("|",) + fields["colours"]).encode()
                     ).hexdigest()[:6]
  name = (f"s{fields['image_size']}_o{fields['min_objects']}{fields['max_objects']}_"
          f"slots{fields['slots']}{'j' if fields['jitter'] else ''}_"
          f"n{fields['num_train']}_{fields['num_test']}_seed{fields['seed']}_id{ids}")
  return cls(name=name, **fields)


def build(data_dir: str, config=None):
  """Generates (once) the array_record files under ``data_dir``; returns the builder."""
  from tensorflow_datasets.core.utils import tqdm_utils
  _, builder_cls = classes()
  config = config or builder_config()
  builder = builder_cls(data_dir=data_dir, config=config, file_format="array_record")
  was_active = tqdm_utils._active
  tqdm_utils.display_progress_bar(False)      # per-example bars flood the logs
  try:
    builder.download_and_prepare()
  finally:
    tqdm_utils.display_progress_bar(was_active)
  return builder


def data_source(data_dir: str, split: str, config=None):
  """Random-access source over a built split (``tfds.data_source``)."""
  import tensorflow_datasets as tfds
  classes()
  config = config or builder_config()
  if not os.path.isdir(os.path.join(data_dir, "glue_scenes", config.name)):
    raise FileNotFoundError(f"{data_dir}: scenes config {config.name!r} not built; "
                            "call glue_jax.projects.glod.scene_data.build first")
  return tfds.data_source("glue_scenes", data_dir=data_dir, split=split,
                          builder_kwargs={"config": config})


def load_arrays(data_dir: str, split: str, config=None) -> dict:
  """All examples of a split stacked into numpy arrays (captions as str arrays),
  in generation order (TFDS stores them shuffled)."""
  src = data_source(data_dir, split, config)
  n = len(src)
  records = src.__getitems__(list(range(n))) if hasattr(src, "__getitems__") else \
      [src[i] for i in range(n)]
  out = {}
  for k in records[0]:
    vals = [r[k] for r in records]
    if isinstance(vals[0], (bytes, str)):
      out[k] = np.array([v.decode() if isinstance(v, bytes) else v for v in vals])
    else:
      out[k] = np.stack([np.asarray(v) for v in vals])
  order = np.argsort(out["index"])
  return {k: v[order] for k, v in out.items()}


def scene_of(arrays: dict, i: int) -> dict:
  """Scene specification ``i`` of stacked arrays (inverse of :func:`example`)."""
  n = int(arrays["num_objects"][i])
  s = arrays["image"].shape[1]
  return {"identity": [IDENTITIES[j] for j in arrays["identity"][i, :n]],
          "colour": [list(COLOURS)[j] for j in arrays["colour"][i, :n]],
          "size": [SIZES[j] for j in arrays["size"][i, :n]],
          "box": [tuple(int(round(v * s)) for v in b) for b in arrays["boxes"][i, :n]]}
