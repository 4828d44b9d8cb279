"""`dot_product`: jax's own fused attention (cuDNN flash attention on GPU)."""
from __future__ import annotations

import jax


def dot_product_attention(q, k, v, key_mask=None):
  """`jax.nn.dot_product_attention`: cuDNN flash attention on GPU when it applies."""
  mask = None if key_mask is None else key_mask[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask)
