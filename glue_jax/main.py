"""Entry point: ``python -m glue_jax.main --config=glue_jax/configs/<family>.py:<args> --workdir=DIR``.

``config.kind`` chooses what runs (see ``KINDS``): 'diffusion' (the trainer),
'demo' (the embedded digits pipeline), 'compressor', 'lainr', 'scenes'.
``--config.x=...`` overrides any field.
"""

from __future__ import annotations

import os

# TensorFlow (imported by the data and logging libraries) prints two oneDNN
# banners and an absl::InitializeLog notice unless these are set before it is
# imported; a user's own setting wins.  (glue_jax/__init__.py sets the same.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import ast  # noqa: E402
import difflib  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

config_flags.DEFINE_config_file("config", None, "config file[:args]", lock_config=True)
flags.DEFINE_string("workdir", None, "working directory (checkpoints, logs, samples)")
FLAGS = flags.FLAGS


# config.kind -> module whose ``run(config, workdir) -> dict`` runs it.
KINDS = {
    "diffusion": "glue_jax.diffusion_job",      # SiT / REPA / REG / ReDi / REGLUE training
    "demo": "glue_jax.projects.reglue.digits_demo",  # the embedded digits pipeline
    "compressor": "glue_jax.projects.reglue.compressor_job",  # REGLUE's semantic compressor
    "lainr": "glue_jax.projects.lainr.tasks",  # LA-INR reconstruction / NVS / generation
    "scenes": "glue_jax.projects.glod.scenes_pipeline",  # GLoD's prompt-conditioned scenes model
    "precompute": "glue_jax.tools.precompute",  # the feature store (also its own CLI)
    "evaluate": "glue_jax.evaluate",         # sampling + FID/sFID/IS/P/R (also its own CLI)
}


_KIND_HELP = {
    "diffusion": "SiT / REPA / REG / ReDi / REGLUE training",
    "demo": "the embedded digits pipeline (CPU)",
    "compressor": "REGLUE's semantic compressor",
    "lainr": "LA-INR reconstruction / novel views / generation",
    "scenes": "GLoD's prompt-conditioned scenes model",
    "precompute": "the feature store (also python -m glue_jax.tools.precompute)",
    "evaluate": "sampling + FID/sFID/IS/P/R (also python -m glue_jax.evaluate)",
}


def config_files() -> dict[str, str]:
  """``glue_jax/configs/<name>.py`` -> the first line of its docstring (not imported)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(_CONFIGS, "*.py"))):
    name = os.path.basename(path)
    if name in ("__init__.py", "common.py"):
      continue
    try:
      with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
      doc = ""
    out[f"glue_jax/configs/{name}"] = doc.strip().splitlines()[0] if doc.strip() else ""
  return out


def usage() -> str:
  """``--help`` text: this docstring, the config files and the kinds."""
  lines = [__doc__.rstrip(), "", "config files (--config=FILE or FILE:key=value,...):"]
  lines += [f"  {k:<31} {v}" for k, v in config_files().items()]
  lines += ["", "config.kind (what runs):"]
  lines += [f"  {k:<11} {KINDS[k]:<28} {_KIND_HELP.get(k, '')}".rstrip() for k in KINDS]
  return "\n".join(lines) + "\n"


def _override_error(argv) -> str | None:
  """The first ``--config.a.b=...`` naming no field of the loaded config:
  one line with the closest field names (difflib)."""
  cfg = FLAGS["config"].value
  if not isinstance(cfg, ml_collections.ConfigDict):
    cfg = _load_config(argv)    # the flag applies overrides while loading: load it bare
  if cfg is None:
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, done = cfg, []
    for key in path.split("."):
      keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
      if key not in keys:
        where = "--config." + ".".join(done) if done else "the config"
        if not keys:
          return f"--config.{path}: {where} is {node!r} ({type(node).__name__}), no field {key!r}"
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = ("did you mean " + " or ".join(
            "--config." + ".".join(done + [c]) for c in close) + "?") if close else \
            "fields: " + ", ".join(sorted(keys))
        return f"--config.{path}: {where} has no field {key!r}; {hint}"
      node = node[key]
      done.append(key)
  return None


def _load_config(argv):
  """The ``--config=FILE[:arg]`` of ``argv`` loaded without overrides (None
  when it does not load)."""
  import importlib.util
  spec = None
  for i, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      spec = a[len("--config="):]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  if not spec:
    return None
  path, _, arg = spec.partition(":")
  try:
    mod_spec = importlib.util.spec_from_file_location("_glue_jax_config_hint", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    cfg = mod.get_config(arg) if arg else mod.get_config()
  except Exception:  # noqa: BLE001 - the flag reports its own load errors
    return None
  return cfg if isinstance(cfg, ml_collections.ConfigDict) else None


def _flag_error(e: BaseException, argv) -> str:
  """One line for a command-line error (absl / ml_collections raise long,
  chained tracebacks)."""
  found = _override_error(argv)
  if found:
    return found
  chain, x = [], e
  while x is not None and x not in chain:
    chain.append(x)
    x = x.__cause__ or (None if x.__suppress_context__ else x.__context__)
  text = "\n".join(str(x) for x in chain)
  config_arg = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
  if "Failed loading config file" in text:
    why = next((ln.strip() for ln in text.splitlines() if "[Errno" in ln), "cannot be loaded")
    return (f"{config_arg}: {why}; config files: {', '.join(config_files())}")
  if "Error whilst parsing config file" in text:
    inner = chain[-1]
    return f"{config_arg}: {type(inner).__name__}: {str(inner).strip().splitlines()[0]}"
  lines = [ln.strip() for ln in str(chain[-1] if isinstance(e, KeyError) else e).splitlines()
           if ln.strip()]
  return lines[0] if lines else type(e).__name__


def parse_flags(argv):
  """absl's flag parsing, with every command-line error one line on stderr
  and exit status 2 (usage error); ``--help`` lists config files and kinds."""
  try:
    rest = FLAGS(argv)
    cfg = FLAGS.config
    if cfg is not None:
      cfg.get("kind")           # a config file that failed to load raises here
  except SystemExit:
    raise
  except Exception as e:  # noqa: BLE001 - flags.Error, KeyError, AttributeError, OSError
    sys.stderr.write(f"glue_jax.main: error: {_flag_error(e, argv)}\n")
    sys.exit(2)
  return rest


def run(config, workdir: str) -> dict:
  import importlib
  if "://" in workdir:
    # os.makedirs would silently create a local directory named 'gs:'.
    raise ValueError(f"--workdir={workdir}: URLs are not supported; give a file path "
                     "(local disk, NFS, or a gcsfuse mount such as /mnt/gcs/run; "
                     "launch/README.md 'Known limits')")
  kind = config.get("kind", "diffusion")
  if kind not in KINDS:
    raise ValueError(f"config.kind={kind!r}; one of {sorted(KINDS)}")
  mod = importlib.import_module(KINDS[kind])
  return (mod.train if kind == "diffusion" else mod.run)(config, workdir)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  result = run(FLAGS.config, FLAGS.workdir)
  print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
  # Required only when this module is the program: other CLIs (glue_jax.evaluate)
  # share absl's global FLAGS within one process.
  flags.mark_flags_as_required(["config", "workdir"])
  __doc__ = usage()           # what absl's --help prints
  app.run(main, flags_parser=parse_flags)
