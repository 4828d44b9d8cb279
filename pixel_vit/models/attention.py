"""Attention backends: the same multi-head attention computed different ways.

Every backend takes q, k, v of shape [batch, length, heads, head_dim] and an
optional boolean key mask [batch, key_length] (True = attend) and returns
[batch, length, heads, head_dim]. They agree numerically; the model picks one
by name from the config, so the choice is validated before anything compiles.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]


def xla_attention(q, k, v, key_mask=None):
  """Plain einsum + softmax; softmax in float32 whatever the compute dtype."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def dot_product_attention(q, k, v, key_mask=None):
  """`jax.nn.dot_product_attention`: cuDNN flash attention on GPU when it applies."""
  mask = None if key_mask is None else key_mask[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


BACKENDS: dict[str, AttentionFn] = {
    "xla": xla_attention,
    "dot_product": dot_product_attention,
}


def get_backend(name: str) -> AttentionFn:
  if name not in BACKENDS:
    raise ValueError(
        f"config.model.attention={name!r} is not an attention backend; "
        f"choose one of {sorted(BACKENDS)}.")
  return BACKENDS[name]
