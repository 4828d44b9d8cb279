"""`dot_product`: jax's own fused attention (cuDNN flash attention on GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pixel_vit import hardware

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def dot_product_attention(q, k, v, key_mask=None):
  """`jax.nn.dot_product_attention`: cuDNN flash attention when compiling for
  an NVIDIA GPU in half precision, jax's XLA form otherwise. (jax picks XLA
  when not told, whatever the device: the cuDNN kernel must be asked for.)"""
  mask = None if key_mask is None else key_mask[:, None, None, :]
  target = hardware.active_target()
  cudnn = target.platform == "gpu" and "NVIDIA" in target.device_kind and q.dtype in _CUDNN_DTYPES
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn" if cudnn else None)
