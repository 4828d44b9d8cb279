"""Attention backends agree with the plain einsum reference; `chunked` also in
its padding / masking / dtype corner cases, under jit, remat and scan, inside
the encoder, and its memory is linear in the sequence length."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from support_attention import GRAD_TOL, assert_matches_xla, loss_of, output_and_grads, qkv

from pixel_vit.models import attention, vit


def chunked(query_block: int, key_block: int, batch_block: int | None = None):
  return functools.partial(
    attention.chunked_attention,
    query_block=query_block,
    key_block=key_block,
    batch_block=batch_block,
  )


# ---------------------------------------------------------------- every backend


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
  np.testing.assert_allclose(
    other(q, k, v, key_mask=key_mask), reference(q, k, v, key_mask=key_mask), rtol=1e-5, atol=1e-5
  )
  for got, want in zip(
    jax.grad(loss(other), argnums=(0, 1, 2))(q, k, v),
    jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v),
  ):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", sorted(attention.BACKENDS))
def test_masked_keys_do_not_contribute(backend):
  q, k, v = qkv(1)
  key_mask = np.ones((2, 37), bool)
  key_mask[:, 30:] = False
  fn = attention.get_backend(backend)
  out = fn(q, k, v, key_mask=key_mask)
  changed = v.at[:, 30:].set(100.0)  # values behind masked keys
  np.testing.assert_allclose(out, fn(q, k, changed, key_mask=key_mask), rtol=0, atol=1e-6)


def test_unknown_backend_is_named():
  with pytest.raises(ValueError, match=r"config\.model\.attention='flash'"):
    attention.get_backend("flash")


def test_config_accepts_every_backend_including_chunked():
  assert {"xla", "dot_product", "chunked"} <= set(attention.BACKENDS)
  for name in attention.BACKENDS:
    vit.validate_model_config(
      ml_collections.ConfigDict(
        dict(
          variant="mu/1",
          posemb="learn",
          pool="cls",
          dtype="float32",
          remat="none",
          attention=name,
          drop_path=0.0,
        )
      )
    )


# ---------------------------------------------------------------- chunked vs xla


# Lengths that blocks of 32 / 64 do not divide (1, 7, 65, 130) and one they do
# (128); several batch x heads shapes; q block != k block; examples one at a
# time (batch_block 1), in groups (2 of 4) or all at once (None: automatic).
@pytest.mark.parametrize(
  "length,query_block,key_block,batch,heads,batch_block",
  [
    (1, 32, 32, 2, 3, None),
    (7, 32, 64, 1, 1, None),
    (65, 32, 32, 3, 2, 1),
    (130, 64, 64, 1, 4, None),
    (130, 32, 64, 4, 1, 2),
    (128, 64, 32, 2, 2, None),
  ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_matches_xla_with_padding_and_masks(
  length, query_block, key_block, batch, heads, batch_block, masked
):
  q, k, v = qkv(length, batch=batch, length=length, heads=heads)
  key_mask = None
  if masked:  # a different pattern per example, including a masked first block
    rng = np.random.default_rng(length)
    key_mask = rng.random((batch, length)) < 0.7
    key_mask[:, -1] = True  # at least one key each (fully masked: its own test)
    key_mask[0, : min(length - 1, key_block + 3)] = False
  assert_matches_xla(chunked(query_block, key_block, batch_block), q, k, v, key_mask)


@pytest.mark.parametrize("query_length,key_length", [(20, 70), (70, 9)])
def test_chunked_cross_attention_lengths(query_length, key_length):
  q, k, v = qkv(3, length=query_length, key_length=key_length)
  key_mask = np.ones((2, key_length), bool)
  key_mask[1, ::3] = False
  assert_matches_xla(chunked(16, 32), q, k, v, key_mask)


def test_chunked_fully_masked_example_is_the_mean_of_values_like_xla():
  """An example whose keys are all masked: xla's softmax over equal finfo.min
  logits is uniform, so the output is the mean of the values; chunked defines
  it the same way (not NaN), with zero gradients for q and k."""
  q, k, v = qkv(4, length=65)
  key_mask = np.ones((2, 65), bool)
  key_mask[1] = False
  fn = chunked(32, 16)  # 65 keys: 5 blocks of 16 (+ padding the mean must skip)
  assert_matches_xla(fn, q, k, v, key_mask)
  out, (dq, dk, _) = output_and_grads(fn, q, k, v, key_mask)
  np.testing.assert_allclose(
    out[1], jnp.broadcast_to(v[1].mean(0), out[1].shape), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_array_equal(dq[1], 0.0)
  np.testing.assert_array_equal(dk[1], 0.0)


def test_chunked_bfloat16_within_bfloat16_tolerance():
  """bfloat16 in and out, float32 accumulation inside. Against xla in bfloat16:
  outputs within 2e-2 and gradients within 5e-2 (a few bf16 ulps at these
  magnitudes, as xla itself rounds logits and weights to bf16). Against the
  float32 result on the same bf16-rounded inputs, chunked's output and
  gradients are at least as close as xla's bfloat16 ones."""
  q, k, v = qkv(5, length=130, dtype=jnp.bfloat16)
  key_mask = np.ones((2, 130), bool)
  key_mask[0, 100:] = False
  fn = chunked(64, 32)
  assert_matches_xla(
    fn, q, k, v, key_mask, out_tol=dict(rtol=2e-2, atol=2e-2), grad_tol=dict(rtol=5e-2, atol=5e-2)
  )
  exact = output_and_grads(
    attention.xla_attention, *(x.astype(jnp.float32) for x in (q, k, v)), key_mask
  )
  got = output_and_grads(fn, q, k, v, key_mask)
  bf16_xla = output_and_grads(attention.xla_attention, q, k, v, key_mask)
  assert got[0].dtype == jnp.bfloat16
  errors = lambda result: [
    float(jnp.abs(x.astype(jnp.float32) - e).max())
    for x, e in zip(jax.tree.leaves(result), jax.tree.leaves(exact))
  ]
  for name, chunked_err, xla_err in zip(["out", "dq", "dk", "dv"], errors(got), errors(bf16_xla)):
    assert chunked_err <= xla_err, (name, chunked_err, xla_err)


def test_chunked_grad_under_jit_remat_and_scan():
  q, k, v = qkv(6, length=65)
  fn = chunked(32, 16)
  want = jax.jit(jax.grad(loss_of(attention.xla_attention), argnums=(0, 1, 2)))(q, k, v)
  got = jax.jit(jax.grad(jax.checkpoint(loss_of(fn)), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **GRAD_TOL)

  def layers(attend, remat):  # two "layers" under lax.scan, as the encoder runs them
    def body(x, scale):
      return x + attend(x * scale, x, x), None

    body = jax.checkpoint(body) if remat else body
    return lambda x: (jax.lax.scan(body, x, jnp.array([0.5, 1.5]))[0] ** 2).sum()

  for remat in (False, True):
    got = jax.jit(jax.grad(layers(fn, remat)))(q)
    want = jax.jit(jax.grad(layers(attention.xla_attention, False)))(q)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# How print_saved_residuals describes the kept output and log-sum-exp: chunked
# names them itself; splash names them inside its jitted kernel call, so they
# are described as that call's outputs.
SAVED_ATTENTION = {
  "chunked": {f"named '{name}'": 1 for name in attention.REMAT_SAVEABLE_NAMES},
  "splash": {"jitted function '_splash_attention'": 2},
}


@pytest.mark.parametrize("backend", sorted(SAVED_ATTENTION))
@pytest.mark.parametrize("policy,keeps_attention", [("dots", True), ("full", False)])
def test_dots_remat_keeps_the_flash_output_and_lse(capsys, backend, policy, keeps_attention):
  """Under remat 'dots' the backward pass reuses chunked's / splash's output
  and log-sum-exp instead of running their forward again; gradients unchanged."""
  q, k, v = qkv(8, length=65)
  weight = jnp.cos(jnp.arange(16.0))
  attend = chunked(32, 16) if backend == "chunked" else attention.get_backend(backend)

  def block(x):
    return (attend(x, x * 0.5, x * 2.0) @ weight).sum()

  remat = jax.checkpoint(block, policy=vit.REMAT_POLICIES[policy])
  jax.ad_checkpoint.print_saved_residuals(remat, q)
  saved = capsys.readouterr().out
  for description, count in SAVED_ATTENTION[backend].items():
    assert saved.count(description) == (count if keeps_attention else 0), saved
  np.testing.assert_allclose(jax.jit(jax.grad(remat))(q), jax.jit(jax.grad(block))(q), **GRAD_TOL)


@pytest.mark.parametrize("backend", ["chunked", "splash"])
def test_vit_classifier_equals_xla(monkeypatch, backend):
  """A whole mu/1 classifier (65 tokens with [CLS]): logits and every parameter
  gradient agree, with the layers under lax.scan and full remat as in
  training. chunked with small blocks, so the encoder really runs several
  padded blocks (the defaults would fit 65 tokens in one); splash (the TPU
  kernel, interpreted here) pads the 65 tokens to its 128 block."""
  monkeypatch.setitem(attention.BACKENDS, "chunked", chunked(32, 16))
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  labels = jnp.array([0, 3, 9])

  def run(backend):
    config = ml_collections.ConfigDict(
      dict(
        variant="mu/1",
        posemb="learn",
        pool="cls",
        dtype="float32",
        attention=backend,
        scan=True,
        remat="full",
        drop_path=0.0,
      )
    )
    model = vit.build_classifier(config, image_size=8, channels=3, num_classes=10, rngs=nnx.Rngs(0))
    model.head_kernel.set_value(jax.random.normal(jax.random.key(7), (64, 10)))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def loss_and_grad(params):
      def loss(params):
        logits = nnx.merge(graphdef, params)(x)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean(), logits

      return jax.value_and_grad(loss, has_aux=True)(params)

    return loss_and_grad(params)

  (loss_c, logits_c), grads_c = run(backend)
  (loss_x, logits_x), grads_x = run("xla")
  np.testing.assert_allclose(logits_c, logits_x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(loss_c, loss_x, rtol=1e-5)
  flat_c, flat_x = nnx.to_flat_state(grads_c), nnx.to_flat_state(grads_x)
  for (path, g), (_, w) in zip(flat_c, flat_x):
    np.testing.assert_allclose(
      g.get_value(), w.get_value(), rtol=1e-3, atol=1e-5, err_msg=str(path)
    )


@pytest.mark.parametrize(
  "length,block,expected",
  [
    (1025, 256, (208, 5)),  # 32x32 pixels + [CLS]: 1,040 rows, not 1,280
    (1025, 1024, (520, 2)),
    (4096, 1024, (1024, 4)),  # divides: no padding
    (7, 32, (8, 1)),  # shorter than a block: one block, rounded up to 8 rows
    (7, 7, (7, 1)),
    (130, 64, (48, 3)),
    (10, 7, (5, 2)),  # rounding to 8 would exceed the block: kept at 5
  ],
)
def test_chunked_blocking_pads_little(length, block, expected):
  size, count = attention.chunked._blocking(length, block)
  assert (size, count) == expected
  assert size <= block and count * size >= length > (count - 1) * size


@pytest.mark.parametrize(
  "batch,limit,expected", [(32, 5, 4), (32, 100, 32), (7, 6, 1), (12, 6, 6), (3, 0, 1)]
)
def test_chunked_batch_group_divides_the_batch(batch, limit, expected):
  assert attention.chunked._batch_group(batch, limit) == expected


# ---------------------------------------------------------------- memory is O(length)


def _has_square(shape, length: int) -> bool:
  return sum(dim >= length for dim in shape) >= 2


def _all_shapes(jaxpr) -> list[tuple]:
  """Shapes of every value in a jaxpr, inside scan / custom_vjp / remat bodies too."""
  shapes = []
  for eqn in jaxpr.eqns:
    shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          shapes += _all_shapes(inner)
  return shapes


def test_chunked_saves_only_linear_residuals():
  """The values jax.vjp keeps for the backward pass (the leaves of the vjp
  function) are O(length): no [.., N, N] array; xla's include one."""
  length = 512
  q, k, v = qkv(7, batch=1, length=length, heads=2)
  for name, fn, quadratic in (
    ("chunked", chunked(64, 64), False),
    ("xla", attention.xla_attention, True),
  ):
    _, vjp_fn = jax.vjp(fn, q, k, v)
    shapes = [x.shape for x in jax.tree.leaves(vjp_fn)]
    assert shapes, name
    assert any(_has_square(s, length) for s in shapes) == quadratic, (name, shapes)
    if not quadratic:
      assert max(np.prod(s) for s in shapes) <= q.size, shapes


def test_chunked_forward_and_backward_never_build_a_square_array():
  length = 512
  q, k, v = qkv(8, batch=1, length=length, heads=2)
  for name, fn, quadratic in (
    ("chunked", chunked(64, 64), False),
    ("xla", attention.xla_attention, True),
  ):
    jaxpr = jax.make_jaxpr(jax.grad(loss_of(fn), argnums=(0, 1, 2)))(q, k, v).jaxpr
    shapes = _all_shapes(jaxpr)
    assert any(_has_square(s, length) for s in shapes) == quadratic, name


def test_chunked_compiled_memory_grows_linearly():
  """XLA's temp buffers for forward + backward at 4x the length: chunked at most
  4x (linear; block-size overhead makes it less), xla about 10x (quadratic)."""

  def temp_bytes(fn, length):
    shape = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    step = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
    return step.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

  fn = chunked(128, 128)
  assert temp_bytes(fn, 2048) <= 4 * temp_bytes(fn, 512)
  assert temp_bytes(attention.xla_attention, 2048) >= 8 * temp_bytes(attention.xla_attention, 512)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "call,message",
  [
    (lambda q, k, v: attention.chunked_attention(q, k, v, key_block=0), r"key_block=0 must be"),
    (lambda q, k, v: attention.chunked_attention(q, k, v, batch_block=0), r"batch_block=0 must be"),
    (
      lambda q, k, v: attention.chunked_attention(q, k, v, query_block=1.5),
      r"query_block=1\.5 must be",
    ),
    (lambda q, k, v: attention.chunked_attention(q[0], k[0], v[0]), r"\[batch, length, heads"),
    (lambda q, k, v: attention.chunked_attention(q, k[:, :, :2], v), r"must share"),
    (
      lambda q, k, v: attention.chunked_attention(q, k, v.astype(jnp.bfloat16)),
      r"cast them to one dtype",
    ),
    (lambda q, k, v: attention.chunked_attention(q[:, :0], k, v), r"at least one query"),
    (
      lambda q, k, v: attention.chunked_attention(q, k, v, key_mask=np.ones((2, 36), bool)),
      r"key_mask must be boolean \[batch, key_length\] = \(2, 37\)",
    ),
    (
      lambda q, k, v: attention.chunked_attention(q, k, v, key_mask=np.ones((2, 37))),
      r"key_mask must be boolean",
    ),
  ],
)
def test_chunked_rejects_bad_input(call, message):
  q, k, v = qkv(9)
  with pytest.raises(ValueError, match=message):
    call(q, k, v)


# ---------------------------------------------------------------- under a mesh


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_runs_each_devices_own_examples_under_a_data_mesh(masked):
  # Batch 16 over data=8, in groups of 2 examples: each device attends over
  # its own 2 examples. Left to GSPMD, chunked's loop over the groups
  # gathered the whole batch onto every device (an all-gather per group)
  # and each device computed all 16.
  from jax.sharding import Mesh

  from pixel_vit import configuration, parallel, program_costs

  rules = configuration.SHARDING_RULES
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1, 1), parallel.MESH_AXES)
  q, k, v = (jnp.tile(x, (8, 1, 1, 1)) for x in qkv(0))  # [16, 37, H, D]
  key_mask = np.ones(q.shape[:2], bool)
  if masked:
    key_mask[1::3, -10:] = False
  key_mask = jnp.asarray(key_mask) if masked else None
  batch = parallel.batch_sharding(mesh, rules, 4)

  def loss(q, k, v):
    return (chunked(16, 8, batch_block=2)(q, k, v, key_mask=key_mask) ** 2).sum()

  with parallel.activate(mesh, rules):
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=(batch,) * 3)
    text = step.lower(q, k, v).compile().as_text()
    value, grads = step(q, k, v)
  kinds = {c.kind for c in program_costs.hlo_traffic(text).collectives}
  assert "all-gather" not in kinds and "all-to-all" not in kinds, kinds
  want_value, want_grads = jax.value_and_grad(
    lambda q, k, v: (attention.xla_attention(q, k, v, key_mask) ** 2).sum(), argnums=(0, 1, 2)
  )(q, k, v)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, **GRAD_TOL)


def test_remat_keeps_the_flash_backends_residuals_and_counts_them():
  # Per token, what remat `dots` keeps of attention beyond the projections.
  shape = dict(batch=8, length=257, heads=3, head_dim=64, dtype=jnp.float32)
  out = 3 * 64 * 4
  assert attention.remat_saved_bytes("xla", **shape) == 0  # scores recomputed
  assert attention.remat_saved_bytes("chunked", **shape) == out + 3 * 4
  # splash: its log-sum-exp over 128 float32 lanes, at 257 tokens padded to 384.
  assert attention.remat_saved_bytes("splash", **shape) == 384 / 257 * (out + 3 * 4 * 128)
  # auto: what it will run for this (CPU) target and length.
  assert attention.remat_saved_bytes("auto", **shape) == attention.remat_saved_bytes(
    "chunked", **shape
  )
