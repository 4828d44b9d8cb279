"""Device mesh, logical-axis rules, and host <-> global arrays.

Parameters and activations are annotated with logical axis names (`embed`,
`mlp`, `heads`, `kv`, `vocab`, `layers`; `batch`, `length`). The config's
`sharding_rules` map each logical name to mesh axes (`data`, `fsdp`, `seq`,
`tensor`); a mesh axis is used at most once per array (the first rule that
still fits wins, as in flax's `logical_to_mesh_axes`). One code path serves a
single CPU and a pod: on one device every spec is simply replicated. On a
multi-slice pod the device grid splits each axis into an ICI part (within a
slice) and a DCN part (across slices) by `config.mesh.dcn` (`device_grid`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn_linen
import jax
import numpy as np
from absl import logging
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixel_vit import hardware
from pixel_vit.config_checks import require

MESH_AXES = ("data", "fsdp", "seq", "tensor")

LogicalRules = Sequence[tuple[str, Any]]


# Keys of config.mesh that are not axis sizes: the split of each axis across
# granules (slices of a TPU pod, or processes), and what a granule is.
MESH_OPTIONS = ("dcn", "granule")
GRANULES = {"slice": "slices", "process": "processes"}  # name: plural


def _resolve_sizes(sizes: dict, count: int, key: str, what: str) -> tuple[int, ...]:
  """Axis sizes with at most one -1 (= what remains of `count`), checked to multiply to it."""
  unknown = [k for k in sizes if k not in MESH_AXES]
  if unknown:
    raise ValueError(f"{key} has unknown axes {unknown}; allowed: {MESH_AXES}.")
  values = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  if values.count(-1) > 1 or any(s == 0 or s < -1 for s in values):
    raise ValueError(
      f"{key} sizes {dict(zip(MESH_AXES, values))} must be positive, "
      f"with at most one -1 (= the remaining {what})."
    )
  known = math.prod(s for s in values if s != -1)
  if -1 in values:
    if count % known:
      raise ValueError(
        f"{key} fixed sizes multiply to {known}, which does not divide the {count} {what}."
      )
    values[values.index(-1)] = count // known
  if math.prod(values) != count:
    raise ValueError(
      f"{key} {dict(zip(MESH_AXES, values))} uses {math.prod(values)} "
      f"{what} but {count} are available; set one axis to -1."
    )
  return tuple(values)


def mesh_shape(mesh_config, device_count: int) -> tuple[int, ...]:
  """The mesh's axis sizes: resolves `-1` (the remaining devices), checks the product."""
  sizes = {k: v for k, v in mesh_config.items() if k not in MESH_OPTIONS}
  return _resolve_sizes(sizes, device_count, "config.mesh", "devices")


def granule_of(device, granule: str) -> int:
  """The slice (TPU multi-slice) or process a device belongs to; one slice when
  the platform has no slices."""
  if granule == "process":
    return device.process_index
  return getattr(device, "slice_index", 0) or 0


def dcn_shape(mesh_config, granule_count: int) -> tuple[int, ...]:
  """How many ways each axis is split ACROSS granules (the slow network)."""
  granule = mesh_config.get("granule", "slice")
  if granule not in GRANULES:
    raise ValueError(
      f"config.mesh.granule={granule!r} is not allowed; choose one of "
      f"{list(GRANULES)} ('process' for GPU hosts joined by a network)."
    )
  dcn = mesh_config.get("dcn") or {"data": -1}
  return _resolve_sizes(dict(dcn), granule_count, "config.mesh.dcn", GRANULES[granule])


def device_grid(mesh_config, devices) -> np.ndarray:
  """Devices arranged as the mesh (`data, fsdp, seq, tensor`).

  Within a granule (a TPU slice; or a process with config.mesh.granule =
  'process') devices talk over the fast interconnect (ICI, NVLink); granules
  talk over the data-centre network (DCN). With more than one granule, each
  axis of size N is split as dcn x N/dcn with `config.mesh.dcn` (default: all
  granules on `data`, the axis that communicates least), so collectives on
  the other axes stay inside a granule.
  """
  shape = mesh_shape(mesh_config, len(devices))
  granule = mesh_config.get("granule", "slice")
  granules = len({granule_of(d, granule) for d in devices})
  dcn = dcn_shape(mesh_config, granules)
  if granules == 1:
    return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  bad = [axis for axis, size, across in zip(MESH_AXES, shape, dcn) if size % across]
  if bad:
    raise ValueError(
      f"config.mesh {dict(zip(MESH_AXES, shape))} cannot be split over {granules} "
      f"{GRANULES[granule]} as config.mesh.dcn {dict(zip(MESH_AXES, dcn))}: axes {bad} are "
      "not divisible by their dcn size. Put the granules on axes they divide, e.g. "
      "--config.mesh.dcn.data=1 --config.mesh.dcn.fsdp=" + str(granules) + "."
    )
  ici = tuple(size // across for size, across in zip(shape, dcn))
  logging.info(
    "mesh %s over %d %s: within each (ICI) %s, across them (DCN) %s",
    dict(zip(MESH_AXES, shape)),
    granules,
    GRANULES[granule],
    dict(zip(MESH_AXES, ici)),
    dict(zip(MESH_AXES, dcn)),
  )
  return mesh_utils.create_hybrid_device_mesh(
    ici,
    dcn,
    devices=devices,
    process_is_granule=granule == "process",
    allow_split_physical_axes=True,
  )


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A mesh with axes `data, fsdp, seq, tensor` (auto axis types: GSPMD)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(device_grid(mesh_config, devices), MESH_AXES)


def batch_shards(mesh_config, device_count: int) -> int:
  """How many ways the batch dimension is split (data x fsdp)."""
  shape = dict(zip(MESH_AXES, mesh_shape(mesh_config, device_count)))
  return shape["data"] * shape["fsdp"]


def batch_shards_active() -> int:
  """How many ways the active mesh (inside `activate`) splits the logical
  `batch` axis; 1 outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  spec = logical_to_spec(("batch",), flax_spmd.get_logical_axis_rules())
  axes = spec[0] if len(spec) else None
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return int(np.prod([mesh.shape[axis] for axis in axes]))


def logical_to_spec(logical_axes: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
  return nn_linen.logical_to_mesh_axes(tuple(logical_axes), tuple(map(tuple, rules)))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules):
  """Mesh + rules in effect for tracing: `constrain` becomes a sharding
  constraint, and the mesh's devices are the target of every hardware
  choice (`hardware.active_target`), which may be compile-only TPU devices."""
  with (
    jax.set_mesh(mesh),
    flax_spmd.logical_axis_rules(tuple(map(tuple, rules))),
    hardware.targeting(mesh.devices.flat),
  ):
    yield


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted program of a task: its function, the abstract arguments it
  is compiled for (ShapeDtypeStructs carrying their shardings: the input
  shardings come from them), its output shardings and donated arguments.

  `jit` makes it callable on a mesh (calls may pass other batch sizes of
  the same layout; jax retraces); `trace` traces it on `args` for the active
  mesh's devices, which may be compile-only TPU devices (pixel_vit.compile).
  """

  name: str
  fn: Callable
  args: tuple
  out_shardings: Any
  donate_argnums: tuple[int, ...] = ()

  def _jitted(self):
    in_shardings = jax.tree.map(lambda a: a.sharding, self.args)
    return jax.jit(
      self.fn,
      in_shardings=in_shardings,
      out_shardings=self.out_shardings,
      donate_argnums=self.donate_argnums,
    )

  def jit(self, mesh: Mesh, rules: LogicalRules) -> Callable:
    """The program as a function, traced and run under `mesh` and `rules`."""
    jitted = self._jitted()

    def call(*args):
      with activate(mesh, rules):
        return jitted(*args)

    return call

  def trace(self) -> jax.stages.Traced:
    """Traced on `args` (call inside `activate`; `.lower()` then lowers it)."""
    return self._jitted().trace(*self.args)


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

  return nnx.to_pure_dict(jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: LogicalRules) -> dict:
  """Pure dict of NamedShardings for the parameters of `abstract_state`."""
  return jax.tree.map(
    lambda names: NamedSharding(mesh, logical_to_spec(names, rules)),
    logical_axes_of(abstract_state),
    is_leaf=lambda x: isinstance(x, tuple),
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def host_to_global(local_batch: dict, mesh: Mesh, rules: LogicalRules) -> dict:
  """Per-process numpy batch -> global jax arrays sharded along `batch`."""
  return {
    name: jax.make_array_from_process_local_data(
      batch_sharding(mesh, rules, np.ndim(value)), np.asarray(value)
    )
    for name, value in local_batch.items()
  }


# Logical axes of attention's q / k / v [batch, length, heads, head_dim] (as
# vit.MultiHeadAttention constrains them).
QKV_AXES = ("batch", "length", "heads", "kv")


def spec_entry_axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, 'seq' or ('data', 'fsdp')) as a tuple of names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _axes_size(mesh, names: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[name] for name in names)


def _spec_entry(names: tuple[str, ...]):
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def ring_layout(q_shape, mesh, rules):
  """(qkv spec, mask spec, ring axes, ring size) of attention's q / k / v
  [batch, length, heads, head_dim] under the active mesh and rules.

  The ring is the mesh axes that the logical `length` axis maps to (`seq`):
  ring attention splits the tokens over them, `auto` picks ring when they
  number more than one device, and `splash` runs over the batch and heads
  entries. The specs come from the logical rules; the batch and heads entries
  are dropped where their mesh axes do not divide the dimension (shard_map
  needs even blocks; GSPMD reshards to the replicated layout on the way in).
  """
  spec = tuple(logical_to_spec(QKV_AXES, rules))
  spec = spec + (None,) * (len(QKV_AXES) - len(spec))
  batch, heads = spec_entry_axes(spec[0]), spec_entry_axes(spec[2])
  ring = spec_entry_axes(spec[1])
  if q_shape[0] % _axes_size(mesh, batch):
    batch = ()
  if q_shape[2] % _axes_size(mesh, heads):
    heads = ()
  qkv_spec = PartitionSpec(
    _spec_entry(batch), _spec_entry(ring), _spec_entry(heads), _spec_entry(spec_entry_axes(spec[3]))
  )
  mask_spec = PartitionSpec(_spec_entry(batch), _spec_entry(ring))
  return qkv_spec, mask_spec, ring, _axes_size(mesh, ring)


def validate_batch_sizes(config, device_count: int, process_count: int) -> None:
  """`config.batch_size` and `eval_batch_size` split evenly over the mesh's
  batch shards and the processes."""
  shards = batch_shards(config.mesh, device_count)
  for key in ("batch_size", "eval_batch_size"):
    require(
      config[key] % shards == 0 and config[key] % process_count == 0,
      f"config.{key}={config[key]} must be divisible by the {shards} batch shards "
      f"of the mesh (data x fsdp over {device_count} devices) and by the "
      f"{process_count} processes.",
    )
