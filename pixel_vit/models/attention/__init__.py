"""Attention backends: the same multi-head attention computed different ways.

Every backend takes q, k, v of shape [batch, length, heads, head_dim] and an
optional boolean key mask [batch, key_length] (True = attend) and returns
[batch, length, heads, head_dim]. They agree numerically; the model picks one
by name from the config (`get_backend`), so the choice is validated before
anything compiles (`validate`).

- `xla` (core.py): plain einsum + softmax, the reference the others match;
- `dot_product` (dot_product.py): `jax.nn.dot_product_attention`;
- `chunked` (chunked.py): blockwise online-softmax ("flash") attention with a
  custom VJP, memory linear in the sequence length;
- `ring` (ring.py): splits the tokens over the `seq` mesh axis;
- `splash` (splash.py): the TPU Pallas flash kernel;
- `auto` (here): picks one of them per call from the platform, the length and
  the mesh (`choose_backend`).

This module is the registry: backends import only `core` (and
`pixel_vit.parallel` / `pixel_vit.hardware`), never this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd

from pixel_vit import hardware, parallel
from pixel_vit.config_checks import require
from pixel_vit.models.attention.chunked import (
  BLOCK_SCORES,
  KEY_BLOCK,
  QUERY_BLOCK,
  chunked_attention,
)
from pixel_vit.models.attention.core import REMAT_SAVEABLE_NAMES, AttentionFn, xla_attention
from pixel_vit.models.attention.dot_product import dot_product_attention
from pixel_vit.models.attention.ring import ring_attention
from pixel_vit.models.attention.splash import padded_blocking, splash_attention, splash_kernel

__all__ = [
  "AttentionFn",
  "BACKENDS",
  "BLOCK_SCORES",
  "CHUNKED_FROM_LENGTH",
  "KEY_BLOCK",
  "QUERY_BLOCK",
  "REMAT_SAVEABLE_NAMES",
  "auto_attention",
  "choose_backend",
  "chunked_attention",
  "dot_product_attention",
  "get_backend",
  "remat_saved_bytes",
  "ring_attention",
  "splash_attention",
  "validate",
  "xla_attention",
]

# `chunked` is used from this many keys on, `xla` below. Measured on the
# 2-core CPU (benchmarks/attention.py, fwd+bwd, 3 heads x 64, ~64K tokens a
# batch): chunked vs xla 0.90x at 65 tokens, 1.31x at 129, 1.90x at 257.
CHUNKED_FROM_LENGTH = 128
_HALF_PRECISION = (jnp.bfloat16, jnp.float16)


def choose_backend(
  *, platform: str, length: int, dtype, seq_shards: int = 1, self_attention: bool = True
) -> str:
  """The backend `auto` runs: a pure function of what it depends on.

  - keys other than the queries (cross-attention): `chunked` or `xla` by
    length (`ring` and `splash` take self-attention only);
  - tokens split over a `seq` mesh axis: `ring` (every other backend would
    gather the whole sequence onto each device);
  - TPU: `splash`, the Pallas flash kernel;
  - GPU in bfloat16 / float16: `dot_product` (cuDNN flash attention);
  - otherwise `chunked` from CHUNKED_FROM_LENGTH keys on (flash-style,
    memory linear in length), `xla` for shorter sequences.
  """
  by_length = "chunked" if length >= CHUNKED_FROM_LENGTH else "xla"
  if not self_attention:
    return by_length
  if seq_shards > 1:
    return "ring"
  if platform == "tpu":
    return "splash"
  if platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in map(jnp.dtype, _HALF_PRECISION):
    return "dot_product"
  return by_length


def _seq_shards(q_shape) -> int:
  """How many devices the active mesh splits the token axis over (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return parallel.ring_layout(q_shape, mesh, flax_spmd.get_logical_axis_rules())[3]


def auto_attention(q, k, v, key_mask=None):
  """Runs `choose_backend(...)`'s pick for these shapes, the mesh and the
  platform of the devices compiled for (`hardware.active_target`)."""
  self_attention = k.shape == q.shape
  platform = hardware.active_target().platform
  seq_shards = _seq_shards(q.shape) if self_attention else 1
  name = choose_backend(
    platform=platform,
    length=k.shape[1],
    dtype=q.dtype,
    seq_shards=seq_shards,
    self_attention=self_attention,
  )
  hardware.record_choice(
    "model.attention=auto",
    name,
    f"{'self' if self_attention else 'cross'}-attention over {k.shape[1]} keys in "
    f"{jnp.dtype(q.dtype).name} on {platform}, tokens split {seq_shards} way(s)",
  )
  return BACKENDS[name](q, k, v, key_mask)


def remat_saved_bytes(
  name: str, *, batch: int, length: int, heads: int, head_dim: int, dtype
) -> float:
  """Bytes per token that remat `dots` keeps of backend `name`'s attention
  beyond the projections (`auto` resolved as it will run, for the target):
  the flash backends' named output and log-sum-exp (REMAT_SAVEABLE_NAMES).
  `chunked`: the output and one float32 per head; `splash`: the output and a
  log-sum-exp the kernel keeps broadcast over its 128 lanes in float32, both
  at the length padded to its block (what made MAE PiT-Ti/1 on a v5e need
  18.9 GiB where `dots` was estimated without it); `xla`, `dot_product`,
  `ring`: nothing (their scores are recomputed)."""
  if name == "auto":
    name = choose_backend(
      platform=hardware.active_target().platform,
      length=length,
      dtype=dtype,
      seq_shards=_seq_shards((batch, length, heads, head_dim)),
    )
  out = heads * head_dim * jnp.dtype(dtype).itemsize
  if name == "chunked":
    return out + 4 * heads
  if name == "splash":
    padded = padded_blocking(length)[1]
    return padded / length * (out + 4 * heads * splash_kernel.NUM_LANES)
  return 0.0


BACKENDS: dict[str, AttentionFn] = {
  "xla": xla_attention,
  "dot_product": dot_product_attention,
  "chunked": chunked_attention,
  "ring": ring_attention,
  "splash": splash_attention,
  "auto": auto_attention,
}


def get_backend(name: str) -> AttentionFn:
  if name not in BACKENDS:
    raise ValueError(
      f"config.model.attention={name!r} is not an attention backend; "
      f"choose one of {sorted(BACKENDS)}."
    )
  return BACKENDS[name]


def validate(config, device_count: int, platform: str) -> None:
  """`config.model.attention` against the platform and the mesh's `seq` axis."""
  name = config.model.attention
  seq = dict(zip(parallel.MESH_AXES, parallel.mesh_shape(config.mesh, device_count)))["seq"]
  require(
    name != "splash" or platform == "tpu",
    f"config.model.attention='splash' is the TPU Pallas kernel, but this run's "
    f"platform is {platform!r} (it would run in Pallas interpret mode, orders of "
    "magnitude slower). Use 'auto' (picks the backend for the platform) or 'chunked'.",
  )
  require(
    name != "ring" or seq > 1,
    f"config.model.attention='ring' splits the tokens over the mesh's seq axis, "
    f"which has size {seq} here; set config.mesh.seq > 1, or use 'auto'.",
  )
  require(
    seq == 1 or name in ("ring", "auto"),
    f"config.mesh.seq={seq} splits the tokens over devices, but attention "
    f"{name!r} needs whole sequences on each device (they would be gathered); "
    "use config.model.attention='ring' or 'auto'.",
  )
