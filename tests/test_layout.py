"""The package's folders form layers: no folder imports one above it, and no import cycles.

The rule is written once, in LAYERS; docs/implementation.md draws the same map.
"""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cas_jax")
# Folder -> layer; a module may import its own folder and folders of a lower layer only. Folders
# of one layer (training, analysis) do not import each other. Top-level modules (configs,
# errors, input_pipeline, losses, checkpointing, provenance, preemption, cli) are layer 0: what
# everything shares; `main` and the package's __init__ (which re-exports `benchmark` on
# first use) are entry points and may import anything.
LAYERS = {"shared": 0, "models": 1, "attacks": 2, "evaluation": 3, "training": 4,
          "analysis": 4, "experiments": 5, "main": 6}
ENTRY_POINTS = ("cas_jax.main", "cas_jax")


def folder(module: str) -> str:
  """The layer name of a dotted module of cas_jax ('cas_jax.evaluation.report' -> 'evaluation')."""
  parts = module.split(".")
  if len(parts) < 2:
    return "shared"
  return parts[1] if parts[1] in LAYERS else "shared"


def package_imports(package_dir: str = PACKAGE):
  """{module: [(imported cas_jax module, line, at module level)]} for every module of cas_jax."""
  graph = {}
  for root, _, files in os.walk(package_dir):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, os.path.dirname(package_dir))[:-3].replace(os.sep, ".")
      module = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
      tree = ast.parse(open(path).read(), path)
      top_level = {id(n) for n in tree.body}
      found = []
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
          # `from cas_jax.x import y`: y may be a module of x or a name in it; either way x.y
          # names the dependency at the finest grain that exists.
          targets = [f"{node.module}.{a.name}" for a in node.names]
        else:
          continue
        for target in targets:
          if target == "cas_jax" or target.startswith("cas_jax."):
            found.append((_existing(target, package_dir), node.lineno, id(node) in top_level))
      graph[module] = found
  return graph


def _existing(module: str, package_dir: str) -> str:
  """The longest prefix of a dotted name that is a module or package of cas_jax."""
  parts = module.split(".")
  base = os.path.dirname(package_dir)
  while len(parts) > 1:
    path = os.path.join(base, *parts)
    if os.path.isdir(path) or os.path.isfile(path + ".py"):
      break
    parts.pop()
  return ".".join(parts)


def violations(graph):
  """Every import that goes up a layer, or across folders of one layer, as readable lines."""
  found = []
  for module, imports in graph.items():
    source = "main" if module in ENTRY_POINTS else folder(module)
    for target, line, _ in imports:
      dest = folder(target)
      if dest == source or LAYERS[dest] < LAYERS[source]:
        continue
      found.append(f"{module}:{line} imports {target} ({dest}, layer {LAYERS[dest]}) "
                   f"from {source} (layer {LAYERS[source]})")
  return found


def cycles(graph):
  """Import cycles between modules through module-level imports (lazy imports excluded)."""
  edges = {m: sorted({t for t, _, top in imps if top and t != m and t in graph})
           for m, imps in graph.items()}
  found, state = [], {}

  def visit(node, path):
    state[node] = "open"
    for nxt in edges.get(node, ()):
      if state.get(nxt) == "open":
        found.append(" -> ".join(path[path.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for node in sorted(edges):
    if node not in state:
      visit(node, [node])
  return found


def test_no_folder_imports_one_above_it():
  graph = package_imports()
  assert len(graph) > 40, sorted(graph)   # the walk found the package
  assert violations(graph) == []


def test_no_import_cycles_between_modules():
  assert cycles(package_imports()) == []


@pytest.mark.parametrize("source,target,allowed", [
    ("cas_jax.evaluation.evaluate", "cas_jax.training.train", False),
    ("cas_jax.attacks.apgd", "cas_jax.evaluation.report", False),
    ("cas_jax.training.train", "cas_jax.analysis.channels", False),
    ("cas_jax.models.loading", "cas_jax.attacks.engine", False),
    ("cas_jax.errors", "cas_jax.models", False),
    ("cas_jax.training.train", "cas_jax.evaluation.evaluate", True),
    ("cas_jax.experiments.driver", "cas_jax.training.train", True),
    ("cas_jax.main", "cas_jax.experiments.driver", True),
    ("cas_jax", "cas_jax.evaluation.benchmark", True),
    ("cas_jax.cli", "cas_jax.evaluation.benchmark", False),
    ("cas_jax.attacks.white_box", "cas_jax.losses", True),
])
def test_the_rule_tells_an_upward_import(source, target, allowed):
  assert (violations({source: [(target, 1, True)]}) == []) == allowed


def test_a_cycle_is_found():
  graph = {"cas_jax.a": [("cas_jax.b", 1, True)], "cas_jax.b": [("cas_jax.c", 1, True)],
           "cas_jax.c": [("cas_jax.a", 1, True)]}
  assert cycles(graph) == ["cas_jax.a -> cas_jax.b -> cas_jax.c -> cas_jax.a"]
