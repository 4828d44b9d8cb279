"""`chunked`: blockwise online-softmax ("flash") attention with a custom VJP.

It never holds a [length, length] array, so its memory grows linearly with
the sequence length (pixel tokens: 1,025 for 32x32, 16,384 for 128x128).
Queries and keys may differ in length (cross-attention).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pixel_vit.models.attention import core

# Default block sizes of `chunked` (upper bounds, see `_blocking`), measured
# with benchmarks/attention.py on the 2-core AVX-512 CPU, Ti heads (3 x 64).
# A block is (examples, heads, query rows, key rows) of float32 scores; its
# passes (max, exp, sum, the products) are bound by memory traffic when it is
# large and by per-iteration loop overhead when it is small. About 3-4M
# scores (12-16 MiB) per block was fastest at 1,024 tokens x batch 32,
# 4,096 x 2 and 16,384 x 1, so the query / key block sizes are large and the
# examples per block (`batch_block`) are chosen to stay under BLOCK_SCORES.
# Other sizes: functools.partial(chunked_attention, query_block=..., ...).
QUERY_BLOCK = 1024
KEY_BLOCK = 512
BLOCK_SCORES = 4 * 2**20
# Blocks are rounded up to a multiple of this (SIMD-friendly row counts).
_BLOCK_MULTIPLE = 8


def _blocking(length: int, block: int) -> tuple[int, int]:
  """(block size, number of blocks) covering `length` with little padding.

  `block` is an upper bound: the length is cut into ceil(length / block)
  equal blocks, rounded up to a multiple of 8 where that stays <= block. So
  1,025 tokens (32x32 pixels + [CLS]) with block 256 become 5 blocks of 208
  (1,040 rows), not 5 x 256 = 1,280 rows of which 255 are padding.
  """
  count = -(-length // block)
  size = -(-length // count)
  rounded = -(-size // _BLOCK_MULTIPLE) * _BLOCK_MULTIPLE
  return (rounded if rounded <= block else size), count


def _to_blocks(x, count: int, size: int):
  """[B, L, H, D] -> [count, B, H, size, D], zero-padding L to count * size."""
  batch, length, heads, dim = x.shape
  x = jnp.pad(x, ((0, 0), (0, count * size - length), (0, 0), (0, 0)))
  return x.reshape(batch, count, size, heads, dim).transpose(1, 0, 3, 2, 4)


def _from_blocks(x, length: int):
  """[count, B, H, size, D] -> [B, length, H, D], dropping the padded rows."""
  count, batch, heads, size, dim = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(batch, count * size, heads, dim)[:, :length]


def _key_fill(key_mask, key_length: int, count: int, size: int, batch: int):
  """What replaces the logits of keys that may not be attended, per key block.

  None when every key is attended (no mask, no padding). Otherwise (keep,
  fill), both [count, B, size]: a logit is kept where `keep`, else replaced
  by `fill`. Padded keys get -inf (never attended). Masked keys get -inf too,
  except in an example whose keys are ALL masked: there they get 0, so the
  softmax is uniform over the real keys, exactly what `xla_attention` does
  (its finfo.min logits are all equal), and no row divides by zero.
  """
  padded = count * size
  if key_mask is None and padded == key_length:
    return None
  real = jnp.arange(padded) < key_length
  if key_mask is None:
    keep = jnp.broadcast_to(real, (batch, padded))
    fill = jnp.full((batch, padded), -jnp.inf, jnp.float32)
  else:
    keep = jnp.pad(key_mask, ((0, 0), (0, padded - key_length)))
    nothing_kept = ~key_mask.any(axis=1, keepdims=True)
    fill = jnp.where(real & nothing_kept, 0.0, -jnp.inf).astype(jnp.float32)
  to_blocks = lambda x: x.reshape(batch, count, size).swapaxes(0, 1)
  return to_blocks(keep), to_blocks(fill)


def _block_logits(q_block, k_block, key_fill):
  """[B, H, bq, bk] float32 logits of one (query block, key block) pair."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q_block, k_block, preferred_element_type=jnp.float32)
  if key_fill is not None:
    keep, fill = key_fill
    logits = jnp.where(keep[:, None, None, :], logits, fill[:, None, None, :])
  return logits


def _prepare(q, k, v, key_mask, query_block, key_block):
  """Scaled, padded, blocked q / k / v and the key fill (shared by fwd and bwd)."""
  batch, query_length, _, dim = q.shape
  key_length = k.shape[1]
  q_size, q_count = _blocking(query_length, query_block)
  k_size, k_count = _blocking(key_length, key_block)
  # Scale q before the product, in its own dtype, as `xla_attention` does.
  q_blocks = _to_blocks(q * dim**-0.5, q_count, q_size)
  k_blocks = _to_blocks(k, k_count, k_size)
  v_blocks = _to_blocks(v, k_count, k_size)
  key_fill = _key_fill(key_mask, key_length, k_count, k_size, batch)
  return q_blocks, k_blocks, v_blocks, key_fill


def _split_batch(x, group: int):
  """[B, ...] -> [B / group, group, ...] (None stays None)."""
  return None if x is None else x.reshape(x.shape[0] // group, group, *x.shape[1:])


def _merge_batch(x):
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _chunked_forward(q, k, v, key_mask, query_block, key_block, batch_block):
  """Output [B, Lq, H, D] and log-sum-exp [B / batch_block, q blocks,
  batch_block, H, block] (float32); the batch groups run one after another."""
  out, lse = lax.map(
    lambda xs: _forward_group(*xs, query_block, key_block),
    tuple(_split_batch(x, batch_block) for x in (q, k, v, key_mask)),
  )
  return _merge_batch(out), lse


def _forward_group(q, k, v, key_mask, query_block, key_block):
  """_chunked_forward for one batch group: lse is [q blocks, B, H, block]."""
  q_blocks, k_blocks, v_blocks, key_fill = _prepare(q, k, v, key_mask, query_block, key_block)
  _, batch, heads, q_size, dim = q_blocks.shape

  def one_query_block(q_block):
    def one_key_block(stats, xs):
      k_block, v_block, block_fill = xs
      logits = _block_logits(q_block, k_block, block_fill)
      return core.online_softmax_merge(stats, logits, v_block), None

    stats, _ = lax.scan(
      one_key_block,
      core.online_softmax_initial(batch, heads, q_size, dim),
      (k_blocks, v_blocks, key_fill),
    )
    # Fully masked rows have a max of 0 (their fill); padded query rows are
    # dropped by _from_blocks.
    out, lse = core.online_softmax_finish(stats)
    return out.astype(q.dtype), lse

  out_blocks, lse = lax.map(one_query_block, q_blocks)
  return _from_blocks(out_blocks, q.shape[1]), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked(q, k, v, key_mask, query_block, key_block, batch_block):
  return _chunked_forward(q, k, v, key_mask, query_block, key_block, batch_block)[0]


def _chunked_fwd(q, k, v, key_mask, query_block, key_block, batch_block):
  out, lse = _chunked_forward(q, k, v, key_mask, query_block, key_block, batch_block)
  # Named so a remat policy can keep them (vit.REMAT_POLICIES['dots']): then
  # the backward pass does not run the attention forward again.
  out, lse = (checkpoint_name(x, name) for x, name in zip((out, lse), core.REMAT_SAVEABLE_NAMES))
  # O(length) residuals: the inputs, the output and one float per query row.
  # The probabilities are recomputed block by block in the backward pass.
  return out, (q, k, v, key_mask, out, lse)


def _chunked_bwd(query_block, key_block, batch_block, residuals, d_out):
  """FlashAttention-2 backward: P = exp(S - lse), dS = P * (dP - rowsum(dO * O))."""
  q, k, v, key_mask, out, lse = residuals
  split = lambda x: _split_batch(x, batch_block)
  dq, dk, dv = lax.map(
    lambda xs: _backward_group(query_block, key_block, *xs),
    (split(q), split(k), split(v), split(key_mask), split(out), lse, split(d_out)),
  )
  # The key mask is boolean: it has no cotangent.
  return _merge_batch(dq), _merge_batch(dk), _merge_batch(dv), None


def _backward_group(query_block, key_block, q, k, v, key_mask, out, lse, d_out):
  """_chunked_bwd for one batch group: (dq, dk, dv)."""
  q_blocks, k_blocks, v_blocks, key_fill = _prepare(q, k, v, key_mask, query_block, key_block)
  q_count, batch, heads, q_size, dim = q_blocks.shape
  k_size = k_blocks.shape[3]
  do_blocks = _to_blocks(d_out, q_count, q_size)
  delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True)
  delta_blocks = _to_blocks(delta, q_count, q_size)[..., 0]  # [q blocks, B, H, bq]

  def one_key_block(dq, xs):
    k_block, v_block, block_fill = xs

    def one_query_block(carry, ys):
      dk, dv = carry
      q_block, do_block, lse_block, delta_block = ys
      probs = jnp.exp(_block_logits(q_block, k_block, block_fill) - lse_block[..., None])
      dv = dv + jnp.einsum(
        "bhqk,bhqd->bhkd", probs.astype(d_out.dtype), do_block, preferred_element_type=jnp.float32
      )
      d_probs = jnp.einsum("bhqd,bhkd->bhqk", do_block, v_block, preferred_element_type=jnp.float32)
      d_logits = probs * (d_probs - delta_block[..., None])
      if block_fill is not None:  # a replaced logit does not depend on q or k
        keep = block_fill[0]
        d_logits = jnp.where(keep[:, None, None, :], d_logits, 0.0)
      dk = dk + jnp.einsum(
        "bhqk,bhqd->bhkd", d_logits.astype(q.dtype), q_block, preferred_element_type=jnp.float32
      )
      dq_part = jnp.einsum(
        "bhqk,bhkd->bhqd", d_logits.astype(k.dtype), k_block, preferred_element_type=jnp.float32
      )
      return (dk, dv), dq_part

    zeros = jnp.zeros((batch, heads, k_size, dim), jnp.float32)
    (dk, dv), dq_parts = lax.scan(
      one_query_block, (zeros, zeros), (q_blocks, do_blocks, lse, delta_blocks)
    )
    return dq + dq_parts, (dk, dv)

  dq, (dk, dv) = lax.scan(
    one_key_block, jnp.zeros(q_blocks.shape, jnp.float32), (k_blocks, v_blocks, key_fill)
  )
  # The logits were built from q * scale: the chain rule brings the scale back.
  dq = _from_blocks(dq * dim**-0.5, q.shape[1]).astype(q.dtype)
  dk = _from_blocks(dk, k.shape[1]).astype(k.dtype)
  dv = _from_blocks(dv, v.shape[1]).astype(v.dtype)
  return dq, dk, dv


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _batch_group(batch: int, limit: int) -> int:
  """The largest divisor of `batch` that is <= limit (at least 1)."""
  return max(d for d in range(1, min(batch, max(limit, 1)) + 1) if batch % d == 0)


def chunked_attention(
  q,
  k,
  v,
  key_mask=None,
  *,
  query_block: int = QUERY_BLOCK,
  key_block: int = KEY_BLOCK,
  batch_block: int | None = None,
):
  """Blockwise online-softmax ("flash") attention; memory linear in length.

  The forward pass loops over query blocks and, inside, over key blocks,
  keeping a running max, sum and weighted-value accumulator per query row
  (all float32, whatever the input dtype). Only q, k, v, the output and the
  per-row log-sum-exp are saved for the backward pass, which recomputes each
  block's probabilities from them. No [length, length] array ever exists.

  `query_block` / `key_block` are upper bounds on the block sizes; lengths
  that they do not divide are padded inside (padded keys are never attended,
  padded query rows are dropped). Keys may be fewer or more than queries.
  Examples are processed `batch_block` at a time (the largest divisor of the
  batch not above it); None picks as many as keep a block's scores under
  BLOCK_SCORES. Under a mesh each device runs its own examples and heads
  (`core.per_device`).

  Matches `xla_attention` (float32: to rounding) including where a key_mask
  masks every key of an example: the output is then the mean of that
  example's values, as the softmax over equal finfo.min logits gives, and the
  gradients w.r.t. q and k are zero. Works under jit, grad, remat and scan.
  """
  core.check_qkv("chunked", q, k, v, self_attention=False)
  for name, block, default in (
    ("query_block", query_block, QUERY_BLOCK),
    ("key_block", key_block, KEY_BLOCK),
    ("batch_block", batch_block, None),
  ):
    if block is None and default is None:
      continue
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
      raise ValueError(
        f"chunked attention: {name}={block!r} must be a positive integer (default {default})."
      )
  key_mask = core.check_key_mask("chunked", key_mask, k)

  def local(q, k, v, key_mask):  # one device's examples and heads
    batch, heads = q.shape[0], q.shape[2]
    group = batch_block
    if group is None:
      scores = heads * _blocking(q.shape[1], query_block)[0] * _blocking(k.shape[1], key_block)[0]
      group = BLOCK_SCORES // scores
    return _chunked(q, k, v, key_mask, query_block, key_block, _batch_group(batch, group))

  return core.per_device(local, q, k, v, key_mask)
