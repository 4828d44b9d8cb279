"""Issue 22's judged run, at test scale: `python -m pixel_vit.main` with
ViT-Ti/16 on 20,000 generated JPEGs (~1 GB decoded) written to ArrayRecord by
`python -m pixel_vit.write_records`. Streaming keeps the trainer's peak RSS
within a bound stated below whatever the dataset's size, and a run stopped by
SIGTERM resumes with the uninterrupted run's losses, step for step.

Peak RSS is the training process's ru_maxrss, read by a small wrapper
process that runs nothing else. The bound is relative: the same command on a
200-image split, plus a quarter of the 20,000 images' decoded size. Reading
the split into memory would add all of it (twice while it is joined), so the
bound fails for any path that holds the split, on any machine."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from support import REPO_ROOT, logged_train_steps, make_image_folder

pytestmark = pytest.mark.slow

IMAGES = 20_000
CLASSES = 10
SIDES = (96, 160)  # each side of a JPEG, drawn per image: ~1 GB decoded in all
STEPS = 12
SIGNAL_AFTER = 5
TIMEOUT = 900

RUN = [
  "-m",
  "pixel_vit.main",
  "--config=configs/cls_pixel.py:variant=Ti/16,dataset=records:{}",
  "--config.data.image_size=64",
  "--config.batch_size=64",
  "--config.eval_batch_size=100",
  f"--config.total_steps={STEPS}",
  "--config.log_every=1",
  "--config.checkpoint_every=4",
  f"--config.eval_every={STEPS}",
  "--config.optimizer.warmup_steps=2",
]

# Runs argv[1:], then prints the largest RSS of its children (that one
# process: workers=0 decodes in the training process's threads).
PEAK_RSS = (
  "import resource, subprocess, sys\n"
  "code = subprocess.call(sys.argv[1:])\n"
  "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
  "sys.exit(code)\n"
)


def command(records_dir: str, workdir: str, *extra: str) -> list[str]:
  return [sys.executable, *[a.format(records_dir) for a in RUN], f"--workdir={workdir}", *extra]


def start(argv: list[str], log_path: str, *, measured: bool = False) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  if measured:
    argv = [sys.executable, "-c", PEAK_RSS, *argv]
  with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
    return subprocess.Popen(
      argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(process: subprocess.Popen, log_path: str) -> str:
  try:
    code = process.wait(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"no end after {TIMEOUT} s: {log_path}")
  with open(log_path) as f:
    log = f.read()
  assert code == 0, f"exit {code}:\n{log[-3000:]}"
  return log


def peak_rss_bytes(log: str) -> int:
  lines = [line for line in log.splitlines() if line.startswith("PEAK_RSS_KB")]
  assert lines, log[-2000:]
  return int(lines[-1].split()[1]) * 1024


def train_losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


@pytest.fixture(scope="module")
def jpeg_records(tmp_path_factory):
  """records:DIR with 'train' (20,000 JPEGs) and 'test' (200), through the command."""
  root = tmp_path_factory.mktemp("jpegs")
  out = str(root / "records")
  for split, per_class, seed in (("train", IMAGES // CLASSES, 1), ("test", 20, 2)):
    images = make_image_folder(
      root / split, classes=CLASSES, per_class=per_class, seed=seed, sizes=SIDES, png_every=0
    )
    subprocess.run(
      [
        sys.executable,
        "-m",
        "pixel_vit.write_records",
        f"--images={images}",
        f"--out={out}",
        f"--split={split}",
      ],
      cwd=REPO_ROOT,
      check=True,
      capture_output=True,
      timeout=TIMEOUT,
    )
  return out


def test_ti16_on_20000_jpegs_streams_in_bounded_memory_and_resumes_after_sigterm(
  jpeg_records, tmp_path
):
  with open(os.path.join(jpeg_records, "train.json")) as f:
    assert json.load(f)["num_examples"] == IMAGES
  # What reading the split into memory would hold (the mean image of SIDES).
  decoded_bytes = IMAGES * np.mean(SIDES) ** 2 * 3
  whole, stopped, small = (str(tmp_path / n) for n in ("whole", "stopped", "small"))
  logs = {n: str(tmp_path / f"{n}.log") for n in ("whole", "stopped", "resumed", "small")}

  # The uninterrupted run (measured) and the one SIGTERM stops, side by side.
  whole_run = start(command(jpeg_records, whole), logs["whole"], measured=True)
  stopped_run = start(command(jpeg_records, stopped), logs["stopped"])
  deadline = time.monotonic() + TIMEOUT
  while max(logged_train_steps(stopped), default=0) < SIGNAL_AFTER:
    assert stopped_run.poll() is None, open(logs["stopped"]).read()[-3000:]
    assert time.monotonic() < deadline, "no train step logged in time"
    time.sleep(0.1)
  stopped_run.send_signal(signal.SIGTERM)
  stop_log = finish(stopped_run, logs["stopped"])
  assert "SIGTERM" in stop_log and "Traceback" not in stop_log, stop_log[-3000:]
  stopped_at = max(logged_train_steps(stopped))
  assert SIGNAL_AFTER <= stopped_at < STEPS, stopped_at

  # Resume it, and measure the baseline: the same command on 200 images.
  resumed_run = start(command(jpeg_records, stopped), logs["resumed"])
  small_run = start(
    command(jpeg_records, small, "--config.data.train_split=test"), logs["small"], measured=True
  )
  whole_log = finish(whole_run, logs["whole"])
  resume_log = finish(resumed_run, logs["resumed"])
  small_log = finish(small_run, logs["small"])
  assert "input streamed from ArrayRecord" in whole_log
  assert f"steps {stopped_at} -> {STEPS}" in resume_log, resume_log[-3000:]

  reference, resumed = train_losses(whole), train_losses(stopped)
  assert sorted(reference) == list(range(1, STEPS + 1))
  assert sorted(resumed) == list(range(1, STEPS + 1))
  assert resumed == reference  # bitwise: the same batches, crops and updates

  whole_peak, small_peak = peak_rss_bytes(whole_log), peak_rss_bytes(small_log)
  bound = small_peak + decoded_bytes / 4
  print(
    f"peak RSS: {whole_peak / 2**30:.2f} GiB on {IMAGES} JPEGs "
    f"({decoded_bytes / 2**30:.2f} GiB decoded), {small_peak / 2**30:.2f} GiB on 200; "
    f"bound {bound / 2**30:.2f} GiB"
  )
  assert whole_peak < bound, (whole_peak, small_peak, decoded_bytes)
