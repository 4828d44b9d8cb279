"""SIGTERM / SIGINT: stop at the next step with a checkpoint, exit 0.

SIGTERM is what SLURM, Kubernetes and TPU maintenance send before they kill
a job; SIGINT is Ctrl-C. The first signal asks the train loop to save the
current step, wait for it to commit and return; a second one exits at once
(the default action of that signal).

Multi-process: every process must stop at the same step, so the stop goes
through JAX's preemption service (`jax.distributed` installs its SIGTERM
notifier; orbax's `reached_preemption` returns True on every process at the
same step). SIGINT is turned into that notice. Without the service (disabled
by `jax_enable_preemption_service`) no handler is installed: one process
stopping alone would leave the others waiting in a collective.
"""

from __future__ import annotations

import os
import signal

import jax
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _preemption_service_running() -> bool:
  from jax._src import distributed  # where jax keeps it; no public accessor

  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopRequests:
  """Context manager: `requested` names the first signal received (or None)."""

  def __init__(self):
    self.requested: str | None = None
    self._previous: dict = {}

  def __enter__(self) -> "StopRequests":
    if jax.process_count() > 1:
      if _preemption_service_running():
        self._install(signal.SIGINT, self._request)
      else:
        logging.warning(
          "multi-process run without JAX's preemption service: SIGTERM and "
          "SIGINT stop the processes without a checkpoint."
        )
      return self
    for signum in SIGNALS:
      self._install(signum, self._request)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _install(self, signum, handler) -> None:
    try:
      self._previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread (e.g. a test runner's worker)
      pass

  def _request(self, signum, frame) -> None:
    """First signal: record it (multi-process: pass it to JAX's notifier,
    a C handler, so every process stops at one step); second: exit now."""
    del frame
    if self.requested is not None:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)  # the signal's default action: terminate now
      return
    self.requested = signal.Signals(signum).name
    if jax.process_count() > 1:
      logging.warning(
        "%s received: asking every process to stop at the same step "
        "(send it again to exit at once).",
        self.requested,
      )
      signal.raise_signal(signal.SIGTERM)
    else:
      logging.warning(
        "%s received: saving a checkpoint at the end of this step, then "
        "exiting (send it again to exit at once).",
        self.requested,
      )
