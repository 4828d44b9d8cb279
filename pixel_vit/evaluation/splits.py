"""Summing per-batch statistics over a whole (padded, sharded) eval split."""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np


def sum_over_batches(sums_fn: Callable[[int, dict], dict], batches: Iterable[dict]) -> dict:
  """Adds up `sums_fn(batch_index, batch)` (a dict of scalars) over `batches`."""
  totals: dict[str, float] = {}
  for index, batch in enumerate(batches):
    for name, value in jax.device_get(sums_fn(index, batch)).items():
      totals[name] = totals.get(name, 0.0) + float(np.asarray(value))
  return totals
