"""Mesh construction: axis sizes, and the DCN / ICI split across granules.

Multi-slice TPU devices carry `slice_index`; here stand-in devices with that
attribute (and `process_index`) are arranged by `parallel.device_grid`, the
function `make_mesh` builds its Mesh from. What matters: every collective on
an axis the DCN does not split stays inside one granule.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from pixel_vit import configuration, parallel


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  slice_index: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def pod(slices: int, per_slice: int, processes_per_slice: int = 1) -> list[FakeDevice]:
  per_process = per_slice // processes_per_slice
  return [
    FakeDevice(
      id=s * per_slice + i, slice_index=s, process_index=(s * per_slice + i) // per_process
    )
    for s in range(slices)
    for i in range(per_slice)
  ]


def mesh(**overrides) -> ml_collections.ConfigDict:
  config = configuration.mesh_config()
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  return config


def granules_along(grid: np.ndarray, attribute: str = "slice_index") -> np.ndarray:
  return np.vectorize(lambda d: getattr(d, attribute))(grid)


def test_default_config_has_dcn_and_one_granule_is_the_plain_mesh():
  config = configuration.mesh_config()
  assert config.dcn.data == -1 and config.granule == "slice"
  devices = jax.devices()
  grid = parallel.device_grid(config, devices)
  assert grid.shape == (len(devices), 1, 1, 1)
  assert [d.id for d in grid.flat] == [d.id for d in devices]


def test_two_slices_go_on_data_by_default():
  grid = parallel.device_grid(mesh(data=-1, fsdp=4), pod(2, 4))
  assert grid.shape == (2, 4, 1, 1)
  slices = granules_along(grid)
  # Each data row is one slice: FSDP's all-gathers stay on the slice's ICI.
  assert (slices == np.arange(2)[:, None, None, None]).all()


def test_dcn_on_fsdp_splits_that_axis_into_slice_blocks():
  grid = parallel.device_grid(mesh(data=1, fsdp=8, dcn=dict(data=1, fsdp=2)), pod(2, 4))
  slices = granules_along(grid)[0, :, 0, 0]
  assert slices.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_four_slices_over_data_and_fsdp():
  grid = parallel.device_grid(mesh(data=4, fsdp=2, tensor=2, dcn=dict(data=2, fsdp=2)), pod(4, 4))
  assert grid.shape == (4, 2, 1, 2)
  slices = granules_along(grid)
  # Tensor pairs (the most communication) never leave a slice.
  assert (slices[..., 0] == slices[..., 1]).all()
  # Every slice holds 4 devices: 2 data rows x 1 fsdp column x 2 tensor.
  assert sorted(np.unique(slices, return_counts=True)[1].tolist()) == [4, 4, 4, 4]
  assert len({d.id for d in grid.flat}) == 16


def test_process_granules_for_gpu_hosts():
  devices = pod(1, 8, processes_per_slice=2)  # no slices: 2 hosts x 4 GPUs
  flat = parallel.device_grid(mesh(data=1, fsdp=-1), devices)
  assert flat.shape == (1, 8, 1, 1)  # granule 'slice': one granule, plain mesh
  grid = parallel.device_grid(mesh(data=2, fsdp=4, granule="process"), devices)
  processes = granules_along(grid, "process_index")
  assert (processes == np.arange(2)[:, None, None, None]).all()


@pytest.mark.parametrize(
  "config,devices,message",
  [
    (
      mesh(data=1, fsdp=-1),
      pod(2, 4),
      r"config\.mesh .*cannot be split over 2 slices.*axes \['data'\].*"
      r"--config\.mesh\.dcn\.data=1 --config\.mesh\.dcn\.fsdp=2",
    ),
    (mesh(dcn=dict(data=3)), pod(2, 4), r"config\.mesh\.dcn .*uses 3 slices but 2"),
    (mesh(dcn=dict(data=-1, fsdp=-1)), pod(2, 4), r"config\.mesh\.dcn sizes .*at most one -1"),
    (mesh(granule="host"), pod(1, 8), r"config\.mesh\.granule='host' is not allowed"),
    (mesh(data=3), pod(1, 8), r"config\.mesh .*uses 3 devices but 8"),
  ],
)
def test_bad_splits_are_named(config, devices, message):
  with pytest.raises(ValueError, match=message):
    parallel.device_grid(config, devices)


def test_unknown_dcn_axis_is_named():
  config = mesh()
  config.dcn.pipeline = 2
  with pytest.raises(ValueError, match=r"config\.mesh\.dcn has unknown axes \['pipeline'\]"):
    parallel.device_grid(config, pod(2, 4))


def test_mesh_options_are_not_axes():
  assert parallel.mesh_shape(mesh(fsdp=2), 8) == (4, 2, 1, 1)
  assert parallel.batch_shards(mesh(fsdp=2, tensor=2), 8) == 4
