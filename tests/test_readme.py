"""README's Quickstart holds exactly two commands: demo, then tests (what CI runs)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_commands():
  text = open(os.path.join(ROOT, "README.md")).read()
  section = re.search(r"^## Quickstart\n(.*?)(?=^## |\Z)", text, re.S | re.M).group(1)
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  return [l for l in block.splitlines() if l.strip() and not l.strip().startswith("#")]


def test_two_commands_demo_then_tests():
  cmds = quickstart_commands()
  assert len(cmds) == 2
  assert "glue_jax.main" in cmds[0] and "glue_jax/configs/demo.py" in cmds[0]
  assert "pytest" in cmds[1] and "requirements-test.txt" in cmds[1]


def test_ci_runs_the_readme_test_command():
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert "## Quickstart" in ci and "sed -n 2p" in ci


def readme_commands():
  """Every ``python -m glue_jax...`` command in README's bash blocks (continuations joined)."""
  import shlex
  text = open(os.path.join(ROOT, "README.md")).read()
  cmds = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  # ")[0].strip()
      for part in line.split("&&"):
        words = shlex.split(part)
        if len(words) > 2 and words[0].startswith("python") and words[1] == "-m" \
            and words[2].startswith("glue_jax"):
          cmds.append((words[2], words[3:]))
  return cmds


def test_readme_commands_name_real_modules_flags_configs_and_fields():
  """The README's commands are runnable as written: the module exists, every
  --flag is one it defines (from its own --help), every --config=FILE:ARG loads,
  its kind is known, and every --config.x.y override names an existing field."""
  import importlib
  import subprocess
  import sys
  from glue_jax import main as main_lib
  cmds = readme_commands()
  assert len(cmds) >= 15, cmds
  modules = sorted({m for m, _ in cmds})
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

  def help_flag(module):       # argparse CLIs print every flag with --help, absl with --helpfull
    src = open(importlib.util.find_spec(module).origin).read()
    return "--help" if "ArgumentParser(" in src else "--helpfull"
  procs = {m: subprocess.Popen([sys.executable, "-m", m, help_flag(m)], cwd=ROOT, env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for m in modules}
  helps = {m: p.communicate(timeout=300)[0] for m, p in procs.items()}
  for module, args in cmds:
    assert importlib.util.find_spec(module), module
    config = None
    for i, a in enumerate(args):
      if not a.startswith("--"):
        assert i and args[i - 1].startswith("--") and "=" not in args[i - 1], (module, a)
        continue                                  # the value of '--flag value'
      name, _, value = a[2:].partition("=")
      if name.startswith("config."):
        assert config is not None, (module, a)
        node = config
        for key in name.split(".")[1:]:
          assert key in node, f"README: {module} {a}: no field {key!r}"
          node = node[key]
        continue
      assert re.search(rf"--(\[no\])?{re.escape(name)}\b", helps[module]), \
          f"README: {module} has no flag --{name}:\n{helps[module][-2000:]}"
      if name == "config":
        path, _, arg = value.partition(":")
        mod = importlib.import_module(path[:-3].replace("/", "."))
        config = mod.get_config(arg or None)
        if module == "glue_jax.main":
          assert config.get("kind", "diffusion") in main_lib.KINDS, (value, config.kind)
