"""Stops a run whose loss or gradient norm is no longer finite.

Without this a diverged run ends with exit 0 and NaN checkpoints that rotate
out the last good one. `config.on_nonfinite`:
  'stop'  the first non-finite step stops the run (the default);
  'skip'  a step whose gradients are not finite leaves the parameters as they
          were (`optax.apply_if_finite`) and is counted; more than
          `config.max_nonfinite_skips` in a row stop the run.
The check reads the step metrics the loop fetches anyway (at log points) and
always runs before a checkpoint is written, together with a check of the
parameters themselves: no checkpoint with non-finite values is ever saved.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


class TrainingDivergedError(RuntimeError):
  """The loss, gradients or parameters stopped being finite."""


def watched(name: str) -> bool:
  """The metrics whose non-finite value means the update went wrong."""
  return name.endswith("loss") or name.endswith("grad_norm")


def wrap_optimizer(config, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`skip` mode: updates with non-finite gradients are not applied (the
  guard below, not optax, decides when too many in a row stop the run)."""
  if config.get("on_nonfinite", "stop") != "skip":
    return tx
  return optax.apply_if_finite(tx, max_consecutive_errors=np.iinfo(np.int32).max)


@jax.jit
def all_finite(tree) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class Guard:
  """Collects step metrics (device arrays) and checks them in batches."""

  def __init__(self, config):
    self.action = config.get("on_nonfinite", "stop")
    self.max_skips = int(config.get("max_nonfinite_skips", 0)) if self.action == "skip" else 0
    self._unchecked: list[tuple[int, dict]] = []
    self.skipped_in_a_row = 0
    self.skipped_total = 0

  def observe(self, step: int, metrics: dict) -> None:
    self._unchecked.append((step, metrics))

  def check(self, last_checkpoint: Callable[[], str], *, fetched: list[dict]) -> None:
    """Raises TrainingDivergedError naming the step; `last_checkpoint()`
    says where the last finite state is. The metrics it fetches to the host
    (once) are appended to `fetched`, for the log."""
    steps = jax.device_get(self._unchecked)
    self._unchecked = []
    fetched.extend(metrics for _, metrics in steps)
    for step, metrics in steps:
      bad = {k: float(v) for k, v in metrics.items() if watched(k) and not np.isfinite(v)}
      if not bad:
        self.skipped_in_a_row = 0
        continue
      self.skipped_in_a_row += 1
      if self.skipped_in_a_row > self.max_skips:
        values = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        limit = (
          f" (more than config.max_nonfinite_skips={self.max_skips} in a row)"
          if self.action == "skip"
          else ""
        )
        skip = (
          "raise config.max_nonfinite_skips"
          if self.action == "skip"
          else "set config.on_nonfinite='skip'"
        )
        raise TrainingDivergedError(
          f"training diverged at step {step}: {values}{limit}. Nothing after the last "
          f"checkpoint was saved; {last_checkpoint()}. Lower the learning rate "
          "(config.optimizer.lr), "
          f"raise the warmup or clip gradients (config.optimizer.grad_clip), or {skip} "
          "to step over rare bad batches."
        )
      self.skipped_total += 1  # only reached in 'skip' mode: this update was not applied

  def check_params(self, step: int, params, last_checkpoint: Callable[[], str]) -> None:
    if not bool(all_finite(params)):
      raise TrainingDivergedError(
        f"the parameters hold NaN or Inf at step {step}, so it was not saved; "
        f"{last_checkpoint()}. Lower the learning rate (config.optimizer.lr) or clip gradients."
      )
