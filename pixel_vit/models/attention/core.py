"""What every attention backend shares: the plain `xla` attention (the
reference the others match), the q / k / v input checks, the names remat
policies keep, and the online-softmax ("flash") merge of `chunked` and `ring`.

Backends take q, k, v of shape [batch, length, heads, head_dim] and an
optional boolean key mask [batch, key_length] (True = attend) and return
[batch, length, heads, head_dim].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd
from jax import lax
from jax.sharding import PartitionSpec

from pixel_vit import parallel

AttentionFn = Callable[..., jax.Array]

# What `chunked` names for remat policies: its output and per-row log-sum-exp,
# O(length) each; keeping them saves re-running its forward pass. `splash`
# names both with the first.
REMAT_SAVEABLE_NAMES = ("attention_out", "attention_lse")


def xla_attention(q, k, v, key_mask=None):
  """Plain einsum + softmax; softmax in float32 whatever the compute dtype."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def per_device(body: Callable, q, k, v, key_mask):
  """`body(q, k, v, key_mask)` on each device's own examples and heads.

  For a backend that needs whole sequences and loops over blocks (`chunked`,
  `splash`): under a mesh (`parallel.activate`) it runs inside `shard_map`
  over the mesh axes of the batch and the heads (those that divide them);
  left to GSPMD, `chunked`'s loops gathered the whole global batch onto every
  device and each device computed all of it. Without a mesh, `body` runs as
  it is. `key_mask` [batch, key_length] (or None) is split with the batch.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return body(q, k, v, key_mask)
  qkv_spec, mask_spec, _, _ = parallel.ring_layout(
    q.shape, mesh, flax_spmd.get_logical_axis_rules()
  )
  # Whole sequences on each device: the length entries are dropped.
  qkv_spec = PartitionSpec(qkv_spec[0], None, qkv_spec[2], None)
  mask_spec = PartitionSpec(mask_spec[0], None)
  if key_mask is None:
    return jax.shard_map(
      lambda q, k, v: body(q, k, v, None),
      mesh=mesh,
      in_specs=(qkv_spec,) * 3,
      out_specs=qkv_spec,
      check_vma=False,
    )(q, k, v)
  return jax.shard_map(
    body, mesh=mesh, in_specs=(qkv_spec,) * 3 + (mask_spec,), out_specs=qkv_spec, check_vma=False
  )(q, k, v, key_mask)


# ---------------------------------------------------------------------------
# Input checks: `name` is the backend's ('chunked', 'ring', 'splash').
# ---------------------------------------------------------------------------


def check_qkv(name: str, q, k, v, *, self_attention: bool) -> None:
  """q, k, v are [batch, length, heads, head_dim] of one dtype, else ValueError.

  self_attention: q, k and v must have one shape. Otherwise (cross-attention)
  they must share batch, heads and head_dim, k and v their length, and there
  must be at least one query and one key.
  """
  if self_attention:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
      raise ValueError(
        f"{name} attention takes q, k, v of one shape [batch, length, heads, "
        f"head_dim] (self-attention); got {q.shape}, {k.shape}, {v.shape}."
      )
  else:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
      raise ValueError(
        f"{name} attention takes q, k, v of shape [batch, length, heads, "
        f"head_dim]; got {q.shape}, {k.shape}, {v.shape}."
      )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
      raise ValueError(
        f"{name} attention: q {q.shape}, k {k.shape} and v {v.shape} must "
        "share batch, heads and head_dim, and k and v their length."
      )
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(
      f"{name} attention: q, k, v have dtypes {q.dtype}, {k.dtype}, "
      f"{v.dtype}; cast them to one dtype first."
    )
  if not self_attention and (q.shape[1] < 1 or k.shape[1] < 1):
    raise ValueError(
      f"{name} attention needs at least one query and one key; got q {q.shape}, k {k.shape}."
    )


def check_key_mask(name: str, key_mask, k):
  """The key mask as an array (None stays None): boolean [batch, key_length]
  of `k`, else ValueError."""
  if key_mask is None:
    return None
  key_mask = jnp.asarray(key_mask)
  expected = (k.shape[0], k.shape[1])
  if key_mask.shape != expected or key_mask.dtype != jnp.bool_:
    raise ValueError(
      f"{name} attention: key_mask must be boolean [batch, key_length] "
      f"= {expected}; got {key_mask.dtype} {key_mask.shape}."
    )
  return key_mask


# ---------------------------------------------------------------------------
# Online softmax ("flash"): the merge that `chunked` and `ring` share.
#
# Attention over keys seen one block at a time keeps, per query row, a running
# max, a running sum of exp(logit - max) and a float32 weighted-value
# accumulator; each new key block rescales them to its new max and adds its
# own part. After the last block, acc / sum is the softmax-weighted sum of the
# values and max + log(sum) the row's log-sum-exp.
# ---------------------------------------------------------------------------

Stats = tuple  # (running max [B, H, q], running sum [B, H, q], acc [B, H, q, D])


def online_softmax_initial(batch: int, heads: int, rows: int, dim: int) -> Stats:
  """Statistics before any key block.

  The running max starts at the lowest finite float, not -inf: a block whose
  keys are all -inf (padding) then gives exp(-inf - min) = 0, not NaN, and a
  row whose keys all carry the masked value finfo.min gets exp(0) = 1 per
  key, a uniform softmax, as `xla_attention` gives.
  """
  return (
    jnp.full((batch, heads, rows), jnp.finfo(jnp.float32).min),
    jnp.zeros((batch, heads, rows), jnp.float32),
    jnp.zeros((batch, heads, rows, dim), jnp.float32),
  )


def online_softmax_merge(stats: Stats, logits, values, values_layout: str = "bhkd") -> Stats:
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
    f"bhqk,{values_layout}->bhqd",
    probs.astype(values.dtype),
    values,
    preferred_element_type=jnp.float32,
  )
  return new_max, running_sum, acc


def online_softmax_finish(stats: Stats):
  """(output [B, H, q, D] float32, log-sum-exp [B, H, q]) of the merged blocks.

  The running sum is >= 1 for every row with a finite logit (its max gives
  exp(0)), so nothing divides by zero.
  """
  running_max, running_sum, acc = stats
  return acc / running_sum[..., None], running_max + jnp.log(running_sum)
