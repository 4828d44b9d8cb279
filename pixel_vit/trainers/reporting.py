"""What a run leaves in its workdir: config, TensorBoard events, metrics JSON
lines, progress (steps/s, ETA) in the log, and on request a profiler trace.
Only process 0 writes files, except traces: every process records its own
devices (one file per host).

Paths go through `etils.epath`, so a workdir may be local or `gs://...` (a
TPU pod's workers share a bucket)."""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath


class Reporter:
  """clu metric writer + `metrics.jsonl` + `ReportProgress`."""

  def __init__(self, workdir: str, config, *, total_steps: int, log_every: int):
    self.is_main = jax.process_index() == 0
    self.workdir = workdir
    directory = epath.Path(workdir)
    if self.is_main:
      directory.mkdir(parents=True, exist_ok=True)
    self.writer = metric_writers.create_default_writer(
      workdir, just_logging=not self.is_main, asynchronous=True
    )
    self.progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=self.writer, every_steps=log_every
    )
    profile = config.get("profile")
    self.profile = None
    if profile is not None and profile.steps > 0:
      self.profile = ProfileWindow(workdir, first_step=profile.first_step, steps=profile.steps)
    self._jsonl_path = directory / "metrics.jsonl"

  def scalars(self, step: int, scalars: dict[str, float]) -> None:
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self.is_main:
      with self._jsonl_path.open("a") as f:
        # null, not the bare NaN token json.dumps writes (invalid JSON)
        finite = {k: v if np.isfinite(v) else None for k, v in scalars.items()}
        f.write(json.dumps({"step": step, "time": time.time(), **finite}, allow_nan=False) + "\n")

  def images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """uint8 [N, H, W, C] arrays to TensorBoard."""
    self.writer.write_images(step, images)

  def tick(self, step: int) -> None:
    """Call once per train step: steps/s and ETA every `log_every` steps; the
    profiler trace when its steps come."""
    self.progress(step)
    if self.profile is not None:
      self.profile(step)

  def log(self, message: str) -> None:
    if self.is_main:
      logging.info(message)

  def close(self) -> None:
    if self.profile is not None:
      self.profile.close()
    self.writer.flush()
    self.writer.close()


class ProfileWindow:
  """A `jax.profiler` trace of train steps first_step .. first_step + steps -
  1, written into `logdir` (TensorBoard's plugins/profile). A trace still
  recording when the run ends inside the window is written by `close`.
  (clu's periodic Profile does the same from its private state, with no
  public way to stop a trace it started; jax.profiler's is public.)"""

  def __init__(self, logdir: str, *, first_step: int, steps: int):
    self.logdir, self.first_step, self.steps = logdir, first_step, steps
    self.started_at: int | None = None

  def __call__(self, step: int) -> None:
    """Call after each train step."""
    if self.started_at is None and step == self.first_step:
      jax.profiler.start_trace(self.logdir)
      self.started_at = step
    elif self.started_at is not None and step >= self.started_at + self.steps:
      self.close()

  def close(self) -> None:
    if self.started_at is not None:
      jax.profiler.stop_trace()
      self.started_at = None
