"""Joining a multi-process JAX run (`jax.distributed`) from the command line.

`pixel_vit.main` and `pixel_vit.sample` call `initialize_from_flags()` first
thing, before any JAX backend use, driven by these flags:

  (none)                    one process (the default): nothing to initialise.
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                            explicit: every process gets the same address and
                            count and its own id (0..N-1); process 0 serves
                            the coordinator on PORT.
  --distributed=auto        `jax.distributed.initialize()` with no arguments:
                            JAX reads the cluster from its environment.

What `--distributed=auto` detects (JAX 0.10, `jax._src.clusters`), first
match wins:
  * Cloud TPU VM pods: the TPU VM's metadata server (`agent-worker-number`,
    `worker-network-endpoints`); on GKE, `TPU_WORKER_ID` with
    `TPU_WORKER_HOSTNAMES` (or `TPU_PROCESS_ADDRESSES`).
  * SLURM (inside `srun`): `SLURM_JOB_ID`, `SLURM_STEP_NODELIST` (the first
    node is the coordinator), `SLURM_NTASKS` (process count), `SLURM_PROCID`
    (process id), `SLURM_LOCALID` (which local GPU). The port is derived
    from the job id unless `JAX_COORDINATOR_PORT` is set.
  * Open MPI (`mpirun`): `OMPI_MCA_orte_hnp_uri`, `OMPI_COMM_WORLD_SIZE`,
    `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_LOCAL_RANK`.
Explicit flags given together with `--distributed=auto` override what is
detected (JAX's own rule).

A coordinator on a loopback address (127.x, localhost) also *binds* only
there, so a local multi-process run opens no port to the network; otherwise
JAX's default applies (all interfaces, the coordinator's port).

Collectives between processes on CPU go through gloo, JAX's default CPU
collectives implementation; GPUs use NCCL and TPUs their interconnect.
Nothing here changes JAX's global configuration at import time.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from absl import flags, logging

MODES = ("off", "auto")

_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "off",
  MODES,
  "off: one process unless --coordinator_address/--num_processes/--process_id are given; "
  "auto: jax.distributed.initialize() detects the cluster (Cloud TPU pod, SLURM, Open MPI).",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
  "coordinator_address",
  None,
  "HOST:PORT of process 0's coordinator service, the same on "
  "every process (explicit multi-process launch).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "How many processes take part (explicit multi-process launch)."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's id in 0..num_processes-1 (explicit multi-process launch)."
)
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
  "initialization_timeout",
  300,
  "Seconds to wait for every process to join the coordinator before giving up.",
)

_EXPLICIT_FLAGS = ("coordinator_address", "num_processes", "process_id")
_EXAMPLE = "--coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0"


@dataclasses.dataclass(frozen=True)
class Setup:
  """What to pass to `jax.distributed.initialize` (None = let JAX detect it)."""

  mode: str  # "single" (no initialize), "explicit" or "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  coordinator_bind_address: str | None = None
  initialization_timeout: int = 300

  @property
  def multi_process(self) -> bool:
    return self.mode != "single"


def resolve(
  *,
  distributed: str = "off",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  initialization_timeout: int = 300,
) -> Setup:
  """Checks the flags' values and decides how to initialise.

  Raises ValueError naming the problem and the fix; touches no JAX backend,
  so a bad launch fails before anything starts.
  """
  if distributed not in MODES:
    raise ValueError(f"--distributed={distributed!r} is not a mode; choose one of {list(MODES)}.")
  given = {
    name: value
    for name, value in (
      ("coordinator_address", coordinator_address),
      ("num_processes", num_processes),
      ("process_id", process_id),
    )
    if value is not None
  }
  if initialization_timeout is None or initialization_timeout < 1:
    raise ValueError(f"--initialization_timeout={initialization_timeout} must be >= 1 second.")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1.")
  if process_id is not None and process_id < 0:
    raise ValueError(f"--process_id={process_id} must be >= 0 (ids run 0..num_processes-1).")
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise ValueError(
      f"--process_id={process_id} is out of range for --num_processes="
      f"{num_processes}; ids run 0..{num_processes - 1}."
    )
  if coordinator_address is not None:
    _check_address(coordinator_address)
  bind = _loopback_bind_address(coordinator_address)

  if distributed == "auto":
    return Setup(
      "auto", coordinator_address, num_processes, process_id, bind, initialization_timeout
    )
  if not given:
    return Setup("single", initialization_timeout=initialization_timeout)
  missing = [name for name in _EXPLICIT_FLAGS if name not in given]
  if missing:
    given_text = " ".join(f"--{name}={value}" for name, value in given.items())
    raise ValueError(
      f"{given_text} was given without {' and '.join('--' + m for m in missing)}: an explicit "
      f"multi-process launch needs all three (e.g. {_EXAMPLE}, the same address and count on "
      "every process), or --distributed=auto under SLURM / Open MPI / a Cloud TPU pod."
    )
  return Setup(
    "explicit", coordinator_address, num_processes, process_id, bind, initialization_timeout
  )


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(
      f"--coordinator_address={address!r} must be HOST:PORT with a port in "
      f"1..65535, e.g. 127.0.0.1:12345 (local) or the first host's address."
    )


def _loopback_bind_address(address: str | None) -> str | None:
  """The coordinator address itself when it is a loopback one, else None
  (JAX's default: every interface)."""
  if address is None:
    return None
  host = address.rpartition(":")[0].strip("[]")
  if host == "localhost":
    return address
  try:
    return address if ipaddress.ip_address(host).is_loopback else None
  except ValueError:  # a host name: the cluster's own address, JAX's default binding
    return None


def initialize(setup: Setup) -> None:
  """Joins the multi-process run `setup` describes (a no-op for one process).

  Must run before anything initialises a JAX backend (jax.devices(), any
  computation): JAX fixes the device set at that moment.
  """
  if not setup.multi_process:
    return
  import jax  # here, not at import: importing this module must not touch JAX

  try:
    jax.distributed.initialize(
      coordinator_address=setup.coordinator_address,
      num_processes=setup.num_processes,
      process_id=setup.process_id,
      coordinator_bind_address=setup.coordinator_bind_address,
      initialization_timeout=setup.initialization_timeout,
    )
  except ValueError as e:
    if setup.mode != "auto":
      raise
    # JAX found no cluster and reports the first argument it could not fill.
    raise ValueError(
      f"--distributed=auto found no cluster to join ({e}): run under srun (SLURM), mpirun "
      "(Open MPI) or on every worker of a Cloud TPU pod, or pass "
      f"{_EXAMPLE} explicitly."
    ) from e
  except RuntimeError as e:
    if "must be called before" in str(e):
      raise RuntimeError(
        f"{e} pixel_vit.distributed.initialize must run first: a JAX backend was already "
        "in use in this process."
      ) from e
    raise
  logging.info(
    "process %d of %d joined via %s: %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    setup.mode,
    jax.local_device_count(),
    jax.device_count(),
  )


def setup_from_flags() -> Setup:
  """The flags above, checked (ValueError names the flag and the fix)."""
  return resolve(
    distributed=_DISTRIBUTED.value,
    coordinator_address=_COORDINATOR_ADDRESS.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
    initialization_timeout=_INITIALIZATION_TIMEOUT.value,
  )


def initialize_from_flags() -> Setup:
  """`resolve` + `initialize` for a command's parsed flags; returns the setup."""
  setup = setup_from_flags()
  initialize(setup)
  return setup
