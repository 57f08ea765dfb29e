"""The package's import graph: no cycles, no function-local imports of glue_jax
modules (heavy optional packages such as torch or tensorflow may be imported
inside functions), unique module file names, modules of at most 500 lines."""
import ast
import collections
import os

import pytest

# glue_jax modules whose import pulls a heavy optional package (TensorFlow):
# importing them inside a function is allowed, as for the package itself.
HEAVY = {"glue_jax.data.tfds_digits"}

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "glue_jax")


def _modules():
  """``{dotted name: path}`` of every module of the package."""
  out = {}
  for d, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def _imported(node, module: str, modules) -> list[str]:
  """glue_jax modules an import node names (``from a import b`` counts a.b when
  it is a module, else a)."""
  names = []
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom):
    base = node.module or ""
    if node.level:
      pkg = module.split(".")[:-node.level] if not module.endswith("__init__") else \
          module.split(".")
      base = ".".join(pkg + ([base] if base else []))
    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
             for a in node.names]
  return [n for n in names if n == "glue_jax" or n.startswith("glue_jax.")]


def _graph():
  modules = _modules()
  edges, local = collections.defaultdict(set), []
  for mod, path in modules.items():
    tree = ast.parse(open(path).read(), path)
    top = set(id(n) for n in tree.body)
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      targets = [t for t in _imported(node, mod, modules) if t in modules]
      if id(node) in top:
        edges[mod].update(t for t in targets if t != mod)
      elif set(targets) - HEAVY:
        local.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}:{node.lineno} "
                     f"imports {', '.join(targets)} inside a function")
  return modules, edges, local


def _cycles(edges) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in list(edges):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  _, edges, _ = _graph()
  cycles = _cycles(edges)
  assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_function_local_imports_of_glue_jax():
  _, _, local = _graph()
  assert not local, "function-local imports of glue_jax modules:\n" + "\n".join(local)


def test_module_file_names_are_unique():
  """Unique leaf names, except configs: ``glue_jax/configs/<job>.py`` is named
  after the job it configures."""
  names = collections.defaultdict(list)
  for mod in _modules():
    if mod.startswith("glue_jax.configs."):
      continue
    leaf = mod.split(".")[-1]
    if leaf not in ("glue_jax",) and not mod.endswith(tuple(f".{p}" for p in (
        "models", "transport", "sampling", "train", "data", "eval", "tools", "projects",
        "reglue", "glod", "lainr", "configs"))):
      names[leaf].append(mod)
  dup = {k: v for k, v in names.items() if len(v) > 1}
  assert not dup, f"module names used twice: {dup}"


@pytest.mark.parametrize("limit", [500])
def test_modules_stay_small(limit):
  big = {m: n for m, p in _modules().items() if (n := sum(1 for _ in open(p))) > limit}
  assert not big, f"modules over {limit} lines (split by concept): {big}"
