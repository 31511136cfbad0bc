"""The layout, checked: imports point one way (library <- lab <- studies <-
entry points), run in no circle, and use only each other's public names.

Every module of the repository (tests aside) is read with `ast`, and every
import counts, inside functions too: a lazy import is still an arrow.
"""

import ast
from pathlib import Path

import helpers
import pytest

REPO = helpers.REPO
# Top-level package -> its layer; an import may point to its own layer or
# a lower one only.
LAYERS = {"bn_jax": 0, "bn_lab": 1, "studies": 2, "experiments": 3,
          "benchmarks": 3}
# Where each package's modules are, relative to the repository root.
ROOTS = {"bn_jax": "bn_jax", "bn_lab": "lab/bn_lab", "studies": "studies",
         "experiments": "experiments", "benchmarks": "benchmarks"}


def _is_test(path: Path) -> bool:
  return path.name.startswith("test_") or path.name == "conftest.py"


def project_modules() -> dict[str, Path]:
  """{dotted module name: file} of every non-test module."""
  modules = {}
  for package, root in ROOTS.items():
    for path in sorted((REPO / root).rglob("*.py")):
      if _is_test(path) or "__pycache__" in path.parts:
        continue
      parts = list(path.relative_to(REPO / root).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      modules[".".join([package, *parts])] = path
  return modules


def _resolve(name: str, modules) -> str | None:
  """The project module `name` is, or is inside (a.b.c -> a.b)."""
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def imports_of(module: str, path: Path, modules) -> dict[str, str]:
  """{imported project module: the local name it is bound to}."""
  found = {}
  package = module if path.name == "__init__.py" else module.rpartition(
      ".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for alias in node.names:
        target = _resolve(alias.name, modules)
        if target:
          found[target] = alias.asname or alias.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join([*up, base] if base else up)
      for alias in node.names:
        target = (_resolve(f"{base}.{alias.name}", modules)
                  or _resolve(base, modules))
        if target:
          found[target] = alias.asname or alias.name
  found.pop(module, None)
  return found


def import_graph():
  modules = project_modules()
  return modules, {m: imports_of(m, p, modules) for m, p in modules.items()}


def circles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return found


def upward_imports(graph) -> list[str]:
  layer = lambda m: LAYERS[m.split(".")[0]]
  return [f"{a} -> {b}" for a, targets in graph.items() for b in targets
          if layer(b) > layer(a)]


def test_the_walk_sees_every_layer_and_lazy_imports():
  """The checks below would pass on an empty graph: the walk must find the
  layers' modules, their arrows, and an import inside a function."""
  modules, graph = import_graph()
  assert {m.split(".")[0] for m in modules} == set(LAYERS)
  assert "bn_lab.train" in graph["bn_lab.classifier"]
  assert "studies.registry" in graph["experiments.main"]
  source = "def f():\n  from bn_lab import train\n"
  path = Path(pytest.importorskip("tempfile").mkdtemp()) / "m.py"
  path.write_text(source)
  assert imports_of("bn_jax.m", path, modules) == {"bn_lab.train": "train"}


def test_no_import_circles():
  _, graph = import_graph()
  assert circles(graph) == []


def test_a_circle_and_an_upward_arrow_are_found():
  graph = {"bn_jax.a": {"bn_lab.b": "b"}, "bn_lab.b": {"bn_jax.a": "a"},
           "bn_lab.c": {"studies.d": "d"}, "studies.d": {}}
  assert circles(graph) == [["bn_jax.a", "bn_lab.b"]]
  assert upward_imports(graph) == ["bn_jax.a -> bn_lab.b",
                                   "bn_lab.c -> studies.d"]


def test_imports_point_one_way():
  """library <- lab <- studies <- entry points: the library imports no lab,
  the lab (the trainer, the runner, the report toolkit) no study."""
  _, graph = import_graph()
  assert upward_imports(graph) == []


def _unit(module: str) -> str:
  """What may share private names: a package, or one study's folder."""
  parts = module.split(".")
  return ".".join(parts[:2]) if parts[0] == "studies" else parts[0]


def test_no_private_names_across_packages():
  """A study, an entry point or the lab uses another part's public names
  only (the report toolkit's helpers included): no `module._name` of a
  module in another package or another study's folder."""
  modules, graph = import_graph()
  private = []
  for module, path in modules.items():
    bound = {local: target for target, local in graph[module].items()
             if _unit(target) != _unit(module)}
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in bound and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        private.append(f"{module}: {node.value.id}.{node.attr}")
  assert private == []
