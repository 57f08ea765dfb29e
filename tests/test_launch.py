"""launch/: every script parses, and the commands they would run are valid.

The scripts are run with ``DRY_RUN=1`` (they print each command shell-quoted
instead of running it); the printed words are split the way the shells on
the way would split them (nested ``bash -c`` scripts included), and the
training command found there is checked: ``-m glue_jax.main``, a config file
that exists, whose ``get_config(arg)`` accepts the arguments and yields what
the environment asked for, ``--config.*`` overrides that name existing fields,
and the workdir.  Remote scripts are checked with ``bash -n`` too.
"""
from __future__ import annotations

import codecs
import glob
import importlib.util
import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) +
                 glob.glob(os.path.join(LAUNCH, "*.sbatch")))
TRAINERS = ["tpu_train.sh", "gpu_node.sh", "slurm_train.sbatch"]
BASE_ENV = dict(TPU_NAME="glue-test", ZONE="us-east5-a", BUCKET="glue-bucket",
                FEATURES="/gcs/glue-bucket/features/in256",
                WORKDIR="/gcs/glue-bucket/runs/test")


def dry_run(script: str, **env) -> subprocess.CompletedProcess:
  full = {k: v for k, v in os.environ.items()
          if k not in ("MODEL", "METHOD", "CONFIG", "CONFIG_EXTRA", "EXTRA_FLAGS", "REPO")}
  full.update(DRY_RUN="1", **env)
  return subprocess.run(["bash", os.path.join(LAUNCH, script)], cwd=ROOT, env=full,
                        capture_output=True, text=True, timeout=60)


def words(line: str) -> list[str]:
  """Shell words of one line (bash's $'...' strings decoded, as bash would)."""
  line = re.sub(r"\$'((?:[^'\\]|\\.)*)'",
                lambda m: shlex.quote(codecs.decode(m.group(1), "unicode_escape")), line)
  return shlex.split(line)


def commands(text: str) -> list[list[str]]:
  """Every command line in ``text`` and, recursively, in the words it passes on
  (``--command=bash -c SCRIPT`` -> the lines of SCRIPT)."""
  out = []
  for line in text.replace("\\\n", " ").splitlines():   # join continued lines
    if not line.strip() or line.strip().startswith("#"):
      continue
    try:
      toks = words(line)
    except ValueError:        # a remote script's multi-line construct; not a command
      assert "glue_jax.main" not in line, line
      continue
    out.append(toks)
    for t in toks:
      if "\n" in t or " " in t:
        out += commands(t.partition("=")[2] if t.startswith("--command=") else t)
  return out


def remote_scripts(text: str) -> list[str]:
  """The SCRIPT of every ``--command=bash -c SCRIPT`` in a dry-run output."""
  found = []
  for line in text.splitlines():
    for t in words(line):
      if t.startswith("--command="):
        inner = shlex.split(t.partition("=")[2])
        assert inner[:2] == ["bash", "-c"], inner
        found.append(inner[2])
  return found


def training_command(text: str) -> list[str]:
  found = [c for c in commands(text) if "glue_jax.main" in c]
  assert len(found) == 1, text
  cmd = found[0]
  i = cmd.index("glue_jax.main")
  assert cmd[i - 1] == "-m" and "python" in cmd[i - 2], cmd
  return cmd[i - 2:]


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  full = os.path.join(ROOT, path)
  assert os.path.isfile(full), f"config file {path} does not exist"
  mod_spec = importlib.util.spec_from_file_location("launch_config_under_test", full)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg)


def check_override(cfg, flag: str):
  name, _, value = flag[len("--config."):].partition("=")
  node = cfg
  for part in name.split("."):
    assert part in node, f"{flag}: the config has no field {name!r}"
    node = node[part]
  type(node)(value)       # the value parses as the field's type


def test_every_script_parses_and_is_documented():
  assert len(SCRIPTS) >= 6, SCRIPTS
  readme = open(os.path.join(LAUNCH, "README.md")).read()
  for path in SCRIPTS:
    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert r.returncode == 0, f"{path}: {r.stderr}"
    text = open(path).read()
    name = os.path.basename(path)
    assert text.startswith("#"), name
    if name != "common.sh":           # sourced helpers; the rest are entry points
      assert text.startswith("#!/usr/bin/env bash\n"), name
      assert "\nset -euo pipefail\n" in text, name
      assert text.splitlines()[1].startswith("# "), f"{name}: no usage comment"
      assert f"launch/{name}" in readme, f"launch/README.md does not show {name}"


@pytest.mark.parametrize("script", TRAINERS)
@pytest.mark.parametrize("model,method", [(None, None), ("B/2", "h")])
def test_training_command_is_valid(script, model, method):
  env = dict(BASE_ENV, EXTRA_FLAGS="--config.train.batch_size=512 --config.mesh.fsdp=4")
  if model:
    env.update(MODEL=model, METHOD=method)
  r = dry_run(script, **env)
  assert r.returncode == 0, r.stderr
  cmd = training_command(r.stdout)
  configs = [a for a in cmd if a.startswith("--config=")]
  assert len(configs) == 1, cmd
  cfg = load_config(configs[0][len("--config="):])
  assert cfg.model.arch == (model or "XL/2") and cfg.method == (method or "reglue")
  assert cfg.data.path == env["FEATURES"]
  assert cfg.model.overrides["dtype"] == "bfloat16"       # default CONFIG_EXTRA=bf16
  overrides = [a for a in cmd if a.startswith("--config.")]
  assert overrides == ["--config.train.batch_size=512", "--config.mesh.fsdp=4"]
  for flag in overrides:
    check_override(cfg, flag)
  assert f"--workdir={env['WORKDIR']}" in cmd
  if script == "slurm_train.sbatch":
    assert "srun" in [c for c in commands(r.stdout) if "glue_jax.main" in c][0]
  for s in remote_scripts(r.stdout):
    assert "GLUE_JAX_DISTRIBUTED=1" in s
    n = subprocess.run(["bash", "-n"], input=s, capture_output=True, text=True)
    assert n.returncode == 0, n.stderr


def test_float32_and_bad_override_are_caught():
  r = dry_run("gpu_node.sh", **BASE_ENV, CONFIG_EXTRA="")
  cfg = load_config(next(a for a in training_command(r.stdout)
                         if a.startswith("--config="))[len("--config="):])
  assert "dtype" not in cfg.model.overrides
  with pytest.raises(AssertionError, match="no field"):
    check_override(cfg, "--config.no_such_field=1")


@pytest.mark.parametrize("script,missing", [("gpu_node.sh", "FEATURES"),
                                            ("tpu_train.sh", "ZONE"),
                                            ("tpu_setup.sh", "BUCKET")])
def test_missing_setting_is_a_clear_error(script, missing):
  env = {k: v for k, v in BASE_ENV.items() if k != missing}
  r = dry_run(script, **env)
  assert r.returncode != 0 and f"set {missing}" in r.stderr, (r.stdout, r.stderr)
  assert "gcloud" not in r.stdout and "glue_jax.main" not in r.stdout


@pytest.mark.parametrize("accel,version", [("v5p-32", "v2-alpha-tpuv5"),
                                           ("v6e-8", "v2-alpha-tpuv6e"),
                                           ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v4-64", "tpu-ubuntu2204-base")])
def test_tpu_create_picks_the_runtime(accel, version):
  r = dry_run("tpu_create.sh", **BASE_ENV, ACCELERATOR_TYPE=accel, SPOT="1")
  assert r.returncode == 0, r.stderr
  (cmd,) = commands(r.stdout)
  assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert f"--accelerator-type={accel}" in cmd and f"--version={version}" in cmd
  assert "--spot" in cmd and "--zone=us-east5-a" in cmd


def test_tpu_setup_installs_requirements_with_jax_tpu_and_mounts_the_bucket():
  r = dry_run("tpu_setup.sh", **BASE_ENV)
  assert r.returncode == 0, r.stderr
  (script,) = remote_scripts(r.stdout)
  n = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
  assert n.returncode == 0, n.stderr
  install = next(c for c in commands(script) if c[:2] == ["uv", "pip"])
  req = install[install.index("-r") + 1]
  assert req.endswith("/requirements.txt") and os.path.isfile(os.path.join(ROOT, "requirements.txt"))
  assert "jax[tpu]>=0.11" in install and "-e" in install
  mount = next(c for c in commands(script) if "gcsfuse" in c and "glue-bucket" in c)
  assert mount[-2:] == ["glue-bucket", "/gcs/glue-bucket"]
  scp = next(c for c in commands(r.stdout) if c[3:5] == ["tpu-vm", "scp"])
  assert "--worker=all" in scp


def test_url_workdir_is_a_clear_error(tmp_path, monkeypatch):
  """gs:// workdirs are not supported (launch/README.md): an error, not a local 'gs:' dir."""
  import ml_collections
  import pytest
  from glue_jax import main as main_lib
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="URLs are not supported"):
    main_lib.run(ml_collections.ConfigDict({"kind": "diffusion"}), "gs://bucket/run")
  assert not os.path.exists(tmp_path / "gs:")
