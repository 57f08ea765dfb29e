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
  assert "glue_jax.main" in cmds[0] and "configs/demo.py" in cmds[0]
  assert "pytest" in cmds[1] and "requirements-test.txt" in cmds[1]


def test_ci_runs_the_readme_test_command():
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert "## Quickstart" in ci and "sed -n 2p" in ci
