"""`splash`: the TPU Pallas flash-attention kernel behind the backend interface.

jax ships "splash attention" (jax.experimental.pallas.ops.tpu.splash_attention),
the blockwise flash kernel MaxText trains with on TPU: it keeps score tiles in
VMEM and never writes a [length, length] array to HBM, forward and backward.
This module adapts it to the signature of the other backends (q, k, v
[batch, length, heads, head_dim], optional boolean key_mask [batch,
key_length]) so encoder, MAE and DiT use it by name.

- The kernel works on one example's [heads, length, head_dim] with lengths a
  multiple of its block size; it is vmapped over the batch, and the length is
  padded to a multiple of the block (128, 256 or 512: whichever pads least).
  Padded keys and masked keys get another segment id than the queries, so
  they are never attended; padded query rows are dropped.
- Under a mesh (`parallel.activate`), the kernel runs inside `shard_map` over
  the axes the logical rules give `batch` and `heads` (`core.per_device`: a
  Pallas call cannot be partitioned by GSPMD); each device holds whole
  sequences.
- Compiled through Mosaic when the target is a TPU (also from a CPU machine
  compiling for compile-only TPU devices, `pixel_vit.compile`); for any
  other target the kernel runs in Pallas interpret mode: slow, exact, and how
  the tests check it against `xla` on CPU. Configuration validation refuses
  `splash` off TPU for training runs.
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from pixel_vit import hardware
from pixel_vit.models.attention import core

# The kernel's tile sizes must divide the (padded) length and be multiples of
# 128 (the TPU lane width); larger tiles are faster when padding allows.
BLOCK_CHOICES = (512, 256, 128)


def padded_blocking(length: int) -> tuple[int, int]:
  """(block, padded length): the block of BLOCK_CHOICES that pads least.

  1,025 tokens (32x32 pixels + [CLS]) -> block 128, 1,152 rows (512 would pad
  to 1,536); 4,096 -> block 512, no padding. Ties go to the larger block.
  """

  def padded(block):
    return -(-length // block) * block

  block = min(BLOCK_CHOICES, key=lambda b: (padded(b), -b))
  return block, padded(block)


@functools.lru_cache(maxsize=32)
def _kernel(length: int, heads: int, block: int, interpret: bool):
  """The splash kernel for one example: full (non-causal) attention.

  Its block-mask tables are concrete arrays, so it is built eagerly, on a
  thread of its own: outside the trace and the mesh that asked for it (JAX
  keeps both per thread), whose devices may be compile-only TPUs
  (pixel_vit.compile) that cannot hold an array. The cached kernel then
  serves any later trace.
  """
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as builder:
    return builder.submit(_make_kernel, length, heads, block, interpret).result()


def _make_kernel(length: int, heads: int, block: int, interpret: bool):
  mask = splash_mask.MultiHeadMask([splash_mask.FullMask((length, length))] * heads)
  sizes = splash_kernel.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  # Its output and log-sum-exp carry a name remat 'dots' keeps (as chunked's),
  # so the backward pass does not run the kernel's forward again.
  return splash_kernel.make_splash_mha(
    mask,
    head_shards=1,
    q_seq_shards=1,
    block_sizes=sizes,
    interpret=interpret,
    residual_checkpoint_name=core.REMAT_SAVEABLE_NAMES[0],
  )


def _local_splash(q, k, v, kv_segments, *, interpret: bool):
  """[B, L, H, D] blocks whose L is already padded -> [B, L, H, D]."""
  length, heads = q.shape[1], q.shape[2]
  kernel = _kernel(length, heads, padded_blocking(length)[0], interpret)
  q_segments = jnp.zeros((length,), jnp.int32)

  def one_example(q, k, v, kv_segments):  # [H, L, D] each
    return kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(q=q_segments, kv=kv_segments))

  to_heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out = jax.vmap(one_example)(to_heads_first(q), to_heads_first(k), to_heads_first(v), kv_segments)
  return to_heads_first(out)


def splash_attention(q, k, v, key_mask=None, *, interpret: bool | None = None):
  """Self-attention with the splash kernel; matches `xla_attention`.

  `interpret` None: compiled when the target (`hardware.active_target`, the
  devices compiled for) is a TPU, Pallas interpret mode elsewhere. Where a
  key_mask masks every key of an example, the output is the mean of that
  example's values, as `xla_attention`'s softmax over equal logits gives (the
  kernel itself needs one attended key per row).
  """
  core.check_qkv("splash", q, k, v, self_attention=True)
  key_mask = core.check_key_mask("splash", key_mask, k)
  batch, length = q.shape[:2]
  if interpret is None:
    interpret = hardware.active_target().platform != "tpu"

  _, padded = padded_blocking(length)
  keep = jnp.ones((batch, length), bool) if key_mask is None else key_mask
  attends_any = keep.any(axis=1)
  # An example without any kept key attends all its keys here; its output is
  # replaced by the mean of its values below.
  keep = keep | ~attends_any[:, None]
  keep = jnp.pad(keep, ((0, 0), (0, padded - length)))
  kv_segments = jnp.where(keep, 0, 1).astype(jnp.int32)
  pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  scale = q.shape[-1] ** -0.5
  q, k, v = (jnp.pad(x, pad) for x in (q * scale, k, v))

  body = functools.partial(_local_splash, interpret=interpret)
  out = core.per_device(body, q, k, v, kv_segments)[:, :length]
  if key_mask is None:
    return out
  mean_values = v[:, :length].mean(axis=1, keepdims=True).astype(out.dtype)
  return jnp.where(attends_any[:, None, None, None], out, mean_values)
