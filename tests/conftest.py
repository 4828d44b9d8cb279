"""Shared test setup: 8 fake CPU devices, the network guard, and the fixtures
(the cls_pixel / mae_pixel configs, work directories, no_jit).

JAX must see 8 CPU devices for the whole session, so the option is set here,
at import, before any test module touches a JAX backend: conftest.py is
imported before the test modules are collected. Plain helpers and constants
live in support.py (`from support import ...`), which starts no backend.
"""

import copy
import importlib
import os
import socket

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (the environment above must be set first)
import pytest  # noqa: E402

from support import (  # noqa: E402
  CLS_PIXEL_PATH,
  MAE_PIXEL_PATH,
  MAE_TINY_RUN,
  NUM_DEVICES,
  TINY_RUN,
  load_config_module,
  set_dotted,
)

jax.config.update("jax_num_cpu_devices", NUM_DEVICES)


@pytest.fixture(scope="session", autouse=True)
def eight_cpu_devices():
  """Every test runs with the 8 fake CPU devices the conftest asked for."""
  devices = jax.devices()
  assert len(devices) == NUM_DEVICES and all(d.platform == "cpu" for d in devices), (
    f"expected {NUM_DEVICES} CPU devices, got {devices}: was a JAX backend "
    "initialised before tests/conftest.py set jax_num_cpu_devices?"
  )
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


# ---------------------------------------------------------------- jit guard


@pytest.fixture
def no_jit(monkeypatch):
  """Makes any `jax.jit` call fail the test: the check must come first.

  The modules a command imports late (command_line's error handling) are
  imported first: a `@jax.jit` decorator at import compiles nothing."""
  importlib.import_module("pixel_vit.trainers.divergence")

  def forbidden(*args, **kwargs):
    raise AssertionError("jax.jit was called before the bad input was rejected")

  monkeypatch.setattr(jax, "jit", forbidden)
