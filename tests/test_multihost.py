"""Multi-process training with `jax.distributed`: the command-line flags, and
a real run of 2 processes x 2 CPU devices on 127.0.0.1 compared with one
process.

What "the same run" means across process counts. Each process reads its own
contiguous shard of the data and draws its batches from a permutation of
that shard (`pipeline.train_batches`: `default_rng([seed, epoch,
process_index])`), so the global batch of a 2-process run is
[process 0's 8 examples, process 1's 8 examples], which is *not* the batch a
1-process run of the same config draws (a permutation of the whole split).
Launched with the same flags, 2x2 and 1x4 therefore train on different data
and end with different parameters; `test_process_count_changes_the_global_batch`
pins that down. The comparison below feeds a 1-process x 4-device run the
exact global batches the 2 processes built (their two shards' batches,
concatenated in process order) and requires the same losses and parameters
to float32 reduction-order rounding.

At the end: SIGTERM / SIGINT sent to one process of a 2-process run stops
both at the same step with a checkpoint, and the rerun resumes (issue 11).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from pixel_vit import checkpoint as checkpoint_lib
from pixel_vit import distributed, parallel
from pixel_vit.data import pipeline, sources
from pixel_vit.trainers import classification, loop
from pixel_vit.trainers import state as state_lib
from support import (
  REPO_ROOT,
  as_numpy_leaves,
  logged_train_steps,
  read_metrics,
  set_dotted,
  train_losses,
)

# ---------------------------------------------------------------- the flags


def test_single_process_by_default():
  setup = distributed.resolve()
  assert setup.mode == "single" and not setup.multi_process
  distributed.initialize(setup)  # a no-op: this process's backend is already up


def test_explicit_flags_bind_the_coordinator_to_loopback_only():
  setup = distributed.resolve(coordinator_address="127.0.0.1:4321", num_processes=2, process_id=1)
  assert (setup.mode, setup.num_processes, setup.process_id) == ("explicit", 2, 1)
  assert setup.coordinator_bind_address == "127.0.0.1:4321"
  # A cluster address keeps JAX's default binding (every interface).
  assert (
    distributed.resolve(
      coordinator_address="node001:4321", num_processes=2, process_id=0
    ).coordinator_bind_address
    is None
  )


def test_auto_passes_only_what_was_given():
  setup = distributed.resolve(distributed="auto")
  assert setup.mode == "auto" and setup.multi_process
  assert (setup.coordinator_address, setup.num_processes, setup.process_id) == (None,) * 3


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (
      dict(process_id=1),
      r"--process_id=1 was given without --coordinator_address and "
      r"--num_processes: an explicit multi-process launch needs all three",
    ),
    (
      dict(coordinator_address="127.0.0.1:1234", num_processes=2),
      r"without --process_id.*--distributed=auto under SLURM",
    ),
    (
      dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
      r"--process_id=2 is out of range for --num_processes=2; ids run 0\.\.1",
    ),
    (
      dict(coordinator_address="127.0.0.1:1234", num_processes=0, process_id=0),
      r"--num_processes=0 must be >= 1",
    ),
    (
      dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=-1),
      r"--process_id=-1 must be >= 0",
    ),
    (
      dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0),
      r"--coordinator_address='127.0.0.1' must be HOST:PORT",
    ),
    (
      dict(coordinator_address="127.0.0.1:99999", num_processes=2, process_id=0),
      r"port in 1\.\.65535",
    ),
    (
      dict(distributed="mpi"),
      r"--distributed='mpi' is not a mode; choose one of \['off', 'auto'\]",
    ),
    (dict(initialization_timeout=0), r"--initialization_timeout=0 must be >= 1"),
  ],
  ids=[
    "id_alone",
    "no_id",
    "id_out_of_range",
    "zero_processes",
    "negative_id",
    "no_port",
    "bad_port",
    "bad_mode",
    "bad_timeout",
  ],
)
def test_bad_flags_are_rejected_by_name(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve(**kwargs)


def _without_cluster_env() -> dict:
  """This environment minus anything JAX's cluster detection reads."""
  prefixes = ("SLURM_", "OMPI_", "PMI_", "TPU_", "KUBERNETES_", "JAX_COORDINATOR")
  env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
  return {**env, "JAX_PLATFORMS": "cpu"}


@pytest.mark.slow
@pytest.mark.parametrize(
  "command, flags, expected",
  [
    (
      "pixel_vit.main",
      ["--process_id=1"],
      "error: --process_id=1 was given without --coordinator_address and --num_processes",
    ),
    (
      "pixel_vit.main",
      ["--distributed=auto"],
      "error: --distributed=auto found no cluster to join",
    ),
    (
      "pixel_vit.sample",
      ["--coordinator_address=127.0.0.1:1234", "--num_processes=2"],
      "error: --coordinator_address=127.0.0.1:1234 --num_processes=2 was given without "
      "--process_id",
    ),
  ],
  ids=["main_process_id_alone", "main_auto_outside_a_cluster", "sample_no_process_id"],
)
def test_commands_reject_bad_distributed_flags_before_starting(tmp_path, command, flags, expected):
  workdir = tmp_path / "run"
  config = (
    "configs/cls_pixel.py:quick" if command.endswith("main") else "configs/dit_pixel.py:quick"
  )
  proc = subprocess.run(
    [sys.executable, "-m", command, f"--config={config}", f"--workdir={workdir}", *flags],
    cwd=REPO_ROOT,
    env=_without_cluster_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1
  assert expected in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()  # failed before the trainer wrote anything


# ---------------------------------------------------------------- shared storage


def test_checkpoint_directory_keeps_urls_and_absolutises_local_paths(tmp_path, monkeypatch):
  """A pod's workdir is a bucket every worker writes its shards to."""
  assert (
    checkpoint_lib.checkpoint_directory("gs://bucket/runs/s1") == "gs://bucket/runs/s1/checkpoints"
  )
  monkeypatch.chdir(tmp_path)
  assert checkpoint_lib.checkpoint_directory("run") == str(tmp_path / "run" / "checkpoints")


# ---------------------------------------------------------------- 2 processes x 2 devices

# cls_pixel:quick (mu/1 on 8x8 digits), 4 steps of a global batch of 16 with
# the parameters FSDP-sharded over all 4 devices, so each process holds and
# checkpoints different pieces of every (embed-sharded) array.
MULTIHOST_RUN = {
  "total_steps": 4,
  "batch_size": 16,
  "eval_batch_size": 360,
  "eval_every": 4,
  "checkpoint_every": 4,
  "log_every": 2,
  "optimizer.warmup_steps": 2,
  "mesh.data": 1,
  "mesh.fsdp": 4,
}
# The 2-process run treats each process as a DCN granule (as GPU hosts would
# be) and splits FSDP across them: 2 x 2. Same device order as the flat
# 1-process fsdp=4 mesh it is compared with.
DCN_SPLIT = {"mesh.granule": "process", "mesh.dcn.data": 1, "mesh.dcn.fsdp": 2}
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 240


def gloo_unavailable_reason() -> str | None:
  if jax.config.jax_cpu_collectives_implementation != "gloo":
    return (
      f"jax_cpu_collectives_implementation="
      f"{jax.config.jax_cpu_collectives_implementation!r}: CPU collectives across "
      "processes need gloo"
    )
  try:
    from jax._src.lib import _jax  # the only place jaxlib says whether gloo was built in
  except ImportError:
    return None
  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    return "this jaxlib has no gloo CPU collectives"
  return None


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tail(path, chars: int = 4000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-chars:]


def run_two_processes(root, workdir: str, overrides: list[str]) -> list[str]:
  """`python -m pixel_vit.main` on the quick config as 2 processes x 2 CPU
  devices with `overrides`; fails the test unless both exit 0; their logs."""
  reason = gloo_unavailable_reason()
  if reason:
    pytest.skip(reason)
  address = f"127.0.0.1:{free_port()}"
  env = {**_without_cluster_env(), "JAX_NUM_CPU_DEVICES": str(DEVICES_PER_PROCESS)}
  logs, procs, handles = [], [], []
  try:
    for process_id in range(NUM_PROCESSES):
      log = str(root / f"process_{process_id}.log")
      handle = open(log, "w")
      handles.append(handle)
      logs.append(log)
      procs.append(
        subprocess.Popen(
          [
            sys.executable,
            "-m",
            "pixel_vit.main",
            "--config=configs/cls_pixel.py:quick",
            f"--workdir={workdir}",
            *overrides,
            f"--coordinator_address={address}",
            f"--num_processes={NUM_PROCESSES}",
            f"--process_id={process_id}",
            "--initialization_timeout=60",
          ],
          cwd=REPO_ROOT,
          env=env,
          stdout=handle,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )  # its own process group: killed whole below
    deadline = time.monotonic() + TIMEOUT_S
    # Poll all: when one process dies the other blocks in a collective, so
    # waiting on them in turn could sit out JAX's heartbeat timeout.
    while any(p.poll() is None for p in procs):
      failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.5)
    outcome = "; ".join(f"process {i}: exit {p.poll()}" for i, p in enumerate(procs))
    if any(p.poll() != 0 for p in procs):
      tails = "\n".join(f"--- process {i} log tail:\n{tail(log)}" for i, log in enumerate(logs))
      pytest.fail(f"2-process run failed or passed its {TIMEOUT_S} s limit ({outcome})\n{tails}")
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
    for handle in handles:
      handle.close()
  return logs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Trains MULTIHOST_RUN with 2 processes x 2 CPU devices; returns (workdir, logs)."""
  root = tmp_path_factory.mktemp("multihost")
  workdir = str(root / "workdir")
  overrides = [f"--config.{key}={value}" for key, value in {**MULTIHOST_RUN, **DCN_SPLIT}.items()]
  return workdir, run_two_processes(root, workdir, overrides)


def multihost_config(cls_pixel, **mesh):
  config = set_dotted(cls_pixel.get_config("quick"), dict(MULTIHOST_RUN))
  return set_dotted(config, {f"mesh.{axis}": size for axis, size in mesh.items()})


def two_process_global_batches(config, steps: int) -> list[dict]:
  """The global batches of a 2-process run: each process's batch from its own
  shard, concatenated in process order (process 0 holds the first devices)."""
  source = sources.parse_source(config.data.source)
  streams = [
    pipeline.train_batches(
      source.load(
        config.data.train_split,
        process_index=p,
        process_count=NUM_PROCESSES,
        image_size=config.data.get("image_size"),
      ),
      local_batch_size=config.batch_size // NUM_PROCESSES,
      seed=config.seed,
    )
    for p in range(NUM_PROCESSES)
  ]
  batches = []
  for _ in range(steps):
    parts = [next(stream) for stream in streams]
    batches.append({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
  return batches


def train_on(config, devices, global_batches):
  """The trainer's own plan, state and train step on a 1-process mesh over
  `devices`, fed `global_batches`; returns (state, losses, described)."""
  plan = loop.plan(config, classification.make_model_fn)
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  rules = config.sharding_rules
  described, create_state = state_lib.sharded_state(
    plan.make_model,
    plan.tx,
    mesh=mesh,
    rules=rules,
    seed=config.seed,
    ema=config.optimizer.ema_decay > 0,
    shapes=plan.shapes,
  )
  batch_shardings = {
    name: parallel.batch_sharding(mesh, rules, ndim)
    for name, ndim in (("images", 4), ("labels", 1))
  }
  state, losses = create_state(), []
  with parallel.activate(mesh, rules):
    train_step = jax.jit(
      classification.make_train_step(
        config, described.graphdef, plan.tx, plan.schedule, plan.train_split.num_classes
      ),
      in_shardings=(described.shardings, batch_shardings),
      out_shardings=(described.shardings, parallel.replicated(mesh)),
    )
    for batch in global_batches:
      state, metrics = train_step(state, parallel.host_to_global(batch, mesh, rules))
      losses.append(float(metrics["train/loss"]))
  return state, losses, described


def assert_close(actual, desired, what: str):
  """float32 equality up to reduction order: gradients are summed across
  processes by gloo in another order than inside one process."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(desired)]
  assert jax.tree.structure(actual) == jax.tree.structure(desired), what
  for path, a, d in zip(paths, as_numpy_leaves(actual), as_numpy_leaves(desired)):
    np.testing.assert_allclose(a, d, rtol=1e-5, atol=1e-6, err_msg=f"{what}{path}")


def test_process_count_changes_the_global_batch(cls_pixel):
  """Why the comparison needs the 2 processes' batches: a 1-process run of the
  same config draws other examples (see the module docstring)."""
  config = multihost_config(cls_pixel)
  split = sources.parse_source(config.data.source).load(config.data.train_split)
  one_process = next(
    pipeline.train_batches(split, local_batch_size=config.batch_size, seed=config.seed)
  )
  two_processes = two_process_global_batches(config, steps=1)[0]
  assert one_process["images"].shape == two_processes["images"].shape
  assert not np.array_equal(one_process["images"], two_processes["images"])


@pytest.fixture(scope="module")
def one_process_reference(cls_pixel):
  """1 process x 4 devices on the 2 processes' global batches:
  (config, state, losses, described)."""
  config = multihost_config(cls_pixel)
  state, losses, described = train_on(
    config, jax.devices()[:4], two_process_global_batches(config, config.total_steps)
  )
  return config, state, losses, described


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_like_one_on_the_same_global_batches(
  two_process_run, one_process_reference
):
  workdir, logs = two_process_run
  for process_id, log in enumerate(logs):
    assert f"process {process_id} of 2 joined via explicit: 2 local / 4 global devices" in tail(
      log, 10**6
    ), tail(log)
    assert (
      "over 2 processes: within each (ICI) {'data': 1, 'fsdp': 2, 'seq': 1, 'tensor': 1}"
      in tail(log, 10**6)
    ), tail(log)
  config, state, losses, described = one_process_reference
  steps = config.total_steps

  # Process 0 alone wrote the metrics: each step's record once.
  logged = train_losses(workdir)
  assert sorted(logged) == [2, 4]
  np.testing.assert_allclose(
    [logged[2], logged[4]], [np.mean(losses[:2]), np.mean(losses[2:])], rtol=1e-5
  )
  assert losses[2] != losses[0]  # step 3 is the first to depend on earlier updates
  evals = [r for r in read_metrics(workdir) if "eval/count" in r]
  assert [r["step"] for r in evals] == [4]
  assert evals[0]["eval/count"] == 360  # each held-out digit once over both processes

  checkpointer = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=10)
  assert checkpointer.latest_step() == steps
  restored = checkpointer.restore(described.abstract, checkpointer.read_identity(steps))
  checkpointer.close()
  assert int(jax.device_get(restored.step)) == steps
  np.testing.assert_array_equal(jax.device_get(restored.rng), jax.device_get(state.rng))
  assert_close(restored.params, state.params, "params")
  assert_close(restored.opt_state, state.opt_state, "opt_state")

  # The check can fail: training moved the parameters far beyond the tolerance.
  initial = nnx.to_pure_dict(
    nnx.split(classification.make_model_fn(config, loop.load_splits(config)[0])())[1]
  )
  moved = max(
    float(np.abs(a - b).max())
    for a, b in zip(as_numpy_leaves(state.params), as_numpy_leaves(initial))
  )
  assert moved > 1e-4, moved


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
  "devices, mesh",
  [
    (1, dict(data=1, fsdp=1)),
    (3, dict(data=3, fsdp=1)),
  ],
  ids=["1_device", "3_devices"],
)
def test_two_process_checkpoint_restores_on_other_device_counts(
  two_process_run, one_process_reference, cls_pixel, devices, mesh
):
  """Written by 2 processes x 2 devices (FSDP over 4), read back by one
  process on another mesh: orbax reshards onto the abstract state's shardings."""
  workdir, _ = two_process_run
  config = multihost_config(cls_pixel, **mesh)
  plan = loop.plan(config, classification.make_model_fn)
  target = parallel.make_mesh(config.mesh, devices=jax.devices()[:devices])
  described, _ = state_lib.sharded_state(
    plan.make_model,
    plan.tx,
    mesh=target,
    rules=config.sharding_rules,
    seed=config.seed,
    ema=False,
    shapes=plan.shapes,
  )
  checkpointer = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=10)
  restored = checkpointer.restore(
    described.abstract, checkpointer.read_identity(checkpointer.latest_step())
  )
  checkpointer.close()
  assert all(len(x.sharding.device_set) == devices for x in jax.tree.leaves(restored))
  assert_close(restored.params, one_process_reference[1].params, "params")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trainer_resumes_the_two_process_checkpoint_on_8_devices(
  two_process_run, one_process_reference, cls_pixel, tmp_path
):
  """`loop.start` (what every trainer calls) in this 1-process, 8-device
  session, with FSDP 4 x tensor 2: the state it resumes is the 2 processes'."""
  source_workdir, _ = two_process_run
  workdir = str(tmp_path / "resume")
  shutil.copytree(os.path.join(source_workdir, "checkpoints"), os.path.join(workdir, "checkpoints"))
  config = multihost_config(cls_pixel, fsdp=4, tensor=2)
  assert jax.device_count() == 8
  plan = loop.plan(config, classification.make_model_fn)
  reader = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=10)
  # The identity the trainer derives from the config is the one the 2 processes wrote.
  assert reader.read_identity(reader.latest_step()) == checkpoint_lib.RunIdentity.of_run(
    config, plan.train_split
  )
  reader.close()
  run = loop.start(config, workdir, plan)
  try:
    assert run.start_step == config.total_steps
    assert dict(run.mesh.shape) == {"data": 1, "fsdp": 4, "seq": 1, "tensor": 2}
    sharded = [
      x
      for x in jax.tree.leaves(run.state.params)
      if len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
    ]
    assert sharded, "no parameter is sharded on the new mesh"
    assert_close(run.state.params, one_process_reference[1].params, "params")
    assert_close(run.state.opt_state, one_process_reference[1].opt_state, "opt_state")
  finally:
    run.checkpointer.close()
    run.reporter.close()


# ---------------------------------------------------------------- preemption across 2 processes

# A signal sent to ONE process of a 2-process run must stop both at the same
# step with a checkpoint (issue 11). jax.distributed installs JAX's SIGTERM
# notifier in every process; the notice goes through the coordination
# service, and orbax's save / `reached_preemption` fire on every process at
# the same step (`interrupts.StopRequests` turns SIGINT into that notice).
# checkpoint_every > total_steps: besides the step-1 checkpoint orbax always
# writes, the only mid-run checkpoints are the preemption ones. Metrics every
# 2 steps so progress shows early; one evaluation, at the end.
PREEMPT_STEPS = 48
PREEMPT_RUN = {
  **MULTIHOST_RUN,
  "total_steps": PREEMPT_STEPS,
  "log_every": 2,
  "eval_every": 1000,
  "checkpoint_every": 1000,
  "keep_checkpoints": 10,
}
SIGNAL_AFTER = 6  # steps this launch has logged before the signal
STARTUP_TIMEOUT_S = 300  # 2 processes importing and compiling on a loaded 2-core machine
STOP_TIMEOUT_S = 120  # signal -> both processes exited (a few seconds when it works)
STOP_LINE = re.compile(
  r"(preemption notice|SIGTERM|SIGINT): saved a checkpoint at step (\d+) "
  r"in (\S+); exiting"
)
STARTUP_STOP_LINE = re.compile(
  r"preemption notice during startup: the checkpoint at step (\d+) "
  r"in \S+ already holds this state; exiting"
)


def committed_checkpoints(workdir) -> list[int]:
  """Steps whose checkpoint committed, with both processes' shards in it."""
  directory = os.path.join(workdir, "checkpoints")
  steps = []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
    path = os.path.join(directory, name)
    assert name.isdigit(), f"unexpected entry {name} in {directory}: {os.listdir(directory)}"
    assert os.path.exists(os.path.join(path, "commit_success.txt")), f"{path} did not commit"
    for process_id in range(NUM_PROCESSES):
      assert os.path.isdir(os.path.join(path, "state", f"ocdbt.process_{process_id}")), (
        f"{path} lacks process {process_id}'s shards"
      )
    steps.append(int(name))
  return sorted(steps)


class TwoProcessLaunch:
  """`python -m pixel_vit.main` as 2 processes x 2 CPU devices on a fresh
  127.0.0.1 port, each in its own process group (SIGKILLed on leaving the
  `with` block, whatever happened), logging to `<root>/<name>_process_<i>.log`."""

  def __init__(self, root, name: str, workdir: str, overrides: dict):
    self.workdir = workdir
    self.logs = [os.path.join(root, f"{name}_process_{i}.log") for i in range(NUM_PROCESSES)]
    self.steps_before = len(logged_train_steps(workdir))
    address = f"127.0.0.1:{free_port()}"
    env = {
      **_without_cluster_env(),
      "JAX_NUM_CPU_DEVICES": str(DEVICES_PER_PROCESS),
      "PYTHONUNBUFFERED": "1",
    }
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    self.procs, self._handles = [], []
    try:
      for process_id, log in enumerate(self.logs):
        self._handles.append(open(log, "w"))
        self.procs.append(
          subprocess.Popen(
            [
              sys.executable,
              "-m",
              "pixel_vit.main",
              "--config=configs/cls_pixel.py:quick",
              f"--workdir={workdir}",
              *flags,
              f"--coordinator_address={address}",
              f"--num_processes={NUM_PROCESSES}",
              f"--process_id={process_id}",
              "--initialization_timeout=60",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._handles[-1],
            stderr=subprocess.STDOUT,
            start_new_session=True,
          )
        )
    except BaseException:
      self.__exit__()
      raise

  def log(self, process_id: int) -> str:
    return tail(self.logs[process_id], 10**7)

  def tails(self) -> str:
    return "\n".join(f"--- process {i} log tail:\n{tail(log)}" for i, log in enumerate(self.logs))

  def new_steps(self) -> list[int]:
    """Train steps this launch added to metrics.jsonl."""
    return logged_train_steps(self.workdir)[self.steps_before :]

  def wait_until(self, condition, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
      exited = [
        f"process {i}: exit {p.returncode}"
        for i, p in enumerate(self.procs)
        if p.poll() is not None
      ]
      if exited:
        pytest.fail(f"{'; '.join(exited)} before {what}\n{self.tails()}")
      if time.monotonic() > deadline:
        pytest.fail(f"no {what} after {timeout} s\n{self.tails()}")
      time.sleep(0.05)

  def wait(self, timeout: float) -> list[int]:
    """Exit codes once both ended; fails at the first non-zero one (the
    other would sit in a collective until JAX's heartbeat timeout) or after
    `timeout` s."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in self.procs):
      failed = [i for i, p in enumerate(self.procs) if p.returncode not in (None, 0)]
      if failed or time.monotonic() > deadline:
        outcome = "; ".join(f"process {i}: exit {p.poll()}" for i, p in enumerate(self.procs))
        pytest.fail(f"not both exit 0 within {timeout} s ({outcome})\n{self.tails()}")
      time.sleep(0.2)
    return [p.returncode for p in self.procs]

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
    for handle in self._handles:
      handle.close()


def stop_one_process_mid_run(
  root, name: str, workdir: str, process_id: int, signum: signal.Signals
) -> tuple[int, TwoProcessLaunch, float]:
  """Launches the run, sends `signum` to `process_id` alone once this launch
  has logged SIGNAL_AFTER steps, and checks that both processes exit 0 with
  one stop line naming step N, a committed checkpoint of both processes'
  shards at N, and no step past N trained. Returns (N, launch, seconds from
  the signal to both exits)."""
  checkpoints_before = committed_checkpoints(workdir)
  with TwoProcessLaunch(root, name, workdir, PREEMPT_RUN) as launch:
    resumed_from = max(checkpoints_before, default=0)
    launch.wait_until(
      lambda: max(launch.new_steps(), default=0) >= resumed_from + SIGNAL_AFTER,
      timeout=STARTUP_TIMEOUT_S,
      what=f"train step {resumed_from + SIGNAL_AFTER} in metrics.jsonl",
    )
    signalled_at = max(launch.new_steps())
    launch.procs[process_id].send_signal(signum)
    sent = time.monotonic()
    assert launch.wait(STOP_TIMEOUT_S) == [0, 0]
    seconds = time.monotonic() - sent
  name_of_signal = f"{signum.name} to process {process_id}"
  log = launch.log(0)  # process 0 reports for the run
  stops = STOP_LINE.findall(log)
  assert len(stops) == 1, f"expected one stop line after {name_of_signal}:\n{launch.tails()}"
  stopped_by, step, directory = stops[0][0], int(stops[0][1]), stops[0][2]
  assert stopped_by == (
    "SIGINT" if (signum, process_id) == (signal.SIGINT, 0) else "preemption notice"
  ), stops
  assert directory == os.path.join(workdir, "checkpoints")
  # The notice takes effect at a step every process has yet to reach.
  assert signalled_at < step < PREEMPT_STEPS, (name_of_signal, signalled_at, step)
  assert committed_checkpoints(workdir) == sorted({*checkpoints_before, 1, step})
  assert launch.new_steps() and min(launch.new_steps()) > resumed_from  # resumed after it
  assert max(launch.new_steps()) <= step  # nothing trained past the stop
  for process_id_ in range(NUM_PROCESSES):
    assert "Traceback" not in launch.log(process_id_), launch.tails()
  return step, launch, seconds


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_step_and_the_rerun_resumes(tmp_path):
  """Five launches of the same 2-process command on one workdir: SIGTERM to
  process 1, then to process 0, then SIGINT to process 1, each mid-run, each
  stopping both processes at one step with a checkpoint that the next launch
  resumes after; then SIGTERM during startup (after jax.distributed joined,
  before the first step), which stops at the resumed step without training;
  then a launch that finishes."""
  reason = gloo_unavailable_reason()
  if reason:
    pytest.skip(reason)
  workdir = str(tmp_path / "workdir")
  stopped = []
  for name, process_id, signum in (
    ("sigterm_process_1", 1, signal.SIGTERM),
    ("sigterm_process_0", 0, signal.SIGTERM),
    ("sigint_process_1", 1, signal.SIGINT),
  ):
    step, _, seconds = stop_one_process_mid_run(tmp_path, name, workdir, process_id, signum)
    stopped.append(step)
    assert seconds < STOP_TIMEOUT_S
  assert stopped == sorted(set(stopped)), stopped  # each launch got further

  # A notice while the processes restore and compile: before the fix in
  # loop.train, JAX fixed the stop at step 1, which a resumed run never
  # reaches, and the run trained to the end regardless.
  with TwoProcessLaunch(tmp_path, "sigterm_during_startup", workdir, PREEMPT_RUN) as launch:
    launch.wait_until(
      lambda: "process 1 of 2 joined via explicit" in launch.log(1),
      timeout=STARTUP_TIMEOUT_S,
      what="process 1 joining",
    )
    launch.procs[1].send_signal(signal.SIGTERM)
    assert launch.wait(STOP_TIMEOUT_S) == [0, 0]
  assert [int(s) for s in STARTUP_STOP_LINE.findall(launch.log(0))] == [stopped[-1]], launch.tails()
  assert launch.new_steps() == []
  assert committed_checkpoints(workdir) == [1, *stopped]

  with TwoProcessLaunch(tmp_path, "finish", workdir, PREEMPT_RUN) as launch:
    assert launch.wait(TIMEOUT_S + STARTUP_TIMEOUT_S) == [0, 0]
  steps = launch.new_steps()
  assert steps and min(steps) > stopped[-1] and max(steps) == PREEMPT_STEPS, steps
  assert not STOP_LINE.search(launch.log(0)), launch.tails()
  assert committed_checkpoints(workdir) == [1, *stopped, PREEMPT_STEPS]
  evals = [r for r in read_metrics(workdir) if "eval/count" in r]
  assert [r["step"] for r in evals] == [PREEMPT_STEPS]
  assert evals[0]["eval/count"] == 360


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_streamed_run_on_two_processes_trains_like_one_process(tmp_path, cls_pixel):
  """records:DIR: the training order and crops do not depend on the process
  count, so 2 processes x 2 devices and 1 process x 4 devices train on the
  same global batches from the same config (no batches built by hand), and
  each evaluation reads every test record once."""
  from pixel_vit import write_records
  from support import make_image_folder

  records_dir = str(tmp_path / "records")
  write_records.write_split(
    images=make_image_folder(tmp_path / "train", per_class=16), out=records_dir, split="train"
  )
  write_records.write_split(
    images=make_image_folder(tmp_path / "test", per_class=5, seed=3), out=records_dir, split="test"
  )
  streamed = {
    "data.source": f"records:{records_dir}",
    "data.image_size": 8,
    "augment.crop": True,
    "augment.flip": True,
    "eval_batch_size": 8,
  }
  two, one = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  run_two_processes(
    tmp_path,
    two,
    [
      f"--config.{key}={value}" for key, value in {**MULTIHOST_RUN, **DCN_SPLIT, **streamed}.items()
    ],
  )
  config = set_dotted(multihost_config(cls_pixel), streamed)
  _, results = classification.train_and_evaluate(config, one, devices=jax.devices()[:4])
  assert results["eval/count"] == 15
  evals = [r for r in read_metrics(two) if "eval/count" in r]
  assert [r["eval/count"] for r in evals] == [15]
  steps = config.total_steps

  layout, _ = loop.lay_out(
    config, loop.plan(config, classification.make_model_fn), jax.devices()[:4]
  )

  def final_params(workdir):
    checkpointer = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=10)
    try:
      return checkpointer.restore(
        layout.described.abstract, checkpointer.read_identity(steps)
      ).params
    finally:
      checkpointer.close()

  assert_close(final_params(two), final_params(one), "params")
  logged_two, logged_one = train_losses(two), train_losses(one)
  np.testing.assert_allclose(
    [logged_two[s] for s in (2, 4)], [logged_one[s] for s in (2, 4)], rtol=1e-5
  )
