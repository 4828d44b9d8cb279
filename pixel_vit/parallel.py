"""Device mesh, logical-axis rules, and host <-> global arrays.

Parameters and activations are annotated with logical axis names (`embed`,
`mlp`, `heads`, `kv`, `vocab`, `layers`; `batch`, `length`). The config's
`sharding_rules` map each logical name to mesh axes (`data`, `fsdp`, `seq`,
`tensor`); a mesh axis is used at most once per array (the first rule that
still fits wins, as in flax's `logical_to_mesh_axes`). One code path serves a
single CPU and a pod: on one device every spec is simply replicated.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn_linen
import jax
from jax.experimental import mesh_utils
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "seq", "tensor")

LogicalRules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_config, device_count: int) -> tuple[int, ...]:
  """Resolves `-1` (the remaining devices) and checks the product."""
  unknown = [k for k in mesh_config.keys() if k not in MESH_AXES]
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; allowed: {MESH_AXES}.")
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive, "
                     "with at most one -1 (= the remaining devices).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if device_count % known:
      raise ValueError(f"config.mesh fixed sizes multiply to {known}, which does not "
                       f"divide the {device_count} devices.")
    sizes[sizes.index(-1)] = device_count // known
  if math.prod(sizes) != device_count:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} "
                     f"devices but {device_count} are available; set one axis to -1.")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A mesh with axes `data, fsdp, seq, tensor` (auto axis types: GSPMD)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  device_grid = mesh_utils.create_device_mesh(
      shape, devices=devices, allow_split_physical_axes=True)
  return Mesh(device_grid, MESH_AXES)


def batch_shards(mesh_config, device_count: int) -> int:
  """How many ways the batch dimension is split (data x fsdp)."""
  shape = dict(zip(MESH_AXES, mesh_shape(mesh_config, device_count)))
  return shape["data"] * shape["fsdp"]


def logical_to_spec(logical_axes: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
  return nn_linen.logical_to_mesh_axes(tuple(logical_axes), tuple(map(tuple, rules)))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules):
  """Mesh + rules in effect for tracing: `constrain` becomes a sharding constraint."""
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(tuple(map(tuple, rules))):
    yield


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `activate`."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  rules = flax_spmd.get_logical_axis_rules()
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def logical_axes_of(state: nnx.State) -> dict:
  """Pure dict of each parameter's logical axes (None entries = replicated)."""

  def axes(variable):
    names = variable.get_metadata().get("logical_axes")
    if names is None:
      names = (None,) * np.ndim(variable.get_value())
    return tuple(names)

  return nnx.to_pure_dict(jax.tree.map(
      axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: LogicalRules) -> dict:
  """Pure dict of NamedShardings for the parameters of `abstract_state`."""
  return jax.tree.map(lambda names: NamedSharding(mesh, logical_to_spec(names, rules)),
                      logical_axes_of(abstract_state),
                      is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def host_to_global(local_batch: dict, mesh: Mesh, rules: LogicalRules) -> dict:
  """Per-process numpy batch -> global jax arrays sharded along `batch`."""
  return {
      name: jax.make_array_from_process_local_data(
          batch_sharding(mesh, rules, np.ndim(value)), np.asarray(value))
      for name, value in local_batch.items()
  }
