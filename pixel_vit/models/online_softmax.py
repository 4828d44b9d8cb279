"""The online softmax ("flash") merge that `chunked` and `ring` attention share.

Attention over keys seen one block at a time keeps, per query row, a running
max, a running sum of exp(logit - max) and a float32 weighted-value
accumulator; each new key block rescales them to its new max and adds its
own part. After the last block, acc / sum is the softmax-weighted sum of the
values and max + log(sum) the row's log-sum-exp.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

Stats = tuple  # (running max [B, H, q], running sum [B, H, q], acc [B, H, q, D])


def initial(batch: int, heads: int, rows: int, dim: int) -> Stats:
  """Statistics before any key block.

  The running max starts at the lowest finite float, not -inf: a block whose
  keys are all -inf (padding) then gives exp(-inf - min) = 0, not NaN, and a
  row whose keys all carry the masked value finfo.min gets exp(0) = 1 per
  key, a uniform softmax, as `xla_attention` gives.
  """
  return (jnp.full((batch, heads, rows), jnp.finfo(jnp.float32).min),
          jnp.zeros((batch, heads, rows), jnp.float32),
          jnp.zeros((batch, heads, rows, dim), jnp.float32))


def merge(stats: Stats, logits, values, values_layout: str = "bhkd") -> Stats:
  """`stats` plus one key block: float32 logits [B, H, q, k] and the block's
  values, laid out as `values_layout` says (`bhkd` or `bkhd`)."""
  running_max, running_sum, acc = stats
  # The max only keeps exp() in range; the result does not depend on it, so
  # its gradient is zero exactly and need not be traced.
  new_max = lax.stop_gradient(jnp.maximum(running_max, logits.max(axis=-1)))
  probs = jnp.exp(logits - new_max[..., None])
  correction = jnp.exp(running_max - new_max)
  running_sum = running_sum * correction + probs.sum(axis=-1)
  acc = acc * correction[..., None] + jnp.einsum(
      f"bhqk,{values_layout}->bhqd", probs.astype(values.dtype), values,
      preferred_element_type=jnp.float32)
  return new_max, running_sum, acc


def finish(stats: Stats):
  """(output [B, H, q, D] float32, log-sum-exp [B, H, q]) of the merged blocks.

  The running sum is >= 1 for every row with a finite logit (its max gives
  exp(0)), so nothing divides by zero.
  """
  running_max, running_sum, acc = stats
  return acc / running_sum[..., None], running_max + jnp.log(running_sum)
