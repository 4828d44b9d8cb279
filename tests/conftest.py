"""Shared test setup: 8 fake CPU devices, the cls_pixel config, work directories.

JAX must see 8 CPU devices for the whole session, so the option is set here,
at import, before any test module touches a JAX backend: conftest.py is
imported before the test modules are collected.
"""
import copy
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import socket

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (the environment above must be set first)

NUM_DEVICES = 8
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CLS_PIXEL_PATH = REPO_ROOT / "configs" / "cls_pixel.py"

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


@pytest.fixture(scope="session", autouse=True)
def eight_cpu_devices():
  """Every test runs with the 8 fake CPU devices the conftest asked for."""
  devices = jax.devices()
  assert len(devices) == NUM_DEVICES and all(d.platform == "cpu" for d in devices), (
      f"expected {NUM_DEVICES} CPU devices, got {devices}: was a JAX backend "
      "initialised before tests/conftest.py set jax_num_cpu_devices?")
  return devices


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any TCP connection beyond loopback fails the test: nothing may download."""
  real_connect = socket.socket.connect

  def guarded_connect(sock, address):
    if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
      raise AssertionError(f"test tried to reach the network: {address}")
    return real_connect(sock, address)

  monkeypatch.setattr(socket.socket, "connect", guarded_connect)


@pytest.fixture(scope="session")
def cls_pixel():
  """The configs/cls_pixel.py module, imported by path."""
  return load_config_module(CLS_PIXEL_PATH)


@pytest.fixture
def quick_config(cls_pixel):
  """`quick_config(**dotted_overrides)` -> a fresh cls_pixel:quick config.

  With no arguments it is the plain quick config; `tiny=True` also applies
  TINY_RUN (6 steps of batch 32); dotted keys are passed as a dict.
  """

  def make(overrides: dict | None = None, *, tiny: bool = True, arg: str = "quick"):
    config = cls_pixel.get_config(arg)
    if tiny:
      set_dotted(config, copy.deepcopy(TINY_RUN))
    return set_dotted(config, overrides or {})

  return make


@pytest.fixture
def workdir(tmp_path):
  """A fresh (not yet existing) run directory under pytest's tmp_path."""
  return str(tmp_path / "workdir")


@pytest.fixture
def make_workdir(tmp_path):
  """`make_workdir(name)` -> a fresh path under tmp_path, for tests needing several."""

  def make(name: str) -> str:
    path = tmp_path / name
    assert not path.exists(), f"workdir {path} already used in this test"
    return str(path)

  return make


# ---------------------------------------------------------------- MAE (tests/test_mae.py)

MAE_PIXEL_PATH = REPO_ROOT / "configs" / "mae_pixel.py"

# A short MAE run: configs/mae_pixel.py:quick (mu/1 on 8x8 digits, a 64-wide
# 2-deep decoder), shortened. Dotted keys, applied with `set_dotted`.
MAE_TINY_RUN = {**TINY_RUN, "eval_batch_size": 40}


@pytest.fixture(scope="session")
def mae_pixel():
  """The configs/mae_pixel.py module, imported by path."""
  return load_config_module(MAE_PIXEL_PATH)


@pytest.fixture
def mae_quick_config(mae_pixel):
  """`mae_quick_config(dotted_overrides)` -> a fresh mae_pixel:quick config
  (with MAE_TINY_RUN applied unless `tiny=False`)."""

  def make(overrides: dict | None = None, *, tiny: bool = True, arg: str = "quick"):
    config = mae_pixel.get_config(arg)
    if tiny:
      set_dotted(config, copy.deepcopy(MAE_TINY_RUN))
    return set_dotted(config, overrides or {})

  return make


# ---------------------------------------------------------------- shared test helpers


@pytest.fixture
def no_jit(monkeypatch):
  """Makes any `jax.jit` call fail the test: the check must come first."""

  def forbidden(*args, **kwargs):
    raise AssertionError("jax.jit was called before the bad input was rejected")

  monkeypatch.setattr(jax, "jit", forbidden)


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


def as_numpy_leaves(tree) -> list:
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(actual, desired, what: str):
  """Same structure and bitwise-equal leaves; names the first differing leaf."""
  assert jax.tree.structure(actual) == jax.tree.structure(desired), what
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(desired)]
  for path, a, d in zip(paths, as_numpy_leaves(actual), as_numpy_leaves(desired)):
    np.testing.assert_array_equal(a, d, err_msg=f"{what}{path}")


# ---------------------------------------------------------------- faults (test_faults*.py)


def damage_checkpoint(step_dir: str, how: str) -> None:
  """Damages one orbax step directory as a crash or a bad disk would:
  `truncate` its data files, delete its `metadata` (_METADATA) or its `ocdbt`
  process directory."""
  state = os.path.join(step_dir, "state")
  if how == "truncate":  # every data file (under a d/ directory) to half its size
    data = [os.path.join(root, name) for root, _, names in os.walk(state)
            for name in names if os.path.basename(root) == "d"]
    assert data, f"no data files under {state}"
    for path in data:
      os.truncate(path, os.path.getsize(path) // 2)
  elif how == "metadata":
    os.remove(os.path.join(state, "_METADATA"))
  elif how == "ocdbt":
    shutil.rmtree(os.path.join(state, "ocdbt.process_0"))
  else:
    raise ValueError(how)


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
