"""The package's layering, read from the source: every import of a switchx module (function-level ones included)
is an arrow; there must be no cycle between modules and none of the forbidden arrows between packages.

    moe, nn          the layers          (nn never imports moe; neither imports models, train, data, cli)
    models           the model           (never train, data, cli)
    data             the input pipeline  (never models, train)
    parallel         meshes and shardings (never train)
    train            the trainer         (never cli)
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "switchx"
FORBIDDEN = [("moe", "models"), ("moe", "train"), ("nn", "moe"), ("models", "train"), ("models", "data"),
             ("data", "models"), ("data", "train"), ("parallel", "train"), ("models", "cli"), ("train", "cli")]


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
  return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str], importer: str = "") -> set[str]:
  """The switchx modules `path` imports anywhere in its body (`from switchx.x import y` counts y when y is a
  module, else switchx.x)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("switchx")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("switchx") and not node.level:
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        out.add(sub if sub in known else node.module)
  # Importing switchx.a.b first runs switchx/a/__init__.py: an arrow to the package too (unless the importer
  # is inside it: a package's own modules run after its __init__ has started).
  parents = {m.rsplit(".", i)[0] for m in out for i in range(1, m.count("."))}
  out |= {p for p in parents if not importer.startswith(p + ".")}
  return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
  found = modules()
  known = set(found)
  return {name: imports(path, known, name) - {name} for name, path in found.items()}


def package_of(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """A cycle as a list of modules, or None. Package __init__ files that only re-export are not exempt."""
  state, stack = {}, []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("def f():\n  from switchx.train import loop\n  import switchx.models.encoder_decoder\n")
  assert imports(path, {"switchx.train.loop", "switchx.models.encoder_decoder", "switchx.train"}) == {
      "switchx.train.loop", "switchx.models.encoder_decoder", "switchx.train"}
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
  cycle = find_cycle(graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source,target", FORBIDDEN)
def test_no_forbidden_arrow(source, target):
  bad = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps
               if package_of(a) == source and package_of(b) == target)
  assert not bad, f"{source} must not import {target}: " + ", ".join(bad)


def test_model_code_names_logical_axes_through_axes_py():
  """nn/, moe/ and models/ spell no logical axis as a string literal inside a tuple (axes.py is the vocabulary
  parallel/rules.py maps onto the mesh)."""
  from switchx import axes
  offenders = []
  for package in ("nn", "moe", "models"):
    for path in sorted((PACKAGE / package).glob("*.py")):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Tuple):
          for item in node.elts:
            if isinstance(item, ast.Constant) and item.value in axes.ALL:
              offenders.append(f"{path.name}:{item.lineno} {item.value!r}")
  assert not offenders, "use the switchx.axes constants: " + ", ".join(offenders)
