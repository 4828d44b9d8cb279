"""The paper's locality ablations: pixel permutation, position embeddings as a
config argument, and the 8-bit pixel-value vocabulary tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixel_vit import configuration
from pixel_vit.data import locality, pipeline
from pixel_vit.diffusion import generation
from pixel_vit.models import vit
from pixel_vit.trainers import classification, diffusion, loop, pretrained
from pixel_vit.trainers import state as state_lib
from support import DIT_PIXEL_PATH, REPO_ROOT, load_config_module

# ---------------------------------------------------------------- pixel permutation


def chebyshev(a: int, b: int, width: int) -> int:
  (ra, ca), (rb, cb) = divmod(a, width), divmod(b, width)
  return max(abs(ra - rb), abs(ca - cb))


@pytest.mark.parametrize(
  "height,width,swaps,delta",
  [(16, 16, 500, 1), (16, 16, 2000, 3), (7, 5, 300, 2), (8, 8, 100, 100), (2, 1, 5, 1)],
)
def test_permutation_is_a_permutation_of_swaps_within_delta(height, width, swaps, delta):
  perm = locality.make_permutation(height, width, swaps=swaps, max_distance=delta, seed=3)
  assert sorted(perm.source.tolist()) == list(range(height * width))
  assert perm.swaps.shape == (swaps, 2)
  for a, b in perm.swaps:
    assert a != b
    assert 1 <= chebyshev(int(a), int(b), width) <= delta
  # Replaying the recorded swaps gives the permutation: they are what was done.
  replay = np.arange(height * width)
  for a, b in perm.swaps:
    replay[[a, b]] = replay[[b, a]]
  np.testing.assert_array_equal(replay, perm.source)


def test_permutation_reaches_the_whole_window():
  """Partners are drawn from the whole (2 delta + 1)^2 window: every offset occurs."""
  perm = locality.make_permutation(32, 32, swaps=20_000, max_distance=2, seed=0)
  offsets = {(b // 32 - a // 32, b % 32 - a % 32) for a, b in perm.swaps}
  assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)} - {(0, 0)}


def test_permutation_is_a_function_of_its_arguments():
  make = lambda **kw: (
    locality.make_permutation(16, 16, **{"swaps": 200, "max_distance": 2, "seed": 0, **kw}).source
  )
  np.testing.assert_array_equal(make(), make())
  for change in ({"seed": 1}, {"swaps": 201}, {"max_distance": 3}):
    assert not np.array_equal(make(), make(**change)), change


def test_zero_swaps_is_the_identity():
  perm = locality.make_permutation(9, 9, swaps=0, max_distance=1, seed=5)
  np.testing.assert_array_equal(perm.source, np.arange(81))
  config = configuration.dataset_config("digits")
  assert config.permute_pixels.swaps == 0
  assert locality.permutation_for(config, 8, 8) is None  # off: nothing is applied


def test_permute_and_unpermute_on_numpy_and_jax():
  perm = locality.make_permutation(6, 6, swaps=40, max_distance=2, seed=1)
  images = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 2)).astype(np.uint8)
  scrambled = perm.permute(images)
  flat = images.reshape(3, 36, 2)
  np.testing.assert_array_equal(scrambled.reshape(3, 36, 2), flat[:, perm.source])
  np.testing.assert_array_equal(np.asarray(perm.permute(jnp.asarray(images))), scrambled)
  np.testing.assert_array_equal(perm.unpermute(scrambled), images)
  np.testing.assert_array_equal(np.asarray(jax.jit(perm.unpermute)(jnp.asarray(scrambled))), images)
  assert not np.array_equal(scrambled, images)
  with pytest.raises(ValueError, match="made for 6x6 images, got 8x8"):
    perm.permute(np.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("swaps", -1, "swaps=-1 is not allowed: expected an int >= 0"),
    ("max_distance", 0, "max_distance=0 is not allowed: expected an int >= 1"),
    ("seed", -3, "seed=-3"),
  ],
)
def test_bad_permutation_settings_are_refused(quick_config, no_jit, key, value, match):
  config = quick_config({f"data.permute_pixels.{key}": value})
  with pytest.raises(ValueError, match=f"config.data.permute_pixels.{match}"):
    classification.validate(config)
  with pytest.raises(ValueError, match=match):
    locality.make_permutation(8, 8, **{"swaps": 3, "max_distance": 1, "seed": 0, key: value})
  with pytest.raises(ValueError, match="swaps=2.5 is not allowed"):  # (ConfigDict types it)
    locality.make_permutation(8, 8, swaps=2.5, max_distance=1, seed=0)


def test_config_arguments_set_the_ablations(cls_pixel):
  config = cls_pixel.get_config("quick,swaps=100,swap_distance=3,posemb=none,tokenizer=vocab")
  assert config.data.permute_pixels.to_dict() == {"swaps": 100, "max_distance": 3, "seed": 0}
  assert (config.model.posemb, config.model.tokenizer) == ("none", "vocab")
  # '' keeps the config's own choice: quick's sin-cos, the full config's learned.
  assert cls_pixel.get_config("quick").model.posemb == "sincos2d"
  assert cls_pixel.get_config("quick,posemb=learn").model.posemb == "learn"
  assert cls_pixel.get_config("").model.posemb == "learn"
  with pytest.raises(ValueError, match="swaps='many' is not a int"):
    cls_pixel.get_config("swaps=many")
  dit = load_config_module(DIT_PIXEL_PATH)
  assert dit.get_config("quick,swaps=7").data.permute_pixels.swaps == 7
  with pytest.raises(ValueError, match="tokenizer='vocab': this task's model has no pixel"):
    dit.get_config("quick,tokenizer=vocab")
  finetune = load_config_module(REPO_ROOT / "configs" / "mae_finetune.py")
  config = finetune.get_config("quick,posemb=none,tokenizer=vocab,swaps=9,swap_distance=2")
  assert (config.model.posemb, config.model.tokenizer) == ("none", "vocab")
  assert config.data.permute_pixels.swaps == 9


def _step_setup(config):
  """The trainer's pieces on one device: split, graphdef, state, tx, schedule."""
  train_split, eval_split = loop.load_splits(config)
  make_model = classification.make_model_fn(config, train_split)
  shapes = state_lib.model_shapes(make_model)
  plan_steps, warmup = loop.schedule_steps(config, 10)
  from pixel_vit import optimizer as optimizer_lib

  schedule = optimizer_lib.make_schedule(config.optimizer, plan_steps, warmup)
  tx = optimizer_lib.make_optimizer(config.optimizer, schedule, shapes.params)
  state = jax.jit(
    lambda: state_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=nnx.to_pure_dict(nnx.split(make_model())[1]),
      opt_state=tx.init(nnx.to_pure_dict(nnx.split(make_model())[1])),
      ema_params=None,
      rng=jax.random.PRNGKey(0),
    )
  )()
  return train_split, eval_split, shapes.graphdef, state, tx, schedule


@pytest.mark.slow
def test_classification_step_sees_the_scrambled_image(quick_config):
  """With augmentation off, a step with the permutation equals a step without it
  on images permuted beforehand: it is applied to the model's input, once, the
  same way in training and evaluation."""
  config = quick_config({"data.permute_pixels.swaps": 60, "data.permute_pixels.max_distance": 2})
  train_split, eval_split, graphdef, state, tx, schedule = _step_setup(config)
  perm = locality.permutation_for(config.data, 8, 8)
  batch = next(pipeline.train_batches(train_split, local_batch_size=32, seed=0))
  scrambled = {**batch, "images": perm.permute(batch["images"])}
  nc = train_split.num_classes
  with_perm = jax.jit(classification.make_train_step(config, graphdef, tx, schedule, nc, perm))
  without = jax.jit(classification.make_train_step(config, graphdef, tx, schedule, nc))
  _, metrics_a = with_perm(state, batch)
  _, metrics_b = without(state, scrambled)
  _, metrics_plain = without(state, batch)
  assert float(metrics_a["train/loss"]) == float(metrics_b["train/loss"])
  assert float(metrics_a["train/grad_norm"]) == float(metrics_b["train/grad_norm"])
  assert float(metrics_a["train/grad_norm"]) != float(metrics_plain["train/grad_norm"])
  eval_batch = next(pipeline.eval_batches(eval_split, local_batch_size=360))
  eval_a = jax.jit(classification.make_eval_sums(config, graphdef, nc, perm))(
    state.params, eval_batch
  )
  eval_b = jax.jit(classification.make_eval_sums(config, graphdef, nc))(
    state.params, {**eval_batch, "images": perm.permute(eval_batch["images"])}
  )
  assert float(eval_a["loss"]) == float(eval_b["loss"])


def test_diffusion_samples_are_put_back_in_image_order():
  perm = locality.make_permutation(4, 4, swaps=30, max_distance=3, seed=0)
  image = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 4, 4, 1)
  generated = jnp.asarray(perm.permute(image))  # what a model of scrambled data makes
  shown = generation.samples_as_images(generated, permutation=perm, latent=False)
  np.testing.assert_allclose(np.asarray(shown), (image + 1) / 2, atol=1e-7)
  latent = generation.samples_as_images(generated * 3, permutation=perm, latent=True)
  np.testing.assert_allclose(np.asarray(latent), image * 3, atol=1e-6)


def test_diffusion_training_input_is_permuted(tmp_path):
  dit = load_config_module(DIT_PIXEL_PATH).get_config("quick")
  perm = locality.make_permutation(8, 8, swaps=50, max_distance=2, seed=0)
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)).astype(np.uint8)
  x = diffusion.to_model_space(dit, jnp.asarray(images), permutation=perm)
  expected = diffusion.to_model_space(dit, jnp.asarray(perm.permute(images)))
  np.testing.assert_array_equal(np.asarray(x), np.asarray(expected))


# ---------------------------------------------------------------- pixel-value vocabulary


def _normalised(levels, mean=(0.5,), std=(0.5,)):
  return (np.asarray(levels, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(
    std, np.float32
  )


@pytest.mark.parametrize("patch,channels", [(1, 1), (1, 3), (2, 3)])
def test_vocab_embedding_of_8bit_values_is_a_sum_of_table_rows(patch, channels):
  rng = np.random.default_rng(0)
  levels = rng.integers(0, 256, (2, 4, 4, channels))
  mean, std = (0.4, 0.5, 0.6)[:channels], (0.2, 0.25, 0.3)[:channels]
  k = patch * patch * channels
  table = nnx.Param(jnp.asarray(rng.normal(size=(k, 256, 8)), jnp.float32))
  tokens = vit.embed_pixel_values(
    jnp.asarray(_normalised(levels, mean, std)), patch, table, (mean, std), jnp.float32
  )
  flat = np.asarray(vit.patchify(jnp.asarray(levels), patch))  # [B, N, k] ints
  expected = sum(np.asarray(table[...])[i][flat[..., i]] for i in range(k))
  np.testing.assert_allclose(np.asarray(tokens), expected, rtol=1e-4, atol=1e-4)


def test_vocab_embedding_interpolates_between_levels_and_clips():
  table = nnx.Param(jnp.arange(256 * 2, dtype=jnp.float32).reshape(1, 256, 2))
  levels = np.array([10.25, 0.0, 255.0, 300.0, -7.0]).reshape(1, 5, 1, 1)
  tokens = vit.embed_pixel_values(
    jnp.asarray(_normalised(levels)), 1, table, ((0.5,), (0.5,)), jnp.float32
  )
  rows = np.asarray(table[...])[0]
  expected = [0.75 * rows[10] + 0.25 * rows[11], rows[0], rows[255], rows[255], rows[0]]
  np.testing.assert_allclose(np.asarray(tokens)[0], expected, rtol=1e-5, atol=1e-3)


def test_vocab_gradient_reaches_only_the_rows_used():
  table = jnp.zeros((1, 256, 3), jnp.float32)
  images = jnp.asarray(_normalised(np.array([3, 3, 200]).reshape(1, 3, 1, 1)))

  def loss(t):
    return vit.embed_pixel_values(images, 1, nnx.Param(t), ((0.5,), (0.5,)), jnp.float32).sum()

  grad = np.asarray(jax.grad(loss)(table))[0, :, 0]
  used = np.flatnonzero(np.abs(grad) > 1e-6)
  np.testing.assert_array_equal(used, [3, 200])
  np.testing.assert_allclose(grad[[3, 200]], [2.0, 1.0], rtol=1e-5)


def test_vocab_encoder_parameters_and_errors():
  size = vit.SIZES["mu"]
  encoder = vit.Encoder(
    size=size,
    patch=2,
    image_size=8,
    channels=3,
    tokenizer="vocab",
    pixel_stats=((0.5,), (0.5,)),
    scan=False,
    rngs=nnx.Rngs(0),
  )
  assert encoder.tokenizer_table.shape == (12, 256, size.width)
  assert not hasattr(encoder, "tokenizer_kernel")
  out = encoder(jnp.zeros((2, 8, 8, 3)))
  assert out.shape == (2, 17, size.width) and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="needs pixel_stats"):
    vit.Encoder(size=size, patch=1, image_size=8, channels=1, tokenizer="vocab", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokenizer 'onehot' is not one of"):
    vit.Encoder(size=size, patch=1, image_size=8, channels=1, tokenizer="onehot", rngs=nnx.Rngs(0))


def test_bad_tokenizer_is_refused_before_compiling(quick_config, no_jit):
  with pytest.raises(
    ValueError,
    match=r"config.model.tokenizer='bytes' is not allowed; "
    r"choose one of \['linear', 'vocab'\]",
  ):
    classification.validate(quick_config({"model.tokenizer": "bytes"}))


def test_vocab_refuses_latent_data(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 20), ("test", 8)):
    np.savez(
      tmp_path / f"lat_{split}.npz",
      latents=rng.normal(size=(n, 4, 4, 4)).astype(np.float32),
      labels=rng.integers(0, 3, n).astype(np.int32),
    )
  config = load_config_module(REPO_ROOT / "configs" / "cls_pixel.py").get_config(
    "quick,tokenizer=vocab"
  )
  config.data.source = f"npz:{tmp_path}/lat_{{split}}.npz"
  with pytest.raises(
    ValueError,
    match="tokenizer='vocab' embeds 8-bit pixel values, but "
    ".* holds VAE latents .*use config.model.tokenizer="
    "'linear'",
  ):
    loop.load_splits(config)


@pytest.mark.slow
def test_vocab_classifier_trains_and_a_linear_finetune_of_it_is_refused(
  quick_config, workdir, make_workdir
):
  config = quick_config(
    {
      "model.tokenizer": "vocab",
      "data.permute_pixels.swaps": 20,
      "total_steps": 4,
      "eval_every": 4,
      "checkpoint_every": 4,
    }
  )
  classification.validate(config)
  state, results = classification.train_and_evaluate(config, workdir)
  assert state.params["encoder"]["tokenizer_table"].shape == (1, 256, 64)
  assert results["eval/count"] == 360 and np.isfinite(results["eval/loss"])
  linear = quick_config()
  linear.init_from = workdir
  with pytest.raises(
    ValueError, match="tokenizer differs: checkpoint 'vocab' vs config.model.tokenizer='linear'"
  ):
    pretrained.check_config(linear)
