"""`splash` (the TPU Pallas flash kernel, here in Pallas interpret mode on CPU)
and `auto` (the backend chosen per platform, length and mesh).

splash is checked against `xla` in output and q/k/v gradients (float32,
rtol 1e-5 / atol 1e-5 for outputs, rtol 1e-4 / atol 1e-5 for gradients) at
lengths its 128/256/512 blocks do not divide, with masks, with an example
whose keys are all masked, and under a data x tensor mesh (shard_map over
batch and heads); inside the classifier in test_attention.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from support_attention import assert_matches_xla, qkv

from pixel_vit import configuration, parallel
from pixel_vit.models import attention
from pixel_vit.models.attention import splash as splash_attention
from support import record_first_shapes

RULES = configuration.SHARDING_RULES


def test_registered_and_interpreted_off_tpu():
  assert attention.get_backend("splash") is splash_attention.splash_attention
  assert jax.default_backend() == "cpu"  # so the tests below run the kernel interpreted


@pytest.mark.parametrize(
  "length,expected",
  [
    (1, (128, 128)),
    (65, (128, 128)),
    (200, (256, 256)),
    (300, (128, 384)),
    (1025, (128, 1152)),
    (4096, (512, 4096)),
    (16385, (128, 16512)),
    (768, (256, 768)),
  ],
)
def test_block_is_the_one_that_pads_least(length, expected):
  assert splash_attention.padded_blocking(length) == expected


@pytest.mark.parametrize("length", [1, 37, 300])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_splash_matches_xla_with_padding_and_masks(length, masked):
  q, k, v = qkv(length, batch=3, length=length, heads=2, head_dim=32)
  key_mask = None
  if masked:
    key_mask = np.array(jax.random.bernoulli(jax.random.key(length), 0.7, (3, length)))
    key_mask[:, 0] = True  # every example attends at least one key here
  assert_matches_xla(splash_attention.splash_attention, q, k, v, key_mask)


def test_fully_masked_example_is_the_mean_of_values_like_xla():
  q, k, v = qkv(3, batch=2, length=40, heads=2, head_dim=16)
  key_mask = np.ones((2, 40), bool)
  key_mask[1] = False
  assert_matches_xla(splash_attention.splash_attention, q, k, v, key_mask)
  out = splash_attention.splash_attention(q, k, v, key_mask)
  np.testing.assert_allclose(
    out[1], jnp.broadcast_to(v[1].mean(0), out[1].shape), rtol=1e-5, atol=1e-6
  )


def test_under_a_mesh_each_device_runs_whole_sequences_of_its_batch_and_heads(monkeypatch):
  seen = record_first_shapes(monkeypatch, splash_attention, "_local_splash")
  q, k, v = qkv(5, batch=4, length=50, heads=4, head_dim=16)
  key_mask = np.ones((4, 50), bool)
  key_mask[2, 20:] = False
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, seq=1, tensor=2)))

  def constrained(q, k, v, key_mask=None):
    q, k, v = (parallel.constrain(x, ("batch", "length", "heads", "kv")) for x in (q, k, v))
    return splash_attention.splash_attention(q, k, v, key_mask)

  with parallel.activate(mesh, RULES):
    assert_matches_xla(constrained, q, k, v, key_mask)
  # batch 4 over data x fsdp = 4, heads 4 over tensor = 2, length padded to 128.
  assert seen and set(seen) == {(1, 128, 2, 16)}, seen


def test_bad_input_is_rejected():
  q, k, v = qkv(0, length=10)
  with pytest.raises(ValueError, match="self-attention"):
    splash_attention.splash_attention(q, k[:, :5], v[:, :5])
  with pytest.raises(ValueError, match="key_mask must be boolean"):
    splash_attention.splash_attention(q, k, v, np.ones((2, 10), np.int32))


# ---------------------------------------------------------------- auto


@pytest.mark.parametrize(
  "kwargs,expected",
  [
    (dict(platform="cpu", length=65, dtype=jnp.float32), "xla"),
    (dict(platform="cpu", length=attention.CHUNKED_FROM_LENGTH - 1, dtype=jnp.float32), "xla"),
    (dict(platform="cpu", length=attention.CHUNKED_FROM_LENGTH, dtype=jnp.float32), "chunked"),
    (dict(platform="cpu", length=16384, dtype=jnp.bfloat16), "chunked"),
    (dict(platform="tpu", length=65, dtype=jnp.float32), "splash"),
    (dict(platform="tpu", length=4096, dtype=jnp.bfloat16), "splash"),
    (dict(platform="gpu", length=4096, dtype=jnp.bfloat16), "dot_product"),
    (dict(platform="gpu", length=4096, dtype=jnp.float32), "chunked"),
    (dict(platform="gpu", length=65, dtype=jnp.float32), "xla"),
    (dict(platform="tpu", length=4096, dtype=jnp.float32, seq_shards=4), "ring"),
    (dict(platform="cpu", length=65, dtype=jnp.float32, seq_shards=2), "ring"),
    (dict(platform="tpu", length=4096, dtype=jnp.float32, self_attention=False), "chunked"),
  ],
)
def test_choose_backend(kwargs, expected):
  assert attention.choose_backend(**kwargs) == expected


@pytest.mark.parametrize(
  "length,layout,expected",
  [
    (40, None, "xla"),
    (attention.CHUNKED_FROM_LENGTH + 3, None, "chunked"),
    (40, dict(data=2, fsdp=1, seq=4, tensor=1), "ring"),
    (40, dict(data=8, fsdp=1, seq=1, tensor=1), "xla"),
  ],
)
def test_auto_runs_the_chosen_backend_and_matches_xla(monkeypatch, length, layout, expected):
  calls = []
  for name in ("xla", "chunked", "ring"):

    def spy(*args, _fn=attention.BACKENDS[name], _name=name, **kwargs):
      calls.append(_name)
      return _fn(*args, **kwargs)

    monkeypatch.setitem(attention.BACKENDS, name, spy)
  q, k, v = qkv(7, batch=4, length=length, heads=2, head_dim=8)
  if layout is None:
    got = attention.auto_attention(q, k, v)
  else:
    with parallel.activate(parallel.make_mesh(ml_collections.ConfigDict(layout)), RULES):
      got = jax.jit(attention.auto_attention)(q, k, v)
  assert calls[0] == expected, calls
  np.testing.assert_allclose(got, attention.xla_attention(q, k, v), rtol=1e-5, atol=1e-5)
