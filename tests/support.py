"""Plain helpers and constants the tests share (no fixtures: those are in
conftest.py). Test modules import them with `from support import ...`: pytest
puts tests/ on sys.path (tests/ has no __init__.py).

Importing this module starts no JAX backend: it only imports jax. The 8 fake
CPU devices are set up by conftest.py, which pytest imports first.
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import shlex
import shutil

import jax
import numpy as np

NUM_DEVICES = 8  # fake CPU devices every test session runs with (conftest.py)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CLS_PIXEL_PATH = REPO_ROOT / "configs" / "cls_pixel.py"
MAE_PIXEL_PATH = REPO_ROOT / "configs" / "mae_pixel.py"
DIT_PIXEL_PATH = REPO_ROOT / "configs" / "dit_pixel.py"

# A trainer run that costs seconds: the quick config (mu/1 on 8x8 digits),
# shortened. Dotted keys, applied with `set_dotted`.
TINY_RUN = {
  "total_steps": 6,
  "batch_size": 32,
  "eval_batch_size": 360,
  "eval_every": 3,
  "checkpoint_every": 3,
  "log_every": 2,
  "optimizer.warmup_steps": 2,
}

# A short MAE run: configs/mae_pixel.py:quick (mu/1 on 8x8 digits, a 64-wide
# 2-deep decoder), shortened. Dotted keys, applied with `set_dotted`.
MAE_TINY_RUN = {**TINY_RUN, "eval_batch_size": 40}

# configs/dit_pixel.py:quick (mu/1 DiT on 8x8 digits), shortened.
DIT_TINY_RUN = {
  "total_steps": 6,
  "batch_size": 32,
  "eval_batch_size": 40,
  "eval_every": 3,
  "checkpoint_every": 3,
  "log_every": 2,
  "optimizer.warmup_steps": 2,
  "sample.steps": "8",
  "sample.grid_columns": 2,
  "fid.batch_size": 40,
}


# ---------------------------------------------------------------- configs


def load_config_module(path: pathlib.Path):
  """A configs/*.py file as a module (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def set_dotted(config, overrides: dict):
  """`{'optimizer.lr': 1e-3}` -> config.optimizer.lr = 1e-3 (keys must exist)."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"test override {dotted!r} is not a config key")
    node[leaf] = value
  return config


# ---------------------------------------------------------------- commands (README, paper study)


@dataclasses.dataclass
class Command:
  """A `python -m pixel_vit.main|sample --config=FILE:ARG --config.k=v --workdir=DIR` line."""

  module: str  # 'main' or 'sample'
  config_file: str
  config_arg: str
  overrides: dict  # dotted key -> string value
  workdir: str

  @classmethod
  def parse(cls, text: str) -> "Command":
    words = shlex.split(text)
    assert words[:2] == ["python", "-m"], text
    module = words[2].rpartition(".")[2]
    flags = {}
    for word in words[3:]:
      key, sep, value = word.partition("=")
      assert key.startswith("--") and sep, f"unexpected word {word!r} in {text!r}"
      flags[key[2:]] = value
    config_file, _, config_arg = flags.pop("config").partition(":")
    overrides = {k[len("config.") :]: v for k, v in flags.items() if k.startswith("config.")}
    return cls(module, config_file, config_arg, overrides, flags["workdir"])


def set_override(config, dotted: str, text: str) -> None:
  """`--config.a.b=text` as ml_collections' flag parsing does it: cast to the
  field's type (a missing key fails, as it does for the real command)."""
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    node = node[name]
  # Typed even when the value is None (a placeholder); set_dotted names a missing key.
  kind = node.get_type(leaf) if leaf in node else str
  if kind is bool:
    value = text.lower() in ("true", "1")
  elif kind in (int, float):
    value = kind(text)
  else:
    value = text
  set_dotted(config, {dotted: value})


def build(command: Command, *, init_from_map: dict | None = None):
  """The config `command` builds: its config file and argument, then its overrides."""
  arg = command.config_arg
  for original, replacement in (init_from_map or {}).items():
    arg = arg.replace(f"init_from={original}", f"init_from={replacement}")
  config = load_config_module(REPO_ROOT / command.config_file).get_config(arg)
  for key, value in command.overrides.items():
    set_override(config, key, value)
  return config


# ---------------------------------------------------------------- workdirs and metrics


def snapshot(directory) -> dict:
  """{relative path: sha256} of every file under `directory`."""
  result = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        result[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return result


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def logged_train_steps(workdir) -> list[int]:
  """Train steps in metrics.jsonl, in file order (a line being written is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  steps = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if "train/loss" in record:
        steps.append(record["step"])
  return steps


# ---------------------------------------------------------------- arrays and traces


def as_numpy_leaves(tree) -> list:
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(actual, desired, what: str):
  """Same structure and bitwise-equal leaves; names the first differing leaf."""
  assert jax.tree.structure(actual) == jax.tree.structure(desired), what
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(desired)]
  for path, a, d in zip(paths, as_numpy_leaves(actual), as_numpy_leaves(desired)):
    np.testing.assert_array_equal(a, d, err_msg=f"{what}{path}")


def record_first_shapes(monkeypatch, module, name: str) -> list:
  """Wraps `module.name` so each call (each trace, under jit) appends the shape
  of its first argument to the returned list: what a per-device body saw."""
  seen = []
  function = getattr(module, name)

  def recording(first, *args, **kwargs):
    seen.append(first.shape)
    return function(first, *args, **kwargs)

  monkeypatch.setattr(module, name, recording)
  return seen


# ---------------------------------------------------------------- faults (test_faults*.py)


def damage_checkpoint(step_dir: str, how: str) -> None:
  """Damages one orbax step directory as a crash or a bad disk would:
  `truncate` its data files, delete its `metadata` (_METADATA) or its `ocdbt`
  process directory."""
  state = os.path.join(step_dir, "state")
  if how == "truncate":  # every data file (under a d/ directory) to half its size
    data = [
      os.path.join(root, name)
      for root, _, names in os.walk(state)
      for name in names
      if os.path.basename(root) == "d"
    ]
    assert data, f"no data files under {state}"
    for path in data:
      os.truncate(path, os.path.getsize(path) // 2)
  elif how == "metadata":
    os.remove(os.path.join(state, "_METADATA"))
  elif how == "ocdbt":
    shutil.rmtree(os.path.join(state, "ocdbt.process_0"))
  else:
    raise ValueError(how)


# ---------------------------------------------------------------- image folders


def make_image_folder(root, *, classes=3, per_class=14, seed=0, sizes=(12, 48), png_every=3) -> str:
  """JPEG and PNG files (every `png_every`-th a PNG; 0: none) of varied sizes
  (each side drawn from `sizes`) and aspect ratios, one folder per class."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  for c in range(classes):
    folder = os.path.join(root, f"class_{c}")
    os.makedirs(folder, exist_ok=True)
    for i in range(per_class):
      h, w = (int(v) for v in rng.integers(sizes[0], sizes[1], 2))
      pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
      pixels[..., 0] = 255 * c // max(1, classes - 1)  # the class shows in the red channel
      png = png_every and i % png_every
      Image.fromarray(pixels).save(os.path.join(folder, f"{i}.{'png' if png else 'jpg'}"))
  return str(root)
