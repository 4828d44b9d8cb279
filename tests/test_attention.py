"""Attention backends agree with the plain einsum reference."""
import jax
import numpy as np
import pytest

from pixel_vit.models import attention


def qkv(seed: int, batch=2, length=37, heads=3, head_dim=16):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.normal(k, (batch, length, heads, head_dim)) for k in keys]


@pytest.mark.parametrize("backend", sorted(set(attention.BACKENDS) - {"xla"}))
@pytest.mark.parametrize("masked", [False, True])
def test_backend_matches_xla_in_output_and_gradients(backend, masked):
  q, k, v = qkv(0)
  key_mask = None
  if masked:  # the last 10 keys of the second example are padding
    key_mask = np.ones((2, 37), bool)
    key_mask[1, -10:] = False
  reference, other = attention.get_backend("xla"), attention.get_backend(backend)
  loss = lambda fn: lambda q, k, v: (fn(q, k, v, key_mask=key_mask) ** 2).sum()
  np.testing.assert_allclose(other(q, k, v, key_mask=key_mask),
                             reference(q, k, v, key_mask=key_mask), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(loss(other), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_masked_keys_do_not_contribute():
  q, k, v = qkv(1)
  key_mask = np.ones((2, 37), bool)
  key_mask[:, 30:] = False
  out = attention.xla_attention(q, k, v, key_mask=key_mask)
  changed = v.at[:, 30:].set(100.0)  # values behind masked keys
  np.testing.assert_array_equal(out, attention.xla_attention(q, k, changed, key_mask=key_mask))


def test_unknown_backend_is_named():
  with pytest.raises(ValueError, match=r"config\.model\.attention='flash'"):
    attention.get_backend("flash")
