"""What a program is compiled for: the chips, the devices a trace targets, and
the choices made for them.

A choice that depends on the hardware (`attention='auto'`, `remat='auto'`,
the splash kernel compiled or interpreted, how Equalize counts a histogram)
reads the *target*: the devices of the mesh being traced for
(`parallel.activate` sets it), not the machine that traces. So a CPU
machine compiling for compile-only TPU devices (`pixel_vit.compile`) makes
the choices the pod will make. Outside any mesh the target is this
process's own devices.

- `CHIPS`: published figures of the TPU generations (HBM per chip, bf16
  peak, HBM bandwidth), for memory checks and estimates;
- `Target`: platform, device and process counts, and one device's memory;
- `tpu_devices(topology)`: compile-only TPU devices from libtpu, no TPU needed;
- `record_choice` / `recording_choices`: what an `auto` picked and why.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import re
import sys
import tempfile
from typing import Iterator, Sequence

import jax
from absl import logging

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip as JAX sees it (megacore chips are one device)."""

  name: str  # the topology prefix: "v5e", "h100"
  platform: str  # "tpu" or "gpu"
  device_kind: str  # what jax's Device.device_kind says: "TPU v5 lite"
  hbm_bytes: int  # per chip (= per device), as published
  usable_hbm_bytes: int  # what a program may use (the TPU compiler's limit)
  bf16_flops: float  # dense matmul peak, per second
  hbm_bytes_per_s: float
  megacore: bool = False  # two TensorCores presented as one device
  slice_prefix: str = ""  # the accelerator-type prefix gcloud uses: "v5litepod"
  cores_in_slice_name: bool = False  # v4-32 / v5p-32 count TensorCores, v5litepod-16 chips


# Published per-chip figures (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e), and
# the HBM the compiler lets a program use: the "available HBM" of its
# RESOURCE_EXHAUSTED message (libtpu 0.0.42: 30.75 / 15.75 / 95.74 / 31.25 GiB).
CHIPS: dict[str, Chip] = {
  "v4": Chip(
    "v4",
    "tpu",
    "TPU v4",
    32 * GIB,
    int(30.75 * GIB),
    275e12,
    1200e9,
    megacore=True,
    slice_prefix="v4",
    cores_in_slice_name=True,
  ),
  "v5e": Chip(
    "v5e", "tpu", "TPU v5 lite", 16 * GIB, int(15.75 * GIB), 197e12, 819e9, slice_prefix="v5litepod"
  ),
  "v5p": Chip(
    "v5p",
    "tpu",
    "TPU v5",
    95 * GIB,
    int(95.74 * GIB),
    459e12,
    2765e9,
    megacore=True,
    slice_prefix="v5p",
    cores_in_slice_name=True,
  ),
  "v6e": Chip(
    "v6e", "tpu", "TPU v6 lite", 32 * GIB, int(31.25 * GIB), 918e12, 1640e9, slice_prefix="v6e"
  ),
}
# GPUs (NVIDIA's published H100 SXM figures). The GPU compiler refuses nothing
# for memory; a program must fit what JAX's allocator takes by default, 75%
# of the device (XLA_PYTHON_CLIENT_MEM_FRACTION).
_H100_MEMORY = 84_942_979_072  # 80 GB of HBM3, as the device reports it
GPUS: dict[str, Chip] = {
  "h100": Chip(
    "h100", "gpu", "NVIDIA H100 80GB HBM3", _H100_MEMORY, int(0.75 * _H100_MEMORY), 989e12, 3350e9
  ),
}


def chip_of(device) -> Chip | None:
  """The CHIPS / GPUS entry of a device (None for a CPU or an unknown kind)."""
  return next(
    (chip for chip in (*CHIPS.values(), *GPUS.values()) if chip.device_kind == device.device_kind),
    None,
  )


def host_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device) -> int:
  """One device's memory: the allocator's limit where the device is attached
  (GPU / TPU), the chip table for a compile-only TPU device, and on a CPU the
  host's physical memory divided among its local CPU devices."""
  stats = None
  if device.platform != "cpu" and getattr(device, "process_index", 0) == jax.process_index():
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - compile-only devices have none
      stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  chip = chip_of(device)
  if chip is not None:
    return chip.usable_hbm_bytes
  if device.platform == "cpu":
    return host_memory_bytes() // max(1, jax.local_device_count("cpu"))
  raise ValueError(
    f"the memory of a {device.platform} device of kind "
    f"{device.device_kind!r} is unknown here (no allocator statistics)."
  )


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices a program is traced and compiled for."""

  platform: str  # "cpu", "gpu", "tpu"
  device_kind: str
  device_count: int
  process_count: int
  memory_bytes: int  # of one device

  @property
  def chip(self) -> Chip | None:
    return next(
      (c for c in (*CHIPS.values(), *GPUS.values()) if c.device_kind == self.device_kind), None
    )

  @classmethod
  def of(cls, devices: Sequence) -> "Target":
    devices = list(devices)
    first = devices[0]
    return cls(
      platform=first.platform,
      device_kind=first.device_kind,
      device_count=len(devices),
      process_count=len({d.process_index for d in devices}),
      memory_bytes=device_memory_bytes(first),
    )

  def describe(self) -> str:
    return (
      f"{self.device_count} {self.device_kind} device(s) ({self.platform}) over "
      f"{self.process_count} process(es), {self.memory_bytes / GIB:.2f} GiB each"
    )


_TARGET_DEVICES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
  "target_devices", default=None
)


@contextlib.contextmanager
def targeting(devices: Sequence) -> Iterator[None]:
  """Within: `active_target()` is `devices`' target (parallel.activate sets it
  around every trace and call: cheap, the target is worked out only when a
  trace asks for it)."""
  token = _TARGET_DEVICES.set(tuple(devices))
  try:
    yield
  finally:
    _TARGET_DEVICES.reset(token)


def active_target() -> Target:
  """The devices being traced for: the active mesh's, else this process's."""
  devices = _TARGET_DEVICES.get()
  return Target.of(devices if devices is not None else jax.local_devices())


# ---------------------------------------------------------------- choices


@dataclasses.dataclass(frozen=True)
class Choice:
  """What an `auto` setting ran, and why (for `pixel_vit.compile`'s report)."""

  setting: str  # "model.attention=auto"
  chose: str
  why: str


_CHOICES: contextvars.ContextVar[list | None] = contextvars.ContextVar("choices", default=None)


def record_choice(setting: str, chose: str, why: str) -> None:
  """Logs a choice made for the target; kept when `recording_choices` is active."""
  logging.info("%s runs %r: %s", setting, chose, why)
  recorded = _CHOICES.get()
  if recorded is not None and Choice(setting, chose, why) not in recorded:
    recorded.append(Choice(setting, chose, why))


@contextlib.contextmanager
def recording_choices() -> Iterator[list]:
  """Collects the distinct `record_choice`s made within (while tracing)."""
  token = _CHOICES.set([])
  try:
    yield _CHOICES.get()
  finally:
    _CHOICES.reset(token)


# ---------------------------------------------------------------- topologies


class TopologyError(ValueError):
  """A topology that cannot be described here (a bad name, no libtpu or CUDA plugin)."""


_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_SLICE = re.compile(r"^(v4|v5litepod|v5p|v6e)-(\d+)$")

# The slice shapes of each generation (chips), as Cloud TPU offers them.
_SHAPES_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_SHAPES_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8")
SHAPES = {"v4": _SHAPES_3D, "v5p": _SHAPES_3D, "v5e": _SHAPES_2D, "v6e": _SHAPES_2D}


def chips_in(shape: str) -> int:
  count = 1
  for size in shape.split("x"):
    count *= int(size)
  return count


def slice_name(topology: str) -> str:
  """'v5p:2x2x4' -> 'v5p-32' (gcloud's accelerator type; v4 and v5p count cores)."""
  chip, shape = _parse_topology(topology)
  chips = chips_in(shape)
  return f"{chip.slice_prefix}-{chips * (2 if chip.cores_in_slice_name else 1)}"


def topology_of_slice(accelerator_type: str) -> str:
  """'v5p-32' -> 'v5p:2x2x4', 'v5litepod-16' -> 'v5e:4x4' (the common shapes)."""
  match = _SLICE.match(accelerator_type)
  if not match:
    raise TopologyError(
      f"accelerator type {accelerator_type!r} is not one this tool maps to a topology; "
      "use v4-N, v5litepod-N, v5p-N or v6e-N (e.g. v5p-32), or pass --topology=v5p:2x2x4."
    )
  prefix, count = match.group(1), int(match.group(2))
  chip = next(c for c in CHIPS.values() if c.slice_prefix == prefix)
  chips = count // 2 if chip.cores_in_slice_name else count
  for shape in SHAPES[chip.name]:
    if chips_in(shape) == chips:
      return f"{chip.name}:{shape}"
  raise TopologyError(
    f"{accelerator_type} is {chips} chips, not one of the common "
    f"{chip.name} shapes {', '.join(SHAPES[chip.name])}; pass "
    "--topology=NAME:SHAPE."
  )


def _parse_topology(topology: str) -> tuple[Chip, str]:
  match = _TOPOLOGY.match(topology)
  if not match:
    raise TopologyError(
      f"--topology={topology!r} is not a TPU topology name; use GENERATION:SHAPE with "
      f"GENERATION one of {', '.join(CHIPS)} and SHAPE the chips per axis, e.g. v5e:4x4, "
      "v5p:2x2x4, v4:2x2x1, v6e:2x4, or an accelerator type such as v5p-32 or "
      "v5litepod-16."
    )
  chip = CHIPS[match.group(1)]
  shape = match.group(2)
  if len(shape.split("x")) != len(SHAPES[chip.name][0].split("x")):
    raise TopologyError(
      f"--topology={topology!r}: {chip.name} slices have "
      f"{len(SHAPES[chip.name][0].split('x'))} axes, e.g. "
      f"{chip.name}:{SHAPES[chip.name][2]}."
    )
  return chip, shape


def canonical_topology(name: str) -> str:
  """'v5p-32' or 'v5p:2x2x4' -> 'v5p:2x2x4'; 'h100:8' -> 'h100:1x8' (hosts x
  GPUs); checked (TopologyError otherwise)."""
  if _GPU_TOPOLOGY.match(name):
    gpu, hosts, per_host = _parse_gpu_topology(name)
    return f"{gpu.name}:{hosts}x{per_host}"
  topology = topology_of_slice(name) if _SLICE.match(name) else name
  chip, shape = _parse_topology(topology)
  return f"{chip.name}:{shape}"


def compile_only_devices(topology: str, num_slices: int = 1) -> list:
  """`tpu_devices` or `gpu_devices`, by the topology's name."""
  if _GPU_TOPOLOGY.match(topology):
    return gpu_devices(topology, num_slices)
  return tpu_devices(topology, num_slices)


def describe_topology(topology: str, num_slices: int = 1) -> str:
  """'v5p-16' for 'v5p:2x2x2'; '8x H100' for 'h100:1x8'; 'x N slices' appended."""
  if _GPU_TOPOLOGY.match(topology):
    gpu, hosts, per_host = _parse_gpu_topology(topology)
    name = f"{hosts * per_host}x {gpu.name.upper()}" + (f" on {hosts} hosts" if hosts > 1 else "")
  else:
    name = slice_name(topology)
  return name + (f" x {num_slices} slices" if num_slices > 1 else "")


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only TPU devices of `topology` ('v5e:4x4', or an accelerator
  type: 'v5litepod-16'), `num_slices` slices.

  libtpu describes the slice; no TPU is needed and nothing runs on them.
  Megacore chips (v4, v5p) are one device each, as on a real pod; hosts
  hold 2x2 chips. libtpu's start-up chatter on a machine without TPU
  metadata (several lines of warnings on stderr) is dropped.
  """
  chip, shape = _parse_topology(canonical_topology(topology))
  if num_slices < 1:
    raise TopologyError(f"--num_slices={num_slices} must be >= 1.")
  from jax.experimental import topologies

  dims = tuple(int(s) for s in shape.split("x"))
  host_bounds = (min(2, dims[0]), min(2, dims[1]), 1)
  options = dict(chips_per_host_bounds=host_bounds, num_slices=num_slices)
  if chip.megacore:
    options["chip_config_name"] = "megacore"
  name = f"{chip.name}:{shape}"
  # Compile-only use holds no TPU: without this, libtpu's lockfile refuses a
  # second process (a second compile, or a training run on this TPU VM).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  with _stderr_to_file():
    try:
      description = topologies.get_topology_desc(topology_name=name, platform="tpu", **options)
    except Exception as e:  # noqa: BLE001 - RuntimeError, libtpu's JaxRuntimeError
      if "TPU support not installed" in str(e):
        raise TopologyError(
          "compiling for TPU needs libtpu, which is not installed: pip install -e "
          "'.[tpu]' (no TPU needed: it holds the TPU compiler)."
        ) from None
      raise TopologyError(
        f"libtpu does not know the topology {topology} "
        f"({num_slices} slice(s)): {_first_line(e)}. Common shapes for "
        f"{chip.name}: {', '.join(SHAPES[chip.name])}."
      ) from None
  return list(description.devices)


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


@contextlib.contextmanager
def _stderr_to_file():
  """Sends the process's stderr (C++ logging included) to a discarded file."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


# ---------------------------------------------------------------- GPU targets

_GPU_TOPOLOGY = re.compile(r"^(h100):(?:(\d+)x)?(\d+)$")

# What XLA's GPU compiler needs to know of the device it compiles for (a
# GpuTargetConfigProto), from NVIDIA's published H100 SXM5 figures. jax's CUDA
# plugin compiles for it without a GPU (pip install 'jax[cuda12]').
_GPU_DESCRIPTIONS = {
  "h100": dict(
    gpu_device_info=dict(
      threads_per_block_limit=1024,
      threads_per_warp=32,
      shared_memory_per_block=48 * 1024,
      shared_memory_per_block_optin=227 * 1024,
      shared_memory_per_core=228 * 1024,
      threads_per_core_limit=2048,
      core_count=132,
      fpus_per_core=128,
      block_dim_limit_x=2**31 - 1,
      block_dim_limit_y=65535,
      block_dim_limit_z=65535,
      memory_bandwidth=3_352_320_000_000,
      l2_cache_size=50 * 1024 * 1024,
      clock_rate_ghz=1.98,
      device_memory_size=_H100_MEMORY,
      cuda_compute_capability=dict(major=9, feature_extension="ACCELERATED_FEATURES"),
      registers_per_core_limit=65536,
      registers_per_block_limit=65536,
      thread_dim_limit_x=1024,
      thread_dim_limit_y=1024,
      thread_dim_limit_z=64,
      device_vendor="NVIDIA Corporation",
      name="NVIDIA H100 80GB HBM3",
      runtime_version="12.9.0",
      compile_time_toolkit_version="12.9.0",
      dnn_version="9.10.0",
    ),
    platform_name="CUDA",
    dnn_version_info=dict(major=9, minor=10, patch=0),
    device_description_str="NVIDIA H100 80GB HBM3",
  ),
}


_ENUM_FIELDS = ("feature_extension",)  # written unquoted


def _text_proto(fields: dict, indent: str = "") -> str:
  """A protobuf text-format message from a dict (nested dicts are messages)."""
  lines = []
  for key, value in fields.items():
    if isinstance(value, dict):
      lines += [f"{indent}{key} {{", _text_proto(value, indent + "  "), f"{indent}}}"]
    elif isinstance(value, str) and key not in _ENUM_FIELDS:
      lines.append(f'{indent}{key}: "{value}"')
    else:
      lines.append(f"{indent}{key}: {value}")
  return "\n".join(lines)


def _parse_gpu_topology(topology: str) -> tuple[Chip, int, int]:
  match = _GPU_TOPOLOGY.match(topology)
  if not match:
    raise TopologyError(
      f"--topology={topology!r} is not a GPU topology; use h100:N (N GPUs "
      "on one host) or h100:HxN (H hosts of N GPUs)."
    )
  hosts, per_host = int(match.group(2) or 1), int(match.group(3))
  if hosts < 1 or not 1 <= per_host <= 8:
    raise TopologyError(
      f"--topology={topology!r}: a host has 1 to 8 GPUs, and at least one host is needed."
    )
  return GPUS[match.group(1)], hosts, per_host


def gpu_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only GPU devices ('h100:8', 'h100:2x8'), from jax's CUDA plugin
  and a description of the GPU; no GPU needed. Call before any JAX backend
  starts, with the platforms limited to the CPU (pixel_vit.compile does)."""
  gpu, hosts, per_host = _parse_gpu_topology(topology)
  from jax.experimental import topologies

  with _stderr_to_file():
    try:
      description = topologies.get_topology_desc(
        platform="cuda",
        topology_name=gpu.name,
        topology=f"{num_slices}x{hosts}x{per_host}",
        target_config=_text_proto(_GPU_DESCRIPTIONS[gpu.name]),
      )
    except NotImplementedError:
      raise TopologyError(
        "compiling for GPUs needs jax's CUDA plugin, which is not installed: pip install "
        "'jax[cuda12]' (several GB of CUDA libraries; no GPU needed)."
      ) from None
    except Exception as e:  # noqa: BLE001 - the plugin's JaxRuntimeError
      raise TopologyError(
        f"the CUDA plugin could not describe {topology}: {_first_line(e)}"
      ) from None
  return list(description.devices)
