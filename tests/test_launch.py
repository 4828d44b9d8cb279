"""The launchers in launch/: their dry runs print the exact commands (parsed
back here), they reject flags they set themselves, and local.sh waits for
its processes, stops them all when one fails or on Ctrl-C, and logs each one
(exercised with a stand-in python, so these tests take seconds; the real
2-process training is tests/test_multihost.py).

Every script runs with stand-ins for gcloud, srun, sbatch and git first on
PATH that record any call: a dry run must call none of them.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from support import REPO_ROOT

LAUNCH = REPO_ROOT / "launch"
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm.sbatch"]
CONFIG = "configs/cls_pixel.py:variant=S/1"


@pytest.fixture
def tools(tmp_path) -> pathlib.Path:
  """A bin directory of recording stand-ins for the cluster tools; returns the
  file their calls are appended to."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "tool_calls.txt"
  for name in ("gcloud", "srun", "sbatch", "git"):
    tool = bin_dir / name
    tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {shlex.quote(str(calls))}\nexit 97\n')
    tool.chmod(0o755)
  return calls


def launch(
  script: str, args: list[str], tools: pathlib.Path, env: dict | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
  bin_dir = tools.parent / "bin"
  environment = {
    k: v
    for k, v in os.environ.items()
    if k not in ("DRY_RUN", "TPU_NAME", "ZONE", "PROJECT", "NUM_WORKERS", "VENV")
    and not k.startswith("SLURM_")
  }
  environment.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **(env or {}))
  return subprocess.run(
    [str(LAUNCH / script), *args],
    cwd=REPO_ROOT,
    env=environment,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def command_lines(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def assert_no_tool_ran(tools: pathlib.Path):
  assert not tools.exists(), f"a dry run called: {tools.read_text()}"


def option(tokens: list[str], name: str) -> str:
  values = [t.split("=", 1)[1] for t in tokens if t.startswith(f"{name}=")]
  assert len(values) == 1, (name, tokens)
  return values[0]


def contains_run(tokens: list[str], expected: list[str]) -> bool:
  """`expected` appears in `tokens` as a contiguous run."""
  return any(tokens[i : i + len(expected)] == expected for i in range(len(tokens)))


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
  path = LAUNCH / script
  assert os.access(path, os.X_OK), f"{script} is not executable"
  subprocess.run(["bash", "-n", str(path)], check=True)


# ---------------------------------------------------------------- local.sh


def test_local_dry_run_prints_one_command_per_process(tools, tmp_path):
  workdir = str(tmp_path / "run dir")  # a space: the printed commands must quote it
  extra = ["--config.total_steps=5", "--config.optimizer.lr=0.001"]
  result = launch(
    "local.sh",
    [
      "--dry_run",
      "--num_processes=3",
      "--devices_per_process=2",
      "--port=23456",
      f"--config={CONFIG}",
      f"--workdir={workdir}",
      *extra,
    ],
    tools,
  )
  assert result.returncode == 0, result.stderr
  lines = command_lines(result.stdout)
  assert lines[-1] == ["wait"] and len(lines) == 4, result.stdout
  for process_id, tokens in enumerate(lines[:3]):
    assert tokens[:3] == ["env", "JAX_PLATFORMS=cpu", "JAX_NUM_CPU_DEVICES=2"], tokens
    assert tokens[3:6] == ["python3", "-m", "pixel_vit.main"], tokens
    assert tokens[6:10] == [f"--config={CONFIG}", f"--workdir={workdir}", *extra], tokens
    assert tokens[10:13] == [
      "--coordinator_address=127.0.0.1:23456",
      "--num_processes=3",
      f"--process_id={process_id}",
    ], tokens
    assert tokens[13:] == [">", f"{workdir}/logs/process_{process_id}.log", "2>&1", "&"], tokens
  assert_no_tool_ran(tools)


def test_local_dry_run_picks_a_free_port_and_honours_env(tools, tmp_path):
  result = launch(
    "local.sh",
    [f"--config={CONFIG}", f"--workdir={tmp_path}"],
    tools,
    env={
      "DRY_RUN": "1",
      "NUM_PROCESSES": "2",
      "DEVICES_PER_PROCESS": "4",
      "LOG_DIR": str(tmp_path / "logs_here"),
    },
  )
  assert result.returncode == 0, result.stderr
  lines = command_lines(result.stdout)[:-1]
  assert len(lines) == 2
  addresses = {option(tokens, "--coordinator_address") for tokens in lines}
  assert len(addresses) == 1
  host, port = addresses.pop().split(":")
  assert host == "127.0.0.1" and 0 < int(port) < 65536
  assert all("JAX_NUM_CPU_DEVICES=4" in tokens for tokens in lines)
  assert lines[1][-3] == str(tmp_path / "logs_here" / "process_1.log")
  assert not (tmp_path / "logs_here").exists()  # a dry run creates nothing


@pytest.mark.parametrize(
  "args, message",
  [
    (["--process_id=0"], "--process_id=0 is set by the launcher"),
    (["--distributed=auto"], "--distributed=auto is set by the launcher"),
    (["--num_processes=0"], "--num_processes=0 must be a positive integer"),
    (["--devices_per_process=two"], "--devices_per_process=two must be a positive integer"),
    (["--port=70000"], "--port=70000 must be a port number"),
  ],
  ids=["process_id", "distributed", "no_processes", "bad_devices", "bad_port"],
)
def test_local_rejects_bad_flags(tools, tmp_path, args, message):
  result = launch(
    "local.sh", ["--dry_run", f"--config={CONFIG}", f"--workdir={tmp_path}", *args], tools
  )
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert result.stdout == ""


def test_local_needs_config_and_workdir(tools):
  result = launch("local.sh", ["--dry_run", f"--config={CONFIG}"], tools)
  assert result.returncode == 2
  assert "pass --config=CONFIG and --workdir=DIR" in result.stderr


STAND_IN_PYTHON = """#!{python}
# Stands in for python3 in local.sh: records how it was started, then acts as
# FAKE_BEHAVIOUR says for its --process_id.
import os, sys, signal, time
process_id = int([a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1])
with open(os.path.join(os.environ["FAKE_PID_DIR"], f"{{process_id}}.pid"), "w") as f:
  f.write(str(os.getpid()))
print("argv", sys.argv[1:], "devices", os.environ.get("JAX_NUM_CPU_DEVICES"), flush=True)
behaviour = os.environ["FAKE_BEHAVIOUR"]
if behaviour == "stubborn":  # ignores TERM, as a process stuck in a collective may
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
if behaviour == "ok":
  sys.exit(0)
if behaviour == "fail_1" and process_id == 1:
  time.sleep(0.3)
  print("process 1 gives up", flush=True)
  sys.exit(3)
time.sleep(120)
"""


@pytest.fixture
def stand_in(tmp_path):
  """(env for local.sh running the stand-in python, its pid directory)."""
  python = tmp_path / "python_stand_in"
  python.write_text(STAND_IN_PYTHON.format(python=sys.executable))
  python.chmod(0o755)
  pid_dir = tmp_path / "pids"
  pid_dir.mkdir()
  return {"PYTHON": str(python), "FAKE_PID_DIR": str(pid_dir)}, pid_dir


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (exited, not yet reaped by its parent) counts as stopped.
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def pids_of(pid_dir, count: int, timeout: float = 10) -> list[int]:
  deadline = time.monotonic() + timeout
  while len(list(pid_dir.glob("*.pid"))) < count:
    assert time.monotonic() < deadline, "the stand-in processes did not start"
    time.sleep(0.05)
  time.sleep(0.1)  # let the last one finish writing
  return [int((pid_dir / f"{i}.pid").read_text()) for i in range(count)]


def test_local_runs_every_process_with_its_own_log(tools, tmp_path, stand_in):
  env, pid_dir = stand_in
  workdir = tmp_path / "run"
  result = launch(
    "local.sh",
    [
      "--num_processes=3",
      "--devices_per_process=2",
      "--port=23457",
      f"--config={CONFIG}",
      f"--workdir={workdir}",
    ],
    tools,
    env={**env, "FAKE_BEHAVIOUR": "ok"},
  )
  assert result.returncode == 0, result.stderr
  assert "all 3 processes finished" in result.stdout
  for process_id in range(3):
    log = (workdir / "logs" / f"process_{process_id}.log").read_text()
    assert f"'--process_id={process_id}'" in log and "devices 2" in log, log
    assert "'--coordinator_address=127.0.0.1:23457'" in log


def test_local_stops_the_others_when_one_fails(tools, tmp_path, stand_in):
  env, pid_dir = stand_in
  start = time.monotonic()
  result = launch(
    "local.sh",
    ["--num_processes=3", "--port=23458", f"--config={CONFIG}", f"--workdir={tmp_path / 'run'}"],
    tools,
    env={**env, "FAKE_BEHAVIOUR": "fail_1"},
  )
  assert result.returncode == 3, result.stderr
  assert time.monotonic() - start < 20  # not the survivors' 120 s sleep
  assert "process 1 exited with status 3; stopping the others" in result.stderr
  assert "process 1 gives up" in result.stderr  # the tail of its log
  assert not any(alive(pid) for pid in pids_of(pid_dir, 3))


@pytest.mark.parametrize("behaviour", ["sleep", "stubborn"])
def test_local_ctrl_c_stops_every_process(tools, tmp_path, stand_in, behaviour):
  """Ctrl-C: TERM to all (JAX's preemption notice), KILL after STOP_GRACE for
  a process that ignores it."""
  env, pid_dir = stand_in
  environment = {**os.environ, **env, "FAKE_BEHAVIOUR": behaviour, "STOP_GRACE": "1"}
  proc = subprocess.Popen(
    [
      str(LAUNCH / "local.sh"),
      "--num_processes=2",
      "--port=23459",
      f"--config={CONFIG}",
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=REPO_ROOT,
    env=environment,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    pids = pids_of(pid_dir, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130, stderr
    assert "interrupted; stopping all processes" in stderr
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    for pid_file in pid_dir.glob("*.pid"):
      try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass


# ---------------------------------------------------------------- tpu_pod.sh

TPU_ENV = {"TPU_NAME": "pit-pod", "ZONE": "us-central2-b"}


def tpu(args, tools, **env):
  result = launch("tpu_pod.sh", args, tools, env={**TPU_ENV, **env})
  assert result.returncode == 0, result.stderr
  assert_no_tool_ran(tools)
  return command_lines(result.stdout)


def test_tpu_create_and_delete(tools):
  assert tpu(["--dry_run", "create", f"--config={CONFIG}"], tools, PROJECT="my-project") == [
    ["python", "-m", "pixel_vit.compile", "--topology=v4-32", f"--config={CONFIG}"],
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      "pit-pod",
      "--zone=us-central2-b",
      "--project=my-project",
      "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base",
    ],
  ]
  assert (
    tpu(["create", "--skip_compile_check"], tools, DRY_RUN="1", ACCELERATOR_TYPE="v5litepod-16")[0][
      -2
    ]
    == "--accelerator-type=v5litepod-16"
  )
  assert tpu(["delete", "--dry_run"], tools) == [
    ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pit-pod", "--zone=us-central2-b", "--quiet"]
  ]


def test_tpu_run_starts_main_on_all_workers(tools):
  main_flags = [
    f"--config={CONFIG}",
    "--workdir=gs://bucket/runs/s1",
    "--config.optimizer.lr=0.001",
  ]
  check, tokens = tpu(["--dry_run", "run", *main_flags], tools)
  # First the compile check for this slice, with the run's config flags only.
  assert check == [
    "python",
    "-m",
    "pixel_vit.compile",
    "--topology=v4-32",
    f"--config={CONFIG}",
    "--config.optimizer.lr=0.001",
  ]
  assert tokens[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pit-pod"]
  assert "--worker=all" in tokens and "--zone=us-central2-b" in tokens
  remote = option(tokens, "--command")
  remote_tokens = shlex.split(remote)
  assert contains_run(
    remote_tokens, ["python3", "-m", "pixel_vit.main", "--distributed=auto", *main_flags]
  ), remote
  assert remote.startswith("set -o pipefail;")  # the worker's status is python's
  assert contains_run(remote_tokens, ["tee", "-a", "~/pixel_vit_logs/$(hostname).log"]), remote
  assert contains_run(remote_tokens, ["cd", "~/pixel_vit"]), remote


def test_tpu_setup_installs_this_checkout_on_all_workers(tools):
  lines = tpu(["--dry_run", "setup"], tools, JAX_VERSION="0.10.2")
  assert [tokens[0] for tokens in lines] == ["git", "gcloud", "gcloud"]
  archive = option(lines[0], "--output")
  assert lines[0][:4] == ["git", "-C", str(REPO_ROOT), "archive"] and lines[0][-1] == "HEAD"
  assert lines[1][4] == "scp" and archive in lines[1] and "--worker=all" in lines[1]
  assert lines[2][4] == "ssh" and "--worker=all" in lines[2]
  remote = shlex.split(option(lines[2], "--command"))
  assert contains_run(remote, ["install", "-U", "jax[tpu]==0.10.2"]), remote
  assert contains_run(remote, ["install", "-e", "~/pixel_vit"]), remote


def test_tpu_logs_copies_each_worker(tools, tmp_path):
  lines = tpu(["--dry_run", "logs", str(tmp_path / "logs")], tools, NUM_WORKERS="3")
  assert lines[0] == ["mkdir", "-p", str(tmp_path / "logs")]
  assert len(lines) == 4
  for worker, tokens in enumerate(lines[1:]):
    assert tokens[4:7] == ["scp", "--recurse", "pit-pod:pixel_vit_logs"], tokens
    assert tokens[7] == str(tmp_path / "logs" / f"worker_{worker}")
    assert f"--worker={worker}" in tokens
  assert not (tmp_path / "logs").exists()


def test_tpu_stops_before_gcloud_when_the_compile_check_fails(tools):
  # A slice libtpu cannot describe: pixel_vit.compile exits 1, nothing is created.
  result = launch(
    "tpu_pod.sh",
    ["create", f"--config={CONFIG}"],
    tools,
    env={**TPU_ENV, "ACCELERATOR_TYPE": "v5litepod-3"},
    timeout=300,
  )
  assert result.returncode == 2, result.stderr
  assert "v5litepod-3" in result.stderr and "--skip_compile_check" in result.stderr
  assert_no_tool_ran(tools)


@pytest.mark.parametrize(
  "args, env, message",
  [
    (["--dry_run", "create", f"--config={CONFIG}"], {"TPU_NAME": ""}, "set TPU_NAME"),
    (["--dry_run", "create", f"--config={CONFIG}"], {"ZONE": ""}, "set ZONE"),
    (["--dry_run", "create"], {}, "create needs --config=CONFIG"),
    (["--dry_run"], {}, "name a command: create | setup | run | logs | delete"),
    (["--dry_run", "resize"], {}, "unknown command 'resize'"),
    (["--dry_run", "run", f"--config={CONFIG}"], {}, "run needs --config=CONFIG and --workdir"),
    (
      ["--dry_run", "run", f"--config={CONFIG}", "--workdir=gs://b/r", "--process_id=0"],
      {},
      "--process_id=0: on a TPU pod every worker joins with --distributed=auto",
    ),
    (["--dry_run", "logs"], {}, "set NUM_WORKERS for a dry run of logs"),
  ],
  ids=[
    "no_name",
    "no_zone",
    "no_config",
    "no_command",
    "bad_command",
    "no_workdir",
    "process_id",
    "logs",
  ],
)
def test_tpu_rejects_bad_use(tools, args, env, message):
  result = launch("tpu_pod.sh", args, tools, env={**TPU_ENV, **env})
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert_no_tool_ran(tools)


# ---------------------------------------------------------------- slurm.sbatch


def test_slurm_dry_run_prints_the_srun_line(tools, tmp_path):
  main_flags = [f"--config={CONFIG}", f"--workdir={tmp_path}/run", "--config.batch_size=512"]
  for args, env in (([*main_flags], {"DRY_RUN": "1"}), (["--dry_run", *main_flags], {})):
    result = launch("slurm.sbatch", args, tools, env=env)
    assert result.returncode == 0, result.stderr
    assert command_lines(result.stdout) == [
      [
        "srun",
        "--kill-on-bad-exit=1",
        "python3",
        "-m",
        "pixel_vit.main",
        "--distributed=auto",
        *main_flags,
      ]
    ]
  result = launch(
    "slurm.sbatch", ["--dry_run", *main_flags], tools, env={"VENV": str(tmp_path / "venv")}
  )
  assert command_lines(result.stdout)[0] == ["source", str(tmp_path / "venv" / "bin" / "activate")]
  assert_no_tool_ran(tools)


def test_slurm_header_asks_for_one_task_per_gpu():
  header = dict(
    re.findall(r"^#SBATCH --([\w-]+)=(\S+)", (LAUNCH / "slurm.sbatch").read_text(), re.M)
  )
  assert header["ntasks-per-node"] == header["gpus-per-node"], header
  assert int(header["nodes"]) >= 2


@pytest.mark.parametrize(
  "args, env, message",
  [
    (
      [f"--config={CONFIG}", "--workdir=/shared/run"],
      {},
      "not inside a SLURM job: submit with sbatch",
    ),
    (["--dry_run", "--workdir=/shared/run"], {}, "pass --config=CONFIG and --workdir=DIR"),
    (
      ["--dry_run", f"--config={CONFIG}", "--workdir=/shared/run", "--num_processes=2"],
      {},
      "--num_processes=2: under SLURM every process joins with --distributed=auto",
    ),
  ],
  ids=["outside_slurm", "no_workdir", "explicit_flags"],
)
def test_slurm_rejects_bad_use(tools, args, env, message):
  result = launch("slurm.sbatch", args, tools, env=env)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert_no_tool_ran(tools)
