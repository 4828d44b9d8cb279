"""`ring` attention equals `xla` attention, in values and gradients, on the 8
fake CPU devices: sequence-split over `seq` (4 or 8 ways), with the batch over
`data` and the heads over `tensor` as the config's rules say, with and without
key masks, at lengths the ring divides and at lengths it pads (N + 1 with
[CLS]); without a mesh it is `xla` exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pixel_vit import configuration, parallel
from pixel_vit.models import attention
from pixel_vit.models.attention import ring as ring_attention
from support import record_first_shapes

RULES = configuration.SHARDING_RULES
QKV = ("batch", "length", "heads", "kv")
MESHES = {
  "data2_seq4": dict(data=2, fsdp=1, seq=4, tensor=1),
  "seq8": dict(data=1, fsdp=1, seq=8, tensor=1),
  "seq4_tensor2": dict(data=1, fsdp=1, seq=4, tensor=2),
}


def make_mesh(layout: dict):
  return parallel.make_mesh(ml_collections.ConfigDict(layout))


def inputs(length: int, *, masked: bool, batch: int = 4, heads: int = 4, dim: int = 8):
  keys = jax.random.split(jax.random.key(length), 4)
  q, k, v = (jax.random.normal(key, (batch, length, heads, dim), jnp.float32) for key in keys[:3])
  mask = None
  if masked:
    mask = jax.random.bernoulli(keys[3], 0.6, (batch, length))
    mask = mask.at[1].set(False)  # an example with every key masked
  return q, k, v, mask


def loss_and_grads(backend, q, k, v, mask):
  """Output and d(loss)/d(q, k, v) of a non-linear loss, jitted; under a mesh
  the inputs are constrained as MultiHeadAttention constrains them."""

  def loss(q, k, v):
    q, k, v = (parallel.constrain(x, QKV) for x in (q, k, v))
    out = backend(q, k, v, mask)
    return jnp.sum(out * jnp.sin(out)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def assert_close(actual, desired, what):
  np.testing.assert_allclose(
    np.asarray(actual), np.asarray(desired), rtol=1e-5, atol=1e-5, err_msg=what
  )


def record_local_shapes(monkeypatch) -> list:
  """Records the q block shape each device's ring body sees while tracing."""
  return record_first_shapes(monkeypatch, ring_attention, "_ring_body")


def test_registered_as_backend():
  assert attention.get_backend("ring") is ring_attention.ring_attention


@pytest.mark.parametrize("masked", [False, True])
def test_without_a_mesh_is_xla(masked):
  q, k, v, mask = inputs(17, masked=masked)
  np.testing.assert_array_equal(
    ring_attention.ring_attention(q, k, v, mask), attention.xla_attention(q, k, v, mask)
  )


def test_seq_size_one_is_xla(monkeypatch):
  seen = record_local_shapes(monkeypatch)
  q, k, v, mask = inputs(17, masked=True)
  with parallel.activate(make_mesh(dict(data=8, fsdp=1, seq=1, tensor=1)), RULES):
    out, _ = loss_and_grads(ring_attention.ring_attention, q, k, v, mask)
  assert not seen  # no shard_map: plain attention
  assert_close(out, attention.xla_attention(q, k, v, mask), "seq=1")


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("length", [64, 33], ids=["divisible", "padded"])
@pytest.mark.parametrize("layout", list(MESHES))
def test_ring_equals_xla(layout, length, masked, monkeypatch):
  q, k, v, mask = inputs(length, masked=masked)
  want_out, want_grads = loss_and_grads(attention.xla_attention, q, k, v, mask)
  seen = record_local_shapes(monkeypatch)
  mesh = make_mesh(MESHES[layout])
  with parallel.activate(mesh, RULES):
    out, grads = loss_and_grads(ring_attention.ring_attention, q, k, v, mask)
    hlo = jax.jit(ring_attention.ring_attention).lower(q, k, v, mask).compile().as_text()
  assert_close(out, want_out, f"{layout} output")
  for name, got, want in zip("qkv", grads, want_grads):
    assert_close(got, want, f"{layout} d/d{name}")

  # Each device really held one contiguous block of the (padded) sequence,
  # its share of the batch and heads, and blocks went round the ring.
  sizes = MESHES[layout]
  padded = -(-length // sizes["seq"]) * sizes["seq"]
  assert seen and set(seen) == {
    (4 // sizes["data"], padded // sizes["seq"], 4 // sizes["tensor"], 8)
  }, seen
  assert "collective-permute" in hlo
  # The output comes back sequence-sharded like q (when the length divides).
  if length % sizes["seq"] == 0:
    assert out.sharding.spec[1] == "seq", out.sharding


def test_indivisible_batch_and_heads_are_kept_whole(monkeypatch):
  """3 heads on tensor=2 and a batch of 3 on data=2: those dimensions stay
  whole on each device (shard_map needs even blocks); the sequence is still
  split, and the numbers still match."""
  seen = record_local_shapes(monkeypatch)
  q, k, v, mask = inputs(20, masked=True, batch=3, heads=3)
  with parallel.activate(make_mesh(dict(data=2, fsdp=1, seq=2, tensor=2)), RULES):
    out, grads = loss_and_grads(ring_attention.ring_attention, q, k, v, mask)
  want_out, want_grads = loss_and_grads(attention.xla_attention, q, k, v, mask)
  assert set(seen) == {(3, 10, 3, 8)}, seen
  assert_close(out, want_out, "output")
  for got, want in zip(grads, want_grads):
    assert_close(got, want, "grads")


def test_bfloat16_inputs_give_bfloat16_close_to_xla():
  q, k, v, mask = (
    x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in inputs(32, masked=True)
  )
  with parallel.activate(make_mesh(MESHES["data2_seq4"]), RULES):
    out = jax.jit(ring_attention.ring_attention)(q, k, v, mask)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(out, np.float32),
    np.asarray(attention.xla_attention(q, k, v, mask), np.float32),
    atol=3e-2,
  )


@pytest.mark.parametrize(
  "bad, message",
  [
    (dict(k_length=7), "one shape"),
    (dict(mask_dtype=jnp.int32), "key_mask must be boolean"),
    (dict(v_dtype=jnp.bfloat16), "one dtype"),
  ],
)
def test_bad_inputs_are_rejected(bad, message):
  q, k, v, _ = inputs(8, masked=False)
  if "k_length" in bad:
    k = k[:, : bad["k_length"]]
  mask = jnp.ones(q.shape[:2], bad.get("mask_dtype", jnp.bool_))
  v = v.astype(bad.get("v_dtype", jnp.float32))
  with pytest.raises(ValueError, match=message):
    ring_attention.ring_attention(q, k, v, mask)


def test_rules_naming_axes_the_mesh_lacks_are_rejected():
  q, k, v, _ = inputs(8, masked=False)
  rules = (("batch", "data"), ("length", "sequence"), ("heads", None), ("kv", None))
  with parallel.activate(make_mesh(MESHES["seq8"]), rules):
    with pytest.raises(ValueError, match="lacks"):
      ring_attention.ring_attention(q, k, v)
