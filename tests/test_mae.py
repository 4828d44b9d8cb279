"""MAE pre-training (issue 3): masking, a visible-only encoder, the masked loss,
normalised pixel targets, config validation, the trainer end to end on digits
(learning, exact evaluation counts, the reconstruction PNG, exact resume, a
mismatched checkpoint) and the offline failure of the paper config."""

import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pixel_vit.data import augment
from pixel_vit.evaluation import pictures
from pixel_vit.models import mae, vit
from pixel_vit.trainers import loop
from pixel_vit.trainers import mae as mae_trainer
from support import (
  MAE_TINY_RUN,
  REPO_ROOT,
  assert_trees_equal,
  read_metrics,
  set_dotted,
  snapshot,
  train_losses,
)

DIGITS_TEST_EXAMPLES = 360


def exact_visible(num_tokens: int, mask_ratio: float) -> int:
  """round(N * (1 - r)) in exact arithmetic (Python's round: half to even), >= 1."""
  return max(1, round(num_tokens * (1 - Fraction(mask_ratio))))


# ---------------------------------------------------------------- random masking


@pytest.mark.parametrize(
  "num_tokens, mask_ratio, visible",
  [
    (64, 0.75, 16),  # mu/1 on 8x8 digits
    (1024, 0.75, 256),  # PiT on 32x32 CIFAR
    (256, 0.75, 64),  # ViT/2 on 32x32 CIFAR
    (16, 0.5, 8),
    (10, 0.75, 2),  # 2.5 -> 2: Python's round is half to even ...
    (6, 0.75, 2),  # 1.5 -> 2
    (14, 0.75, 4),  # 3.5 -> 4
    (3, 0.5, 2),  # 1.5 -> 2
    (5, 0.5, 2),  # 2.5 -> 2
    (2, 0.75, 1),  # 0.5 -> 0, but at least one token stays visible
    (64, 0.99, 1),  # 0.64 -> 1
  ],
)
def test_num_visible_rounds_half_to_even(num_tokens, mask_ratio, visible):
  # Ratios here are dyadic, so N * (1 - r) is exact in floating point.
  assert exact_visible(num_tokens, mask_ratio) == visible
  assert mae.num_visible(num_tokens, mask_ratio) == visible


@pytest.mark.parametrize(
  "num_tokens, mask_ratio, visible", [(15, 0.9, 2), (35, 0.9, 4), (50, 0.93, 4)]
)
def test_num_visible_exact_halves_of_decimal_ratios(num_tokens, mask_ratio, visible):
  assert mae.num_visible(num_tokens, mask_ratio) == visible


@pytest.mark.parametrize(
  "num_tokens, mask_ratio", [(64, 0.75), (10, 0.75), (6, 0.75), (16, 0.5), (2, 0.75), (256, 0.9)]
)
def test_random_masking_counts_and_consistency(num_tokens, mask_ratio):
  batch = 16
  n_keep = exact_visible(num_tokens, mask_ratio)
  keep, mask, restore = jax.device_get(
    mae.random_masking(jax.random.PRNGKey(3), batch, num_tokens, mask_ratio)
  )
  assert keep.shape == (batch, n_keep) and mask.shape == restore.shape == (batch, num_tokens)
  assert set(np.unique(mask)) <= {0.0, 1.0}
  np.testing.assert_array_equal(mask.sum(axis=1), num_tokens - n_keep)
  for row in range(batch):
    assert len(set(keep[row])) == n_keep  # distinct tokens
    np.testing.assert_array_equal(np.sort(restore[row]), np.arange(num_tokens))
    np.testing.assert_array_equal(mask[row, keep[row]], 0.0)  # kept = visible
    np.testing.assert_array_equal(np.flatnonzero(mask[row] == 0), np.sort(keep[row]))

  # restore unshuffles: visible tokens first, then placeholders for the masked
  # ones (what the decoder does), put back in image order.
  tokens = np.broadcast_to(np.arange(num_tokens, dtype=np.float32) + 10, (batch, num_tokens))
  visible = np.take_along_axis(tokens, keep, axis=1)
  shuffled = np.concatenate([visible, -np.ones((batch, num_tokens - n_keep), np.float32)], 1)
  unshuffled = np.take_along_axis(shuffled, restore, axis=1)
  np.testing.assert_array_equal(unshuffled, np.where(mask == 0, tokens, -1.0))
  # and restore is the inverse of the shuffle whose first tokens are kept.
  shuffle = np.argsort(restore, axis=1)
  np.testing.assert_array_equal(shuffle[:, :n_keep], keep)
  np.testing.assert_array_equal(
    np.take_along_axis(np.take_along_axis(tokens, shuffle, 1), restore, 1), tokens
  )


def test_random_masking_differs_between_examples_and_keys():
  key = jax.random.PRNGKey(0)
  _, mask, _ = jax.device_get(mae.random_masking(key, 32, 64, 0.75))
  assert len({row.tobytes() for row in mask}) == 32  # every example its own mask
  _, same, _ = jax.device_get(mae.random_masking(key, 32, 64, 0.75))
  np.testing.assert_array_equal(same, mask)  # a function of the key (resume replays it)
  _, other, _ = jax.device_get(mae.random_masking(jax.random.PRNGKey(1), 32, 64, 0.75))
  assert (other != mask).any()
  # Uniform over positions: each token is masked in ~75% of 4000 examples
  # (binomial std 0.007; 0.05 is 7 std).
  _, many, _ = jax.device_get(mae.random_masking(key, 4000, 16, 0.75))
  np.testing.assert_allclose(many.mean(axis=0), 0.75, atol=0.05)


# ------------------------------------------------ the encoder sees visible tokens only


def build_model(config, variant: str, channels: int = 3):
  config.model.variant = variant
  return mae.build_mae(config.model, image_size=8, channels=channels, rngs=nnx.Rngs(0))


def token_origin(token: int, patch: int, grid: int) -> tuple[int, int]:
  return (token // grid) * patch, (token % grid) * patch


@pytest.mark.parametrize("variant", ["mu/1", "mu/2"])
def test_encoder_never_sees_masked_pixels(mae_quick_config, variant):
  model = build_model(mae_quick_config(), variant)
  patch, grid, n_tokens = model.patch, model.encoder.grid, model.encoder.num_patches
  graphdef, params = nnx.split(model)
  batch, ratio = 4, 0.75
  n_keep = exact_visible(n_tokens, ratio)
  mask_key = jax.random.PRNGKey(7)
  keep, mask, _ = mae.random_masking(mask_key, batch, n_tokens, ratio)

  @jax.jit
  def encode(params, images):
    return nnx.merge(graphdef, params).encode_visible(images, keep)

  @jax.jit
  def forward(params, images):
    return nnx.merge(graphdef, params)(images, mask_key=mask_key, mask_ratio=ratio)

  images = jax.random.normal(jax.random.PRNGKey(1), (batch, 8, 8, 3))
  pixel_mask = mae.mask_as_image(mask, patch, 8, 8)
  np.testing.assert_array_equal(vit.patchify(pixel_mask, patch)[..., 0], mask)
  assert float(pixel_mask.sum()) == batch * (n_tokens - n_keep) * patch * patch
  scrambled = jnp.where(
    pixel_mask > 0, 100.0 * jax.random.normal(jax.random.PRNGKey(2), images.shape), images
  )
  assert (scrambled != images).any()

  latent = encode(params, images)
  assert latent.shape == (batch, 1 + n_keep, model.encoder.width)  # [CLS] + visible
  np.testing.assert_array_equal(encode(params, scrambled), latent)
  # The decoder sees the latent and mask tokens only: the whole prediction is unchanged.
  pred, pred_mask = forward(params, images)
  assert pred.shape == (batch, n_tokens, patch * patch * 3)
  np.testing.assert_array_equal(pred_mask, mask)
  np.testing.assert_array_equal(forward(params, scrambled)[0], pred)

  # One visible pixel of example 0 changes example 0's encoding (and only its).
  y, x = token_origin(int(keep[0, 0]), patch, grid)
  assert float(pixel_mask[0, y, x, 0]) == 0.0
  nudged = images.at[0, y, x, 0].add(1.0)
  changed = encode(params, nudged)
  assert np.abs(np.asarray(changed[0] - latent[0])).max() > 1e-4
  np.testing.assert_array_equal(changed[1:], latent[1:])
  assert np.abs(np.asarray(forward(params, nudged)[0][0] - pred[0])).max() > 1e-5


def test_encoder_blocks_run_on_one_plus_visible_tokens(mae_quick_config, monkeypatch):
  """The full forward pass: the encoder's Transformer blocks get [B, 1 + n_visible, w];
  only the decoder's get all N tokens."""
  model = build_model(mae_quick_config(), "mu/1", channels=1)
  seen, merged = [], []
  original_call = vit.BlockStack.__call__

  def spy(self, x, **kwargs):
    which = {id(merged[-1].encoder.blocks): "encoder", id(merged[-1].decoder_blocks): "decoder"}[
      id(self)
    ]
    seen.append((which, tuple(x.shape)))
    return original_call(self, x, **kwargs)

  monkeypatch.setattr(vit.BlockStack, "__call__", spy)
  graphdef, params = nnx.split(model)

  def forward(params, images):  # shapes only: traced, not compiled
    merged.append(nnx.merge(graphdef, params))
    return merged[-1](images, mask_key=jax.random.PRNGKey(1), mask_ratio=0.75)

  pred, mask = jax.eval_shape(forward, params, jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32))
  assert seen == [
    ("encoder", (2, 1 + 16, model.encoder.width)),
    ("decoder", (2, 1 + 64, model.decoder_width)),
  ]
  assert pred.shape == (2, 64, 1) and mask.shape == (2, 64)


# ------------------------------------------------ the loss is over masked tokens only


def test_masked_mse_ignores_visible_predictions():
  batch, n_tokens, dim = 4, 64, 12
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  pred = jax.random.normal(keys[0], (batch, n_tokens, dim))
  target = jax.random.normal(keys[1], (batch, n_tokens, dim))
  _, mask, _ = mae.random_masking(keys[2], batch, n_tokens, 0.75)
  loss = float(mae.masked_mse(pred, target, mask))

  p, t, m = np.asarray(pred), np.asarray(target), np.asarray(mask)
  expected = (((p - t) ** 2).mean(-1) * m).sum() / m.sum()
  assert loss == pytest.approx(expected, rel=1e-6)

  visible = (mask == 0)[..., None]
  wild = jnp.where(visible, pred + 1e3 * jax.random.normal(keys[3], pred.shape), pred)
  assert (wild != pred).any()
  assert float(mae.masked_mse(wild, target, mask)) == loss  # exactly
  masked_token = int(np.flatnonzero(m[0])[0])
  assert float(mae.masked_mse(pred.at[0, masked_token, 0].add(1.0), target, mask)) != loss

  grad = np.asarray(jax.grad(mae.masked_mse)(pred, target, mask))
  assert (grad[m == 0] == 0.0).all()  # exactly zero at visible tokens
  np.testing.assert_allclose(
    grad[m == 1], (2 * (p - t) / (dim * m.sum()))[m == 1], rtol=1e-5, atol=1e-9
  )
  assert (grad[m == 1] != 0).all()


# ---------------------------------------------------------------- normalised pixel targets


def numpy_window_normalise(images: np.ndarray, window: int) -> np.ndarray:
  """MAE's per-patch normalisation over window x window tiles, in numpy."""
  out = np.empty_like(images)
  _, h, w, _ = images.shape
  for y in range(0, h, window):
    for x in range(0, w, window):
      tile = images[:, y : y + window, x : x + window, :]
      mean = tile.mean(axis=(1, 2, 3), keepdims=True)
      var = tile.var(axis=(1, 2, 3), keepdims=True)
      out[:, y : y + window, x : x + window, :] = (tile - mean) / np.sqrt(var + 1e-6)
  return out


@pytest.fixture
def rgb_images():
  images = np.array(jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 3)))
  images[0, :4, :4, :] = 0.25  # constant windows (2x2 and 4x4): targets 0, not NaN
  return jnp.asarray(images)


@pytest.mark.parametrize("patch, window", [(1, 2), (2, 0), (2, 2), (1, 4), (4, 0)])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_targets_round_trip_through_pictures(rgb_images, patch, window, norm_pix_loss):
  options = dict(norm_pix_loss=norm_pix_loss, norm_pix_window=window)
  targets = mae.pixel_targets(rgb_images, patch, **options)
  assert targets.shape == (3, (8 // patch) ** 2, patch * patch * 3)
  assert np.isfinite(np.asarray(targets)).all()
  back = mae.predictions_as_images(targets, rgb_images, patch, **options)
  if norm_pix_loss:
    np.testing.assert_allclose(back, rgb_images, atol=1e-5)
    expected = numpy_window_normalise(np.asarray(rgb_images), window or patch)
    np.testing.assert_allclose(vit.unpatchify(targets, patch, 8, 8), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(vit.unpatchify(targets, patch, 8, 8)[0, :4, :4], 0.0)
  else:
    np.testing.assert_array_equal(targets, vit.patchify(rgb_images, patch))
    np.testing.assert_array_equal(back, rgb_images)


@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_tokens_with_window_2_learn_the_targets_of_vit2(channels):
  """The documented design point: PiT/1 with norm_pix_window=2 and ViT/2 with
  MAE's per-patch rule (window 0) regress onto the very same pixel values."""
  images = jax.random.uniform(jax.random.PRNGKey(4), (2, 8, 8, channels))
  pixel = mae.pixel_targets(images, 1, norm_pix_loss=True, norm_pix_window=2)
  patch = mae.pixel_targets(images, 2, norm_pix_loss=True, norm_pix_window=0)
  assert pixel.shape == (2, 64, channels) and patch.shape == (2, 16, 4 * channels)
  np.testing.assert_array_equal(vit.unpatchify(pixel, 1, 8, 8), vit.unpatchify(patch, 2, 8, 8))
  # ... and they are really normalised: each 2x2 window has mean 0 and variance ~1.
  tiles = np.asarray(vit.patchify(vit.unpatchify(pixel, 1, 8, 8), 2))
  np.testing.assert_allclose(tiles.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(tiles.var(-1), 1.0, atol=1e-3)
  # Whereas PiT/1's own-token rule (window 0 = 1 pixel) would differ.
  own = mae.pixel_targets(images, 1, norm_pix_loss=True, norm_pix_window=0)
  assert np.abs(np.asarray(own - pixel)).max() > 0.1


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"mask_ratio": 0.0}, r"config\.mask_ratio=0\.0 must be in \(0, 1\)"),
    ({"mask_ratio": 1.0}, r"config\.mask_ratio=1\.0 must be in \(0, 1\)"),
    ({"mask_ratio": 1.5}, r"config\.mask_ratio=1\.5 must be in \(0, 1\)"),
    ({"mask_ratio": -0.25}, r"config\.mask_ratio=-0\.25"),
    (
      {"model.norm_pix_loss": True, "model.norm_pix_window": 0},
      r"norm_pix_loss normalises over 1x1 pixels.*config\.model\.norm_pix_window >= 2",
    ),
    (
      {"model.norm_pix_loss": True, "model.norm_pix_window": 1},
      r"norm_pix_loss normalises over 1x1 pixels.*config\.model\.norm_pix_window >= 2",
    ),
    ({"model.norm_pix_window": -2}, r"config\.model\.norm_pix_window=-2"),
    (
      {"model.decoder.width": 62},
      r"config\.model\.decoder\.width=62 must be divisible by "
      r"config\.model\.decoder\.heads=4",
    ),
    ({"model.decoder.heads": 0}, r"config\.model\.decoder\.heads=0 must be > 0"),
    ({"model.decoder.depth": 0}, r"config\.model\.decoder\.depth=0 must be > 0"),
    (
      {"model.decoder.posemb": "sin"},
      r"config\.model\.decoder\.posemb='sin' is not allowed"
      r".*'sincos2d'",
    ),
    ({"model.variant": "mu"}, r"variant 'mu'"),
    ({"eval_batch_size": 36}, r"config\.eval_batch_size=36 must be divisible by the 8"),
    ({"total_steps": 0, "total_epochs": 0.0}, r"config\.total_steps"),
  ],
  ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None,
)
def test_validate_rejects(mae_quick_config, overrides, match, no_jit):
  config = mae_quick_config(overrides)
  with pytest.raises(ValueError, match=match):
    mae_trainer.validate(config)


@pytest.mark.parametrize(
  "overrides",
  [
    {"model.norm_pix_loss": False, "model.norm_pix_window": 0},  # raw pixels are fine
    {"model.norm_pix_loss": True, "model.norm_pix_window": 2},  # the paper setting
    {
      "model.norm_pix_loss": True,
      "model.variant": "mu/2",
      "model.norm_pix_window": 0,
    },  # MAE's per-patch rule
    {"model.decoder.posemb": "learn"},
    {"model.decoder.posemb": "none"},
    {"mask_ratio": 0.9},
  ],
)
def test_validate_accepts(mae_quick_config, overrides, no_jit):
  mae_trainer.validate(mae_quick_config(overrides))


def test_validate_rejects_one_pixel_windows_for_patches_too(mae_quick_config, no_jit):
  config = mae_quick_config(
    {"model.variant": "mu/2", "model.norm_pix_loss": True, "model.norm_pix_window": 1}
  )
  grey = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
  targets = mae.pixel_targets(grey, 2, norm_pix_loss=True, norm_pix_window=1)
  assert float(jnp.abs(targets).max()) == 0.0  # what training would regress onto
  with pytest.raises(ValueError, match=r"norm_pix_window"):
    mae_trainer.validate(config)


def test_validate_rejects_sincos_decoder_width_not_multiple_of_4(mae_quick_config, no_jit):
  config = mae_quick_config(
    {"model.decoder.width": 66, "model.decoder.heads": 6, "model.decoder.posemb": "sincos2d"}
  )
  with pytest.raises(ValueError, match=r"model\.decoder\.width=66"):
    mae_trainer.validate(config)


def test_norm_pix_window_must_divide_the_image_before_compiling(mae_quick_config, workdir, no_jit):
  config = mae_quick_config(
    {"model.norm_pix_loss": True, "model.norm_pix_window": 3}
  )  # digits are 8x8
  mae_trainer.validate(config)  # the image size is known once the data is read
  with pytest.raises(
    ValueError,
    match=r"config\.model\.norm_pix_window=3 does not divide "
    r"the image size 8",
  ):
    mae_trainer.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize("arg", [None, "variant=Ti/2", "quick", "variant=mu/2,quick"])
def test_configs_validate(mae_pixel, arg, no_jit):
  # The paper configs read no data and open no connection while validating.
  config = mae_pixel.get_config(arg)
  mae_trainer.validate(config)
  assert config.task == "mae"
  size, patch = vit.parse_variant(config.model.variant)
  if arg and "quick" in arg:
    assert config.data.source == "digits" and config.total_steps > 0
    return
  # The paper's setting: CIFAR-100, Tiny, 75% masked, normalised targets that
  # are the same for /1 and /2.
  assert config.data.source == "tfds:cifar100" and size == vit.SIZES["Ti"]
  assert patch == (2 if arg == "variant=Ti/2" else 1)
  assert config.total_steps == 0 and config.total_epochs > 0
  assert config.mask_ratio == 0.75
  assert config.model.norm_pix_loss and config.model.norm_pix_window == 2


@pytest.mark.parametrize("arg", [None, "quick"])
def test_lr_follows_batch_size(mae_pixel, arg):
  config = mae_pixel.get_config(arg)
  base = config.optimizer.base_lr
  assert config.optimizer.lr == pytest.approx(base * config.batch_size / 256)
  before = config.optimizer.lr
  config.batch_size = config.batch_size * 2
  assert config.optimizer.lr == pytest.approx(2 * before)
  config.optimizer.base_lr = base / 4
  assert config.optimizer.lr == pytest.approx(base / 4 * config.batch_size / 256)
  assert isinstance(config.optimizer.lr, float)


def test_lr_can_be_overridden_directly(mae_pixel):
  config = mae_pixel.get_config("quick")
  config.optimizer.lr = 3e-3
  assert config.optimizer.lr == 3e-3


# ---------------------------------------------------------------- the trainer end to end

LEARNING_RUN = {
  **MAE_TINY_RUN,
  "total_steps": 40,
  "batch_size": 32,
  "eval_batch_size": 48,  # does not divide the 360 test digits
  "log_every": 5,
  "eval_every": 20,
  "checkpoint_every": 20,
  "keep_checkpoints": 5,
  "optimizer.base_lr": 2e-3,
  "optimizer.warmup_steps": 5,
  # Randomness a wrong resume would get wrong (besides the masks).
  "model.drop_path": 0.1,
  "augment.flip": True,
  "optimizer.ema_decay": 0.9,
}


@pytest.fixture(scope="module")
def learning_run(mae_pixel, tmp_path_factory):
  """40 MAE steps of the quick config (mu/1 on digits) at batch 32, lr by MAE's
  rule (2e-3 * 32 / 256), evaluated at steps 20 and 40."""
  config = set_dotted(mae_pixel.get_config("quick"), dict(LEARNING_RUN))
  mae_trainer.validate(config)
  workdir = str(tmp_path_factory.mktemp("mae") / "workdir")
  state, results = mae_trainer.train_and_evaluate(config, workdir)
  return config, workdir, state, results


def normalised(config, split) -> jax.Array:
  """A split's images as the model sees them at evaluation."""
  images, _ = augment.preprocess_eval(
    jnp.asarray(split.images),
    jnp.asarray(split.labels),
    num_classes=split.num_classes,
    config=config.augment,
  )
  return images


def eval_images(config):
  _, eval_split = loop.load_splits(config)
  return normalised(config, eval_split), eval_split


@pytest.mark.slow
def test_reconstruction_loss_falls(learning_run):
  config, workdir, state, results = learning_run
  losses = train_losses(workdir)
  steps = sorted(losses)
  assert steps == list(range(5, 41, 5)), steps
  assert np.isfinite(list(losses.values())).all()
  first, last = losses[steps[0]], losses[steps[-1]]
  assert last < 0.6 * first, losses
  assert int(jax.device_get(state.step)) == 40
  # Better than predicting the mean target value of the training digits at
  # every masked token: the model learned something about digits.
  train_split, _ = loop.load_splits(config)
  train_targets = mae_trainer._targets(config, normalised(config, train_split))
  eval_targets = mae_trainer._targets(config, eval_images(config)[0])
  mean_prediction = float(jnp.mean(jnp.square(eval_targets - jnp.mean(train_targets))))
  assert results["eval/loss"] < 0.8 * mean_prediction, (results, mean_prediction)
  evals = [r for r in read_metrics(workdir) if "eval/loss" in r]
  assert [r["step"] for r in evals] == [20, 40]


@pytest.mark.slow
def test_eval_counts_every_example_once(learning_run):
  config, workdir, _, results = learning_run
  assert DIGITS_TEST_EXAMPLES % config.eval_batch_size != 0
  assert results["eval/count"] == DIGITS_TEST_EXAMPLES
  for record in read_metrics(workdir):
    if "eval/count" in record:
      assert record["eval/count"] == DIGITS_TEST_EXAMPLES, record
      assert np.isfinite(record["eval/loss"]) and record["eval/loss"] > 0


@pytest.mark.slow
def test_workdir_artifacts(learning_run):
  config, workdir, _, _ = learning_run
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["task"] == "mae" and saved["total_steps"] == 40
  assert saved["optimizer"]["lr"] == pytest.approx(2e-3 * 32 / 256)
  checkpoints = sorted(
    int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()
  )
  assert 20 in checkpoints and 40 in checkpoints, checkpoints
  pngs = sorted(os.listdir(os.path.join(workdir, "pictures")))
  assert pngs == ["reconstructions_0000020.png", "reconstructions_0000040.png"], pngs


@pytest.mark.slow
def test_reconstruction_png(learning_run):
  """original | masked input | reconstruction | visible pasted, one digit per row."""
  config, workdir, _, _ = learning_run
  assert vit.parse_variant(config.model.variant)[1] == 1  # one token per pixel
  with Image.open(os.path.join(workdir, "pictures", "reconstructions_0000040.png")) as f:
    assert f.mode == "RGB"
    image = np.asarray(f)
  rows, size = mae_trainer.GRID_EXAMPLES, 8
  separator = inspect.signature(pictures.grid).parameters["separator"].default
  scale = -(-pictures.MIN_CELL_PIXELS // size)
  cell = size * scale
  assert cell >= pictures.MIN_CELL_PIXELS
  assert image.shape == (rows * cell + (rows - 1) * separator, 4 * cell + 3 * separator, 3), (
    image.shape
  )

  def cells(column):
    x0 = column * (cell + separator)
    out = []
    for row in range(rows):
      y0 = row * (cell + separator)
      block = image[y0 : y0 + cell, x0 : x0 + cell]
      small = block[::scale, ::scale]
      # nearest-neighbour enlargement, grey digits as RGB
      np.testing.assert_array_equal(block, np.repeat(np.repeat(small, scale, 0), scale, 1))
      np.testing.assert_array_equal(small[..., 0], small[..., 1])
      out.append(small[..., 0])
    return np.stack(out)

  original, masked, recon, pasted = (cells(j) for j in range(4))
  assert (image[:, cell : cell + separator] == 255).all()  # white separators
  assert (image[cell : cell + separator] == 255).all()

  _, eval_split = eval_images(config)
  np.testing.assert_array_equal(original, eval_split.images[:rows, ..., 0])
  # The grid shows the eval masks of the first eval batch.
  _, mask, _ = mae.random_masking(
    mae_trainer._eval_mask_key(config, 0), config.eval_batch_size, 64, config.mask_ratio
  )
  hidden = np.asarray(mask[:rows]).reshape(rows, size, size) > 0
  assert (hidden.sum(axis=(1, 2)) == 64 - exact_visible(64, config.mask_ratio)).all()
  np.testing.assert_array_equal(pasted[~hidden], original[~hidden])
  np.testing.assert_array_equal(pasted[hidden], recon[hidden])
  np.testing.assert_array_equal(masked[~hidden], original[~hidden])
  assert (masked[hidden] == 128).all()  # grey
  assert (recon != original).any()  # a reconstruction, not a copy


@pytest.mark.slow
def test_resume_is_exact(learning_run, make_workdir):
  """Run B starts in a fresh workdir holding only the learning run's step-20
  checkpoint and goes 20 -> 40 with the same config: masks, drop-path, flips,
  data order and schedule all replay, so every array matches bitwise."""
  config, run_a, state_a, _ = learning_run
  run_b = make_workdir("resumed")
  os.makedirs(os.path.join(run_b, "checkpoints"))
  shutil.copytree(
    os.path.join(run_a, "checkpoints", "20"), os.path.join(run_b, "checkpoints", "20")
  )
  state_b, results_b = mae_trainer.train_and_evaluate(config, run_b)

  losses_a, losses_b = train_losses(run_a), train_losses(run_b)
  assert min(losses_b) == 25  # B trained no step up to 20
  assert {s: losses_a[s] for s in losses_b} == losses_b
  assert int(jax.device_get(state_b.step)) == 40
  assert state_a.ema_params is not None
  for what in ("params", "opt_state", "ema_params", "rng"):
    assert_trees_equal(getattr(state_b, what), getattr(state_a, what), what)
  assert results_b["eval/loss"] == read_metrics(run_a)[-1]["eval/loss"]


@pytest.mark.slow
def test_resume_with_another_decoder_is_refused(learning_run):
  config, workdir, _, _ = learning_run
  before = snapshot(workdir)
  other = set_dotted(config.copy_and_resolve_references(), {"model.decoder.width": 32})
  mae_trainer.validate(other)
  old, new = config.model.decoder, other.model.decoder
  describe = lambda d: [d.width, d.depth, d.heads, d.mlp_dim, d.posemb]
  match = (
    rf"checkpoint .*checkpoints/40 does not match the config \(decoder: checkpoint "
    rf"{repr(describe(old))} vs config {repr(describe(new))}\)"
  ).replace("[", r"\[")
  with pytest.raises(ValueError, match=match):
    mae_trainer.train_and_evaluate(other, workdir)
  assert snapshot(workdir) == before


# ---------------------------------------------------------------- the paper config offline


@pytest.mark.slow
@pytest.mark.parametrize("how", ["unreachable", "download_off"])
def test_paper_config_fails_fast_offline(tmp_path, how):
  """The default config wants tfds:cifar100, which is not on disk. `unreachable`:
  the real default path, with HTTPS routed to a closed local port so the
  connectivity probe fails at once and nothing leaves the machine (the
  subprocess cannot use the conftest's socket guard); `download_off`:
  --config.data.download=False."""
  workdir = tmp_path / "run"
  closed_port = "http://127.0.0.1:9"
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "TFDS_DATA_DIR": str(tmp_path / "tfds"),
    "https_proxy": closed_port,
    "HTTPS_PROXY": closed_port,
    "http_proxy": closed_port,
    "HTTP_PROXY": closed_port,
    "no_proxy": "",
    "NO_PROXY": "",
  }
  command = [
    sys.executable,
    "-m",
    "pixel_vit.main",
    "--config=configs/mae_pixel.py",
    f"--workdir={workdir}",
  ]
  if how == "download_off":
    command.append("--config.data.download=False")
  start = time.monotonic()
  proc = subprocess.run(
    command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  elapsed = time.monotonic() - start
  assert proc.returncode == 1
  tail = proc.stderr[-3000:]
  assert "error: tfds:cifar100 is not prepared" in proc.stderr, tail
  assert "Traceback" not in proc.stderr, tail
  assert "--config.data.data_dir=DIR" in proc.stderr, tail
  if how == "download_off":
    assert "download is off" in proc.stderr, tail
  else:
    assert "unreachable (no network)" in proc.stderr, tail
  # Not tfds's ~200 s of download retries (the bound is loose: cold imports on
  # a loaded 2-core machine take most of a minute).
  assert elapsed < 150, elapsed
  assert not (workdir / "checkpoints").exists()
