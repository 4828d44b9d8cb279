"""The package's architecture, checked: pixel_vit's modules form layers, each
importing only from the layers below it, with no import cycles; and the
configs load without any heavy library (JAX, Flax, orbax, TensorFlow, optax).

The import graph is read with `ast` (no module is imported): every `import`
and `from ... import` in a module, at top level or inside a function; `from
pixel_vit.x import y` is an edge to the module pixel_vit.x.y when y is one,
else to pixel_vit.x. A package's `__init__.py` is a module of its own (the
package's name). Imports by string (`importlib.import_module`) are not seen.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

from support import REPO_ROOT

PACKAGE = "pixel_vit"

# ---------------------------------------------------------------- the architecture
#
# Lowest first. Each layer may import its own modules and the layers listed
# for it, nothing else. So: configuration imports no other pixel_vit module;
# models imports no data / diffusion / evaluation; data imports no models /
# diffusion / evaluation; diffusion may use models and data; evaluation may
# use models, data and diffusion; nothing below trainers imports trainers.
ALLOWED_IMPORTS = {
  "configuration": set(),
  "infrastructure": {"configuration"},
  "models": {"configuration", "infrastructure"},
  "data": {"configuration", "infrastructure"},
  "diffusion": {"configuration", "infrastructure", "models", "data"},
  "evaluation": {"configuration", "infrastructure", "models", "data", "diffusion"},
  "trainers": {"configuration", "infrastructure", "models", "data", "diffusion", "evaluation"},
  "commands": {
    "configuration",
    "infrastructure",
    "models",
    "data",
    "diffusion",
    "evaluation",
    "trainers",
  },
}

# The layer of each module, by the first name after `pixel_vit.` (a
# subpackage's modules all share its layer). The package's own __init__ is
# at the bottom, beside the light helpers.
LAYER_OF = {
  "": "configuration",  # pixel_vit/__init__.py
  "configuration": "configuration",  # light helpers: parse_arg, config defaults
  "config_checks": "configuration",  # the wording of a config check (require, ...)
  "parallel": "infrastructure",
  "hardware": "infrastructure",  # chips, the devices a trace targets, topologies
  "program_costs": "infrastructure",  # memory / FLOPs / collectives of a compiled program
  "checkpoint": "infrastructure",
  "workdir": "infrastructure",
  "distributed": "infrastructure",
  "optimizer": "infrastructure",
  "models": "models",
  "data": "data",
  "diffusion": "diffusion",
  "evaluation": "evaluation",
  "trainers": "trainers",
  "main": "commands",
  "sample": "commands",
  "encode_latents": "commands",
  "write_records": "commands",
  "compile": "commands",
  "command_line": "commands",
}

# What a config file may not pull in (checked in sys.modules after get_config).
HEAVY_MODULES = ("jax", "flax", "orbax", "tensorflow", "tensorflow_datasets", "optax")


# ---------------------------------------------------------------- the import graph


@dataclasses.dataclass(frozen=True)
class Import:
  importer: str  # module name
  imported: str  # module name (pixel_vit modules only)
  file: str  # the importer's file, relative to the package's parent directory
  line: int

  def where(self) -> str:
    return f"{self.file}:{self.line}: {self.importer} -> {self.imported}"


def module_files(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """{module name: file} of every .py under the package (an __init__.py is its package)."""
  modules = {}
  for path in sorted(package_dir.rglob("*.py")):
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def imports_of(name: str, path: pathlib.Path, modules: dict, root: pathlib.Path) -> list[Import]:
  """The package-internal imports in one module's source, anywhere in it."""
  package = name.split(".")[0]
  is_package = path.name == "__init__.py"
  found = []

  def add(target: str, node: ast.AST):
    if target == package or target.startswith(package + "."):
      found.append(Import(name, target, str(path.relative_to(root)), node.lineno))

  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name, node)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from the importer's package, up level - 1
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      for alias in node.names:
        submodule = f"{source}.{alias.name}"
        add(submodule if submodule in modules else source, node)
  return found


def import_graph(package_dir: pathlib.Path) -> tuple[dict, list[Import]]:
  """(modules, every package-internal import)."""
  modules = module_files(package_dir)
  edges = []
  for name, path in modules.items():
    edges += imports_of(name, path, modules, package_dir.parent)
  return modules, edges


def layer_of(module: str, layer_map: dict) -> str | None:
  relative = module.split(".", 1)[1] if "." in module else ""
  return layer_map.get(relative.split(".")[0])


def layer_violations(modules: dict, edges: list[Import], *, layer_map=None) -> list[str]:
  """One line per import that runs upward or sideways between layers, or per
  module that is in no layer."""
  layer_map = LAYER_OF if layer_map is None else layer_map
  allowed = ALLOWED_IMPORTS
  problems = [
    f"{module} ({path.name}) is in no layer: add its name to LAYER_OF"
    for module, path in modules.items()
    if layer_of(module, layer_map) is None
  ]
  for edge in edges:
    low, high = layer_of(edge.imported, layer_map), layer_of(edge.importer, layer_map)
    if low is None or high is None or low == high or low in allowed[high]:
      continue
    problems.append(
      f"{edge.where()}: layer {high!r} may not import layer {low!r} "
      f"({high!r} may import only {sorted(allowed[high]) or 'nothing'} "
      "and itself)"
    )
  return problems


def import_cycles(edges: list[Import]) -> list[list[Import]]:
  """Import cycles, each as its imports in order: the shortest cycle through
  each module that is on one and on no cycle reported before it."""
  graph = {}
  for edge in edges:
    if edge.importer != edge.imported:
      graph.setdefault(edge.importer, {}).setdefault(edge.imported, edge)

  def shortest_cycle(first):  # breadth first: the shortest path back to `first`
    paths = {first: []}
    queue = [first]
    while queue:
      node = queue.pop(0)
      for child, edge in sorted(graph.get(node, {}).items()):
        if child == first:
          return paths[node] + [edge]
        if child not in paths:
          paths[child] = paths[node] + [edge]
          queue.append(child)
    return None

  cycles, covered = [], set()
  for module in sorted(graph):
    if module not in covered and (cycle := shortest_cycle(module)):
      cycles.append(cycle)
      covered.update(edge.importer for edge in cycle)
  return cycles


def describe_cycle(cycle: list[Import]) -> str:
  modules = " -> ".join([edge.importer for edge in cycle] + [cycle[0].importer])
  return f"import cycle {modules}:\n" + "\n".join(f"    {edge.where()}" for edge in cycle)


# ---------------------------------------------------------------- the checks on pixel_vit


@pytest.fixture(scope="module")
def graph():
  return import_graph(REPO_ROOT / PACKAGE)


def test_every_layer_imports_only_the_layers_below_it(graph):
  modules, edges = graph
  assert edges, "no imports found: is the package where REPO_ROOT says?"
  problems = layer_violations(modules, edges)
  assert not problems, (
    "imports against the layering (see ALLOWED_IMPORTS in "
    "tests/test_layering.py):\n  " + "\n  ".join(problems)
  )


def test_no_import_cycles(graph):
  _, edges = graph
  cycles = import_cycles(edges)
  assert not cycles, "\n".join(describe_cycle(cycle) for cycle in cycles)


# ---------------------------------------------------------------- configs stay light

# Run in a fresh interpreter: loads the config file by path, calls get_config()
# and get_config("quick") (if the config has it), then prints which heavy
# modules got imported and through which chain of importers (an audit hook
# records the first importer of every module).
CONFIG_PROBE = r"""
import importlib.util, json, os, sys
path, heavy = sys.argv[1], sys.argv[2].split(",")
already = [m for m in heavy if m in sys.modules]
machinery = (os.path.dirname(importlib.__file__) + os.sep, "<frozen importlib")
importer = {}

def record(event, args):
  if event != "import" or args[0] in importer:
    return
  frame = sys._getframe(1)
  while frame is not None and frame.f_code.co_filename.startswith(machinery):
    frame = frame.f_back
  importer[args[0]] = frame.f_globals.get("__name__") if frame is not None else None

sys.addaudithook(record)
spec = importlib.util.spec_from_file_location("config_under_test", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.get_config()
calls = ["get_config()"]
try:
  module.get_config("quick")
  calls.append("get_config('quick')")
except ValueError as e:
  if "'quick' is unknown" not in str(e):
    raise

def chain(name):
  links = [name]
  while links[-1] in importer and importer[links[-1]] not in (None, "__main__") \
      and len(links) < 50:
    links.append(importer[links[-1]])
  return [n.replace("config_under_test", path) for n in reversed(links)]

loaded = {m: chain(m) for m in heavy if m in sys.modules}
print(json.dumps({"calls": calls, "already": already, "heavy": loaded}))
"""

CONFIG_FILES = sorted((REPO_ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_loads_without_heavy_libraries(path):
  proc = subprocess.run(
    [sys.executable, "-c", CONFIG_PROBE, str(path.relative_to(REPO_ROOT)), ",".join(HEAVY_MODULES)],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not report["already"], f"imported before the config was loaded: {report['already']}"
  heavy = report["heavy"]
  assert not heavy, (
    f"configs/{path.name}: {' and '.join(report['calls'])} imported "
    f"{', '.join(sorted(heavy))}; configs must stay light (ml_collections and "
    "pixel_vit.configuration only):\n"
    + "\n".join(f"  {name}: {' -> '.join(chain)}" for name, chain in sorted(heavy.items()))
  )


# ---------------------------------------------------------------- the checker can fail


def write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for relative, text in files.items():
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return root / "pkg"


def test_checker_reports_an_upward_import_and_a_cycle(tmp_path):
  """A synthetic package: models imports trainers (upward, inside a function)
  and data.a <-> data.b import each other; both are reported by name."""
  package = write_package(
    tmp_path,
    {
      "pkg/__init__.py": "",
      "pkg/models/__init__.py": "",
      "pkg/models/vit.py": "import os\n\n\ndef f():\n  from pkg.trainers import loop\n",
      "pkg/trainers/__init__.py": "",
      "pkg/trainers/loop.py": "from pkg.data import a\n",  # downward: fine
      "pkg/data/__init__.py": "",
      "pkg/data/a.py": "from pkg.data import b\n",
      "pkg/data/b.py": "import pkg.data.a as a\n",
    },
  )
  modules, edges = import_graph(package)
  layers = {"": "configuration", "models": "models", "data": "data", "trainers": "trainers"}

  problems = layer_violations(modules, edges, layer_map=layers)
  assert problems == [
    "pkg/models/vit.py:5: pkg.models.vit -> pkg.trainers.loop: layer 'models' may not "
    "import layer 'trainers' ('models' may import only ['configuration', 'infrastructure'] "
    "and itself)"
  ], problems

  cycles = import_cycles(edges)
  assert [describe_cycle(c) for c in cycles] == [
    "import cycle pkg.data.a -> pkg.data.b -> pkg.data.a:\n"
    "    pkg/data/a.py:1: pkg.data.a -> pkg.data.b\n"
    "    pkg/data/b.py:1: pkg.data.b -> pkg.data.a"
  ], cycles

  # And a module outside every layer is named, not silently allowed.
  del layers["data"]
  assert any(
    "pkg.data.a (a.py) is in no layer" in p
    for p in layer_violations(modules, edges, layer_map=layers)
  )


def test_checker_resolves_package_inits_and_relative_imports(tmp_path):
  """`from pkg.models import attention` is the attention package's __init__;
  `from pkg.models import NAME` is the models __init__; relative imports
  resolve from the importer's package; a cycle through an __init__ counts."""
  package = write_package(
    tmp_path,
    {
      "pkg/__init__.py": "",
      "pkg/models/__init__.py": "from pkg.models.attention import core\n",
      "pkg/models/attention/__init__.py": "from . import core\nfrom .core import f\n",
      "pkg/models/attention/core.py": "from ..attention import registry\n",
      "pkg/models/vit.py": "from pkg.models import attention, build\n",
    },
  )
  _, edges = import_graph(package)
  assert {(e.importer, e.imported) for e in edges} == {
    ("pkg.models", "pkg.models.attention.core"),
    ("pkg.models.attention", "pkg.models.attention.core"),
    ("pkg.models.attention.core", "pkg.models.attention"),  # `registry` is no module
    ("pkg.models.vit", "pkg.models.attention"),
    ("pkg.models.vit", "pkg.models"),
  }
  [cycle] = import_cycles(edges)
  assert [e.importer for e in cycle] == ["pkg.models.attention", "pkg.models.attention.core"]
