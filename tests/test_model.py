"""The ViT / PiT encoder and classifier: tokens, locality, scan/remat, stochastic
depth, logical axes and sharding, mixed precision, variant parsing."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pixel_vit import configuration, hardware, parallel
from pixel_vit.models import vit

IMAGE_SIZE = 8
CHANNELS = 3
NUM_CLASSES = 10


def model_config(**overrides) -> ml_collections.ConfigDict:
  config = dict(
    variant="mu/1",
    posemb="learn",
    pool="cls",
    dtype="float32",
    attention="xla",
    scan=True,
    remat="none",
    drop_path=0.0,
  )
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def build(seed=0, **overrides) -> vit.Classifier:
  return vit.build_classifier(
    model_config(**overrides),
    image_size=IMAGE_SIZE,
    channels=CHANNELS,
    num_classes=NUM_CLASSES,
    rngs=nnx.Rngs(seed),
  )


def randomize_head(model: vit.Classifier, seed=7) -> None:
  """The head is zero-initialised (logits all 0); give it weights so logits
  and gradients depend on the encoder."""
  model.head_kernel.set_value(
    jax.random.normal(jax.random.key(seed), model.head_kernel.get_value().shape)
  )


def images(batch=4, seed=1, size=IMAGE_SIZE, channels=CHANNELS):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


@functools.partial(jax.jit, static_argnames=("graphdef", "features"))
def _apply(graphdef, params, x, key, features):
  model = nnx.merge(graphdef, params)
  return model.features(x, key=key) if features else model(x, key=key)


def logits(model, x, key=None):
  """`model(x, key=key)`, jitted (much faster than eager on CPU), as numpy."""
  graphdef, params = nnx.split(model)
  return np.asarray(_apply(graphdef, params, x, key, False))


def features(model, x, key=None):
  graphdef, params = nnx.split(model)
  return np.asarray(_apply(graphdef, params, x, key, True))


def flat_params(model) -> dict:
  return {
    path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


# ---------------------------------------------------------------- tokens


def test_patchify_1_keeps_pixel_order():
  b, h, w, c = 2, 5, 7, 3  # non-square, so rows and columns cannot be confused
  x = np.arange(b * h * w * c, dtype=np.float32).reshape(b, h, w, c)
  tokens = np.asarray(vit.patchify(jnp.asarray(x), 1))
  assert tokens.shape == (b, h * w, c)
  for i in range(h):
    for j in range(w):
      np.testing.assert_array_equal(tokens[:, i * w + j], x[:, i, j, :])


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_patchify_unpatchify_round_trip(patch):
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 12, 3)))
  tokens = vit.patchify(jnp.asarray(x), patch)
  assert tokens.shape == (2, (8 // patch) * (12 // patch), patch * patch * 3)
  np.testing.assert_array_equal(np.asarray(vit.unpatchify(tokens, patch, 8, 12)), x)


def test_patch2_token_holds_exactly_its_tile():
  b, h, w, c, p = 2, 6, 8, 3, 2
  x = np.arange(b * h * w * c, dtype=np.float32).reshape(b, h, w, c)  # all values distinct
  tokens = np.asarray(vit.patchify(jnp.asarray(x), p))
  grid_w = w // p
  for ti in range(h // p):
    for tj in range(grid_w):
      tile = x[:, ti * p : (ti + 1) * p, tj * p : (tj + 1) * p, :]
      token = tokens[:, ti * grid_w + tj]
      # Same multiset of values, and in (row, col, channel) order within the tile.
      for n in range(b):
        assert sorted(token[n]) == sorted(tile[n].ravel())
      np.testing.assert_array_equal(token, tile.reshape(b, -1))


# ---------------------------------------------------------------- locality


def permute_pixels(x, perm):
  """The same permutation of the H*W positions in every image and channel."""
  b, h, w, c = x.shape
  return x.reshape(b, h * w, c)[:, perm].reshape(b, h, w, c)


@pytest.fixture(scope="module")
def pixel_perm():
  perm = np.random.default_rng(0).permutation(IMAGE_SIZE * IMAGE_SIZE)
  assert (perm != np.arange(perm.size)).sum() > 10
  return perm


@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_no_posemb_is_permutation_invariant(pool, pixel_perm):
  model = build(posemb="none", pool=pool)
  randomize_head(model)
  x = images()
  xp = permute_pixels(x, pixel_perm)
  assert not np.allclose(x, xp)
  f, fp = features(model, x), features(model, xp)
  np.testing.assert_allclose(fp, f, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits(model, xp), logits(model, x), rtol=1e-4, atol=1e-4)
  # Features are informative (not constant), so invariance is not trivial.
  assert np.abs(f[0] - f[1]).max() > 1e-2


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_position_embedding_breaks_permutation_invariance(posemb, pool, pixel_perm):
  model = build(posemb=posemb, pool=pool)
  x = images()
  f = features(model, x)
  fp = features(model, permute_pixels(x, pixel_perm))
  assert np.abs(f - fp).max() > 1e-3


# ---------------------------------------------------------------- scan and remat


@functools.partial(jax.jit, static_argnames="graphdef")
def _loss_and_grads(graphdef, params, x):

  def loss(params):
    return jnp.mean(jnp.square(nnx.merge(graphdef, params)(x)))

  return jax.value_and_grad(loss)(params)


def loss_and_grads(model, x):
  value, grads = _loss_and_grads(*nnx.split(model), x)
  return value, {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}


def assert_grads_close(actual: dict, desired: dict, rtol: float):
  """Per parameter, error relative to that gradient's scale."""
  assert actual.keys() == desired.keys()
  for path in desired:
    scale = max(np.abs(desired[path]).max(), 1e-12)
    np.testing.assert_allclose(
      actual[path], desired[path], rtol=rtol, atol=rtol * scale, err_msg=str(path)
    )


def test_scan_and_unrolled_blocks_agree():
  model = build(dtype="float32")
  randomize_head(model)
  x = images()
  assert model.encoder.blocks.scan
  scanned = logits(model, x)
  scanned_loss, scanned_grads = loss_and_grads(model, x)
  model.encoder.blocks.scan = False
  unrolled = logits(model, x)
  unrolled_loss, unrolled_grads = loss_and_grads(model, x)
  np.testing.assert_allclose(unrolled, scanned, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(unrolled_loss, scanned_loss, rtol=1e-5)
  assert_grads_close(unrolled_grads, scanned_grads, rtol=1e-4)
  assert np.abs(scanned).max() > 1e-2  # a real output, not zeros


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("remat", ["full", "dots", "auto"])
def test_remat_matches_no_remat(remat, scan):
  model = build(scan=scan)
  randomize_head(model)
  x = images()
  assert model.encoder.blocks.remat == "none"
  ref_out = logits(model, x)
  ref_loss, ref_grads = loss_and_grads(model, x)
  model.encoder.blocks.remat = remat
  out = logits(model, x)
  loss, grads = loss_and_grads(model, x)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert_grads_close(grads, ref_grads, rtol=1e-5)
  nonzero = sum(bool(np.abs(g).max() > 0) for g in ref_grads.values())
  assert nonzero == len(ref_grads)  # gradients reach every parameter


def test_auto_remat_keeps_the_matmul_outputs_when_they_fit():
  ti = vit.SIZES["Ti"]
  shape = dict(batch_per_device=32, tokens=1025, dtype=jnp.float32)
  gib = 2**30
  saved = {
    policy: vit.saved_activation_bytes(
      policy,
      batch=shape["batch_per_device"],
      tokens=shape["tokens"],
      width=ti.width,
      mlp_dim=ti.mlp_dim,
      depth=ti.depth,
      dtype_bytes=4,
    )
    for policy in ("none", "dots", "full")
  }
  # PiT-Ti/1 at batch 32: ~5.3 GiB kept with no remat, ~2.5 with dots, 0.28 with full.
  assert saved["none"] > saved["dots"] > saved["full"]
  assert 2.5 * gib < saved["dots"] < 3 * gib
  assert vit.auto_remat(ti, memory_bytes=24 * gib, **shape) == "dots"
  assert vit.auto_remat(ti, memory_bytes=4 * gib, **shape) == "full"
  # Half precision halves what is kept; the per-device batch is what counts.
  assert vit.auto_remat(ti, memory_bytes=6 * gib, **shape) == "full"
  assert vit.auto_remat(ti, memory_bytes=6 * gib, **dict(shape, dtype=jnp.bfloat16)) == "dots"
  assert vit.auto_remat(ti, memory_bytes=24 * gib, **dict(shape, batch_per_device=1024)) == "full"


def test_auto_remat_uses_the_per_device_batch_of_the_active_mesh(monkeypatch):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1, 1), parallel.MESH_AXES)
  rules = configuration.SHARDING_RULES
  assert parallel.batch_shards_active() == 1
  with parallel.activate(mesh, rules):
    assert parallel.batch_shards_active() == 8
  # A device memory that holds `dots` for a batch of 8 but not of 64: the
  # blocks pick `full` for 64 examples on one device, `dots` for 64 over 8.
  blocks = build(remat="auto").encoder.blocks
  size, tokens = vit.SIZES["mu"], IMAGE_SIZE**2
  eight = vit.saved_activation_bytes(
    "dots",
    batch=8,
    tokens=tokens,
    width=size.width,
    mlp_dim=size.mlp_dim,
    depth=size.depth,
    dtype_bytes=4,
  )
  memory = int(2 * eight / vit.REMAT_AUTO_MEMORY_FRACTION)
  monkeypatch.setattr(hardware, "device_memory_bytes", lambda device: memory)
  x = jax.ShapeDtypeStruct((64, tokens, size.width), jnp.float32)
  assert blocks.resolve_remat(x) == "full"
  with parallel.activate(mesh, rules):
    assert blocks.resolve_remat(x) == "dots"


# ---------------------------------------------------------------- stochastic depth


def test_stochastic_depth():
  model = build(drop_path=0.5, pool="gap", posemb="none")
  randomize_head(model)
  x = images(batch=8)
  deterministic = logits(model, x)
  np.testing.assert_array_equal(logits(model, x), deterministic)  # no key: repeatable
  key = jax.random.key(3)
  dropped = logits(model, x, key=key)
  # Some example lost a residual branch, so its logits moved.
  assert np.abs(dropped - deterministic).max() > 1e-3
  # Same key, same drops; another key, other drops.
  np.testing.assert_array_equal(logits(model, x, key=key), dropped)
  assert np.abs(logits(model, x, key=jax.random.key(4)) - dropped).max() > 1e-3
  # Scanned and unrolled blocks draw the same per-layer keys.
  model.encoder.blocks.scan = False
  np.testing.assert_allclose(logits(model, x, key=key), dropped, rtol=1e-5, atol=1e-5)


def test_drop_path_zero_ignores_key():
  model = build(drop_path=0.0)
  randomize_head(model)
  x = images()
  np.testing.assert_array_equal(logits(model, x, key=jax.random.key(3)), logits(model, x))


def test_drop_path_per_example_scaling():
  x = jnp.ones((64, 3, 2))
  y = np.asarray(vit.drop_path(x, jnp.float32(0.25), jax.random.key(0)))
  per_example = y.reshape(64, -1)
  # Each example is either dropped entirely or kept and scaled by 1/keep.
  assert set(np.unique(per_example)) <= {0.0, np.float32(1 / 0.75)}
  assert all(len(np.unique(row)) == 1 for row in per_example)
  assert 0 < (per_example[:, 0] == 0).sum() < 64


# ---------------------------------------------------------------- logical axes


def test_every_parameter_has_logical_axes():
  model = build(pool="cls", posemb="learn")
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert len(flat) > 10
  depth = vit.SIZES["mu"].depth
  for path, variable in flat:
    axes = variable.get_metadata().get("logical_axes")
    value = variable.get_value()
    assert axes is not None, f"{path} has no logical_axes"
    assert len(axes) == value.ndim, f"{path}: axes {axes} for shape {value.shape}"
    if "layers" in path:
      assert axes[0] == "layers" and value.shape[0] == depth, (path, axes, value.shape)
      assert "layers" not in axes[1:]
    else:
      assert "layers" not in axes, (path, axes)
  by_path = {path: v.get_metadata()["logical_axes"] for path, v in flat}
  assert by_path[("encoder", "blocks", "layers", "mlp", "fc1_kernel")] == ("layers", "embed", "mlp")
  assert by_path[("head_kernel",)] == ("embed", "vocab")


def test_param_shardings_on_fsdp_tensor_mesh(cls_pixel):
  mesh_config = ml_collections.ConfigDict(dict(data=-1, fsdp=2, seq=1, tensor=2))
  mesh = parallel.make_mesh(mesh_config, devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "seq": 1, "tensor": 2}
  rules = configuration.SHARDING_RULES

  def make_model():
    return build()

  abstract = nnx.split(nnx.eval_shape(make_model))[1]
  shardings = parallel.param_shardings(abstract, mesh, rules)
  layers = shardings["encoder"]["blocks"]["layers"]
  assert layers["mlp"]["fc1_kernel"].spec == P(None, "fsdp", "tensor")
  assert layers["mlp"]["fc2_kernel"].spec == P(None, "tensor", "fsdp")
  assert layers["attn"]["qkv_kernel"].spec == P(None, "fsdp", None, "tensor", None)
  assert shardings["head_kernel"].spec == P("fsdp", "tensor")
  assert shardings["encoder"]["tokenizer_kernel"].spec == P(None, "fsdp")
  for sharding in jax.tree.leaves(shardings):
    assert sharding.mesh == mesh

  # Created in place with those shardings: each device holds a quarter of fc1.
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(make_model())[1]), out_shardings=shardings)()
  fc1 = params["encoder"]["blocks"]["layers"]["mlp"]["fc1_kernel"]
  assert fc1.sharding.spec == P(None, "fsdp", "tensor")
  assert {s.data.shape for s in fc1.addressable_shards} == {
    (fc1.shape[0], fc1.shape[1] // 2, fc1.shape[2] // 2)
  }
  assert len(fc1.sharding.device_set) == 4
  # Same numbers as an unsharded build.
  np.testing.assert_array_equal(
    np.asarray(fc1), flat_params(build())[("encoder", "blocks", "layers", "mlp", "fc1_kernel")]
  )


# ---------------------------------------------------------------- mixed precision


def test_bfloat16_compute_keeps_float32_params():
  model32 = build(dtype="float32")
  model16 = build(dtype="bfloat16")
  randomize_head(model32)
  randomize_head(model16)
  params32, params16 = flat_params(model32), flat_params(model16)
  for path, value in params16.items():
    assert value.dtype == np.float32, f"{path} is {value.dtype}"
    np.testing.assert_array_equal(value, params32[path])
  x = images()
  assert model16.features(x).dtype == jnp.bfloat16
  logits32, logits16 = logits(model32, x), logits(model16, x)
  assert logits16.dtype == np.float32
  assert np.isfinite(logits16).all()
  scale = np.abs(logits32).max()
  assert scale > 1.0
  error = np.abs(logits16 - logits32).max()
  assert error < 0.05 * scale, (error, scale)
  assert error > 0, "bfloat16 compute gave bitwise float32 logits: dtype not applied"
  np.testing.assert_array_equal(logits16.argmax(-1), logits32.argmax(-1))


# ---------------------------------------------------------------- variants


@pytest.mark.parametrize(
  "variant, size, patch", [("Ti/1", "Ti", 1), ("S/2", "S", 2), ("mu/1", "mu", 1), ("B/16", "B", 16)]
)
def test_parse_variant_accepts(variant, size, patch):
  assert vit.parse_variant(variant) == (vit.SIZES[size], patch)


@pytest.mark.parametrize("variant", ["X/1", "Ti", "Ti/0", "Ti/a", "Ti/-1", "/1", "ti/1", ""])
def test_parse_variant_rejects(variant):
  with pytest.raises(ValueError, match="SIZE/PATCH"):
    vit.parse_variant(variant)


def test_encoder_rejects_patch_not_dividing_image():
  with pytest.raises(ValueError, match="patch size 3 does not divide image size 8"):
    vit.build_classifier(
      model_config(variant="mu/3"), image_size=8, channels=1, num_classes=10, rngs=nnx.Rngs(0)
    )


def test_patch_variant_builds_fewer_tokens():
  model = build(variant="mu/2", pool="gap")
  tokens = model.encoder.tokenize(images())
  assert tokens.shape == (4, (IMAGE_SIZE // 2) ** 2, vit.SIZES["mu"].width)
