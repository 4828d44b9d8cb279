"""Classification evaluation: top-1, top-5 and loss over a whole split.

Each process evaluates its own shard in padded batches; padding carries mask 0
so every example of the split is counted exactly once, on any number of
devices and processes.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from pixel_vit.evaluation import splits


def masked_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
  """Per-batch sums (correct top-1/top-5, loss, count) over unmasked examples."""
  k = min(5, logits.shape[-1])
  top_k = jax.lax.top_k(logits, k)[1]
  hit = top_k == labels[:, None]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {
    "correct_top1": jnp.sum(hit[:, 0] * mask),
    "correct_top5": jnp.sum(hit.any(axis=1) * mask),
    "loss": jnp.sum(loss * mask),
    "count": jnp.sum(mask),
  }


def evaluate(sums_fn: Callable[[dict], dict], batches: Iterable[dict]) -> dict:
  """Runs `sums_fn` (a jitted global-batch function) over `batches` and
  returns {top1, top5, loss, count} for the whole split."""
  totals = splits.sum_over_batches(lambda _, batch: sums_fn(batch), batches)
  count = totals.get("count", 0.0)
  if count == 0:
    raise ValueError("evaluation saw no examples: the eval split is empty.")
  return {
    "top1": totals["correct_top1"] / count,
    "top5": totals["correct_top5"] / count,
    "loss": totals["loss"] / count,
    "count": count,
  }
