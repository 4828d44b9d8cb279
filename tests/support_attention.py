"""Helpers the attention tests share (tests/test_attention.py,
tests/test_splash_attention.py): q/k/v inputs, and the check that a backend
matches `xla_attention` in its output and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from pixel_vit.models import attention

# float32 tolerances of chunked vs xla: the blockwise sums only reorder
# float32 additions (measured max differences ~1e-6).
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def qkv(seed: int, batch=2, length=37, heads=3, head_dim=16, key_length=None, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  key_length = length if key_length is None else key_length
  shapes = [(batch, length, heads, head_dim)] + 2 * [(batch, key_length, heads, head_dim)]
  return [jax.random.normal(k, s).astype(dtype) for k, s in zip(keys, shapes)]


def cotangent(out):
  """Weights that make every output element's gradient different."""
  return jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape).astype(out.dtype)


def loss_of(fn, key_mask=None):
  """The scalar whose gradient `output_and_grads` returns: sum(out * cotangent)."""

  def loss(q, k, v):
    out = fn(q, k, v, key_mask=key_mask)
    return (out.astype(jnp.float32) * cotangent(out).astype(jnp.float32)).sum()

  return loss


def output_and_grads(fn, q, k, v, key_mask=None):
  """fn's output and the gradients of `loss_of(fn)` w.r.t. q, k, v, in one
  jitted call (eager scans re-trace their bodies on every call: slow)."""

  def run(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, key_mask=key_mask), q, k, v)
    return out, vjp(cotangent(out))

  return jax.jit(run)(q, k, v)


def assert_matches_xla(fn, q, k, v, key_mask=None, out_tol=OUT_TOL, grad_tol=GRAD_TOL):
  """Output and d/dq, d/dk, d/dv of `fn` equal xla_attention's (finite, too)."""
  got, grads = output_and_grads(fn, q, k, v, key_mask)
  want, wants = output_and_grads(attention.xla_attention, q, k, v, key_mask)
  assert got.shape == want.shape and got.dtype == want.dtype
  assert np.isfinite(np.asarray(got, np.float32)).all()
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **out_tol)
  for name, g, w in zip("qkv", grads, wants):
    assert g.dtype == w.dtype, name
    assert np.isfinite(np.asarray(g, np.float32)).all(), name
    np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=f"d/d{name}", **grad_tol
    )
