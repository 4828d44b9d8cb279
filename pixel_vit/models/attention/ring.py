"""Ring attention: self-attention sequence-parallel over the `seq` mesh axis.

Pixel tokens make sequences long (1,025 for 32x32 + [CLS], 16,384 for
128x128); ring attention splits them over devices. Each device of the mesh
axis that the logical `length` axis maps to (`seq` with the config's rules)
holds one contiguous block of the queries, keys and values. The key / value
blocks (and their key-mask block) travel around the ring with `lax.ppermute`:
after `seq` steps every query block has met every key block, and an online
softmax (running max, sum and weighted-value accumulator, all float32) has
merged their contributions. No device ever holds the whole sequence's keys or
a [length, length] score matrix: per device the scores are [length/seq]^2.

The backend has the signature of the others in `attention/` (q, k, v
[batch, length, heads, head_dim], optional boolean key_mask [batch,
key_length]) and reads the mesh and the logical-axis rules that
`parallel.activate` put in effect, so the model code does not change:
`config.model.attention='ring'` plus `config.mesh.seq > 1`.

- Batch and heads are split as the rules say too (`batch` -> data, fsdp;
  `heads` -> tensor); a dimension that its mesh axes do not divide is left
  whole on each device (correct, only less parallel); the layout is
  `parallel.ring_layout`.
- A length that `seq` does not divide (the encoder's [CLS] makes it N + 1;
  the MAE encoder sees the visible tokens + [CLS]) is padded inside to the
  next multiple: padded keys are never attended, padded queries are dropped.
- Without a mesh, or when the length axis is not split (seq = 1), it is
  `xla_attention` exactly.

Gradients come from autodiff through `shard_map`, `ppermute` and `scan`
(ppermute transposes to the reverse ring). Each ring step is rematerialised,
so the backward pass keeps only the per-step key / value blocks and the
running statistics (O(length) per device), recomputing the block scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd
from jax import lax

from pixel_vit import parallel
from pixel_vit.models.attention import core


def _ring_body(q, k, v, keep, fill, *, ring: tuple[str, ...], ring_size: int):
  """Per-device ring attention on local blocks (inside shard_map).

  q, k, v: [b, l, h, d] local blocks; keep: [b, l] bool (key may be attended);
  fill: [b, l] float32, the logit that replaces a non-kept key's (finfo.min
  for a masked key, as xla_attention; -inf for a padded one, never attended).
  """
  batch, length, heads, dim = q.shape
  q = q * dim**-0.5  # scaled in its own dtype before the product, as xla_attention
  axis = ring if len(ring) > 1 else ring[0]
  # Device i sends its key / value block to device i + 1; after step s device i
  # holds the block that started on device i - s. Order does not matter
  # without a causal mask: the online softmax is order-free (up to rounding).
  perm = [(i, (i + 1) % ring_size) for i in range(ring_size)]

  # Rematerialised: the backward pass recomputes one step's scores from the
  # saved blocks instead of keeping [l, l] probabilities for every step.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def merge_block(stats, k, v, keep, fill):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(keep[:, None, None, :], logits, fill[:, None, None, :])
    return core.online_softmax_merge(stats, logits, v, values_layout="bkhd")

  def step(carry, _):
    stats, blocks = carry
    stats = merge_block(stats, *blocks)
    blocks = tuple(lax.ppermute(x, axis, perm) for x in blocks)
    return (stats, blocks), None

  # Masked keys carry finfo.min (a row with all keys masked: uniform over the
  # real keys, as xla_attention), padded keys -inf (never attended).
  stats = core.online_softmax_initial(batch, heads, length, dim)
  # Under shard_map the statistics vary across devices like the blocks do;
  # constants must say so before they can be a scan carry.
  varying = set().union(*(jax.typeof(x).manual_axis_type.varying for x in (q, k, v, keep, fill)))
  varying = tuple(sorted(varying))
  if varying:
    stats = tuple(lax.pcast(s, varying, to="varying") for s in stats)
  blocks = (k, v, keep, fill)
  # ring_size - 1 steps that pass the blocks on, then the last block in place.
  (stats, blocks), _ = lax.scan(step, (stats, blocks), None, length=ring_size - 1)
  out, _ = core.online_softmax_finish(merge_block(stats, *blocks))
  return out.transpose(0, 2, 1, 3).astype(q.dtype)


def ring_attention(q, k, v, key_mask=None):
  """Sequence-parallel attention over the mesh axis that `length` maps to.

  q, k, v: [batch, length, heads, head_dim] (one dtype); key_mask: optional
  boolean [batch, length], True = attend. Self-attention: q, k and v have one
  length (it is split into the ring's blocks). Under `parallel.activate` with
  a `seq` axis of size > 1 this runs a shard_map ring; otherwise it is
  `xla_attention`. Matches `xla_attention` in float32 to rounding, including
  gradients and examples whose keys are all masked.
  """
  core.check_qkv("ring", q, k, v, self_attention=True)
  key_mask = core.check_key_mask("ring", key_mask, k)

  mesh = jax.sharding.get_abstract_mesh()
  rules = flax_spmd.get_logical_axis_rules()
  if mesh.empty:
    return core.xla_attention(q, k, v, key_mask)
  unknown = [
    name
    for entry in parallel.logical_to_spec(parallel.QKV_AXES, rules)
    for name in parallel.spec_entry_axes(entry)
    if name not in mesh.shape
  ]
  if unknown:
    raise ValueError(
      f"ring attention: the logical-axis rules map q / k / v to mesh axes "
      f"{unknown} that the active mesh {dict(mesh.shape)} lacks; use "
      "parallel.activate(mesh, config.sharding_rules)."
    )
  qkv_spec, mask_spec, ring, ring_size = parallel.ring_layout(q.shape, mesh, rules)
  if ring_size == 1:
    return core.xla_attention(q, k, v, key_mask)

  batch, length = q.shape[:2]
  padded = -(-length // ring_size) * ring_size
  real = jnp.arange(padded) < length
  if key_mask is None:
    keep = jnp.broadcast_to(real, (batch, padded))
  else:
    keep = jnp.pad(key_mask, ((0, 0), (0, padded - length)))
  # Masked real keys get finfo.min (xla_attention's value), padded keys -inf.
  fill = jnp.broadcast_to(
    jnp.where(real, jnp.finfo(jnp.float32).min, -jnp.inf), (batch, padded)
  ).astype(jnp.float32)
  if padded != length:
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))

  body = functools.partial(_ring_body, ring=ring, ring_size=ring_size)
  out = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(qkv_spec, qkv_spec, qkv_spec, mask_spec, mask_spec),
    out_specs=qkv_spec,
  )(q, k, v, keep, fill)
  return out[:, :length]
