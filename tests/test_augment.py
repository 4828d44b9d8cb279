"""Tests for pixel_vit.data.augment (on-device augmentation in JAX)."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pixel_vit import configuration
from pixel_vit.data import augment


def _images(key, shape=(8, 32, 32, 3)):
  return jax.random.uniform(jax.random.key(key), shape, jnp.float32)


def _coord_images(batch, height, width):
  """Channel 0 = row index, channel 1 = column index (linear ramps)."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  img = np.stack([rows, cols], axis=-1).astype(np.float32)
  return jnp.asarray(np.broadcast_to(img, (batch, height, width, 2)))


def _config(**overrides):
  c = configuration.default_augment_config()
  for k, v in overrides.items():
    c[k] = v
  return c


def _all_off(**overrides):
  return _config(
    **{
      **dict(crop=False, flip=False, label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0),
      **overrides,
    }
  )


def _uint8(batch, height, width, channels, seed=0):
  rng = np.random.RandomState(seed)
  return rng.randint(0, 256, (batch, height, width, channels)).astype(np.uint8)


# ------------------------------------------------------------ resized crop


def test_crop_full_scale_square_ratio_is_identity():
  x = _images(0)
  y = augment.random_resized_crop(jax.random.key(1), x, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6)


def test_crop_static_shape_under_jit_and_values_in_range():
  x = _images(0, (6, 24, 20, 3))

  @jax.jit
  def f(key, images):
    return (
      augment.random_resized_crop(key, images),
      augment.random_resized_crop(key, images, scale=(0.05, 0.3), out_size=(16, 12)),
    )

  same, resized = f(jax.random.key(3), x)
  assert same.shape == x.shape and same.dtype == jnp.float32
  assert resized.shape == (6, 16, 12, 3)
  for out in (same, resized):
    lo = np.asarray(x).min(axis=(1, 2, 3))
    hi = np.asarray(x).max(axis=(1, 2, 3))
    o = np.asarray(out)
    assert np.all(o.min(axis=(1, 2, 3)) >= lo - 1e-6)
    assert np.all(o.max(axis=(1, 2, 3)) <= hi + 1e-6)


def test_crop_small_scale_changes_every_image():
  x = _images(0)
  y = augment.random_resized_crop(jax.random.key(2), x, scale=(0.1, 0.2))
  diff = np.abs(np.asarray(y) - np.asarray(x)).mean(axis=(1, 2, 3))
  assert np.all(diff > 0.05), diff


def test_crop_boxes_have_requested_area_and_aspect():
  # On ramp images the output spans exactly the crop box (up to the half-pixel
  # clamp at image borders), so the box size can be read off the output.
  h = w = 64
  x = _coord_images(256, h, w)
  y = np.asarray(
    augment.random_resized_crop(jax.random.key(4), x, scale=(0.25, 0.5), ratio=(0.5, 2.0))
  )
  shrink = 1.0 - 1.0 / h  # sampled centres span h * (1 - 1/out) of the box
  span_h = (y[..., 0].max(axis=(1, 2)) - y[..., 0].min(axis=(1, 2))) / shrink
  span_w = (y[..., 1].max(axis=(1, 2)) - y[..., 1].min(axis=(1, 2))) / shrink
  frac = span_h * span_w / (h * w)
  assert np.all(frac >= 0.25 * 0.9) and np.all(frac <= 0.5 * 1.05), frac
  aspect = span_w / span_h
  assert np.all(aspect >= 0.5 * 0.9) and np.all(aspect <= 2.0 * 1.1), aspect
  # Boxes differ per example and cover both orientations.
  assert aspect.min() < 0.9 and aspect.max() > 1.1
  assert len(np.unique(np.round(frac, 3))) > 50


def test_crop_falls_back_to_center_crop_when_no_trial_fits():
  # Full-area crops with aspect 2 never fit a square image, so torchvision's
  # fallback applies: full width, height W/2, centred.
  x = _images(5, (3, 32, 32, 2))
  y = augment.random_resized_crop(jax.random.key(0), x, scale=(1.0, 1.0), ratio=(2.0, 2.0))
  want = jax.image.resize(x[:, 8:24], x.shape, "linear")
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5)
  # Shrinking output: antialiased bilinear of the crop only.
  y = augment.random_resized_crop(
    jax.random.key(0), x, scale=(1.0, 1.0), ratio=(2.0, 2.0), out_size=(4, 8)
  )
  want = jax.image.resize(x[:, 8:24], (3, 4, 8, 2), "linear", antialias=True)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5)


def test_crop_per_example_randomness_independent_of_other_examples():
  x = _images(0, (8, 16, 16, 3))
  x2 = x.at[4:].set(_images(9, (4, 16, 16, 3)))
  key = jax.random.key(7)
  y = augment.random_resized_crop(key, x, scale=(0.1, 0.5))
  y2 = augment.random_resized_crop(key, x2, scale=(0.1, 0.5))
  np.testing.assert_array_equal(np.asarray(y[:4]), np.asarray(y2[:4]))


def test_crop_rejects_bad_arguments():
  x = _images(0)
  with pytest.raises(ValueError, match="scale"):
    augment.random_resized_crop(jax.random.key(0), x, scale=(0.0, 1.0))
  with pytest.raises(ValueError, match="ratio"):
    augment.random_resized_crop(jax.random.key(0), x, ratio=(2.0, 1.0))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    augment.random_resized_crop(jax.random.key(0), x[0])
  with pytest.raises(ValueError, match="float"):
    augment.random_resized_crop(jax.random.key(0), x.astype(jnp.uint8))


# ------------------------------------------------------------ flip


def test_flip_about_half_and_each_flipped_equals_mirror():
  x = _images(0, (2000, 4, 6, 1))
  y = np.asarray(jax.jit(augment.random_flip)(jax.random.key(0), x))
  xn = np.asarray(x)
  mirror = xn[:, :, ::-1]
  same = np.all(y == xn, axis=(1, 2, 3))
  flipped = np.all(y == mirror, axis=(1, 2, 3))
  assert np.all(same ^ flipped)  # every example is exactly one of the two
  assert 0.45 < flipped.mean() < 0.55, flipped.mean()


def test_pad_crop_is_a_translation_with_black_borders_and_covers_every_offset():
  x = _coord_images(4000, 6, 7) + 1.0  # every pixel > 0, so a border (fill -1) shows
  y = np.asarray(augment.random_pad_crop(jax.random.key(0), x, padding=2, fill=-1.0))
  assert y.shape == x.shape
  seen = set()
  for image in y[:400]:
    inside = image[..., 0] != -1.0
    rows, cols = np.nonzero(inside)
    # the kept pixels are one contiguous window of the source, shifted whole
    dy = int(image[rows[0], cols[0], 0] - 1 - rows[0])
    dx = int(image[rows[0], cols[0], 1] - 1 - cols[0])
    assert -2 <= dy <= 2 and -2 <= dx <= 2
    expected = np.full((6, 7), -1.0)
    for r in range(6):
      for c in range(7):
        if 0 <= r + dy < 6 and 0 <= c + dx < 7:
          expected[r, c] = r + dy + 1
    np.testing.assert_array_equal(image[..., 0], expected)
    seen.add((dy, dx))
  assert len(seen) == 25  # all (2 * padding + 1)^2 windows occur
  # per-example randomness does not depend on the other examples
  z = np.asarray(augment.random_pad_crop(jax.random.key(0), x[:10], padding=2, fill=-1.0))
  np.testing.assert_array_equal(z, y[:10])


def test_pad_crop_in_augment_batch_pads_with_black_in_the_normalised_scale():
  white = np.full((64, 8, 8, 1), 255, np.uint8)
  config = _all_off(crop=True, crop_padding=1)
  images, _ = augment.augment_batch(
    jax.random.key(1), white, jnp.zeros(64, jnp.int32), num_classes=2, config=config
  )
  values = set(np.unique(np.round(np.asarray(images), 5)).tolist())
  assert values == {1.0, -1.0}  # (255/255 - .5)/.5 inside, (0 - .5)/.5 on the border
  with pytest.raises(ValueError, match=r"crop_padding=2 needs config\.augment\.crop=True"):
    augment.validate_augment_config(_all_off(crop_padding=2))
  with pytest.raises(ValueError, match=r"config\.augment\.crop_padding=-1"):
    augment.validate_augment_config(_config(crop_padding=-1))


# ------------------------------------------------------------ labels


def test_smooth_labels_exact_values():
  t = np.asarray(augment.smooth_labels(jnp.array([3, 0, 9]), 10, 0.1))
  assert t.dtype == np.float32 and t.shape == (3, 10)
  want = np.full((3, 10), np.float32(0.1 / 10), np.float32)
  want[[0, 1, 2], [3, 0, 9]] = np.float32(1 - 0.1 + 0.1 / 10)
  np.testing.assert_array_equal(t, want)
  np.testing.assert_array_equal(
    np.asarray(augment.smooth_labels(jnp.array([1, 2]), 4, 0.0)),
    np.eye(4, dtype=np.float32)[[1, 2]],
  )
  with pytest.raises(ValueError, match="label_smoothing"):
    augment.smooth_labels(jnp.array([1]), 4, 1.0)
  with pytest.raises(ValueError, match="num_classes"):
    augment.smooth_labels(jnp.array([1]), 0, 0.1)


# ------------------------------------------------------------ mixup / cutmix


def _mix_inputs(batch=8, shape=(8, 8, 3)):
  x = _images(11, (batch,) + shape)
  targets = jnp.eye(batch, dtype=jnp.float32)  # example i has label i
  return x, targets


def _lam_from_targets(t):
  b = t.shape[0]
  lam = np.diagonal(t)  # weight on the example's own label
  np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(t[np.arange(b), b - 1 - np.arange(b)], 1 - lam, atol=1e-6)
  np.testing.assert_allclose(lam, lam[0], atol=1e-6)  # one lambda per batch
  return float(lam[0])


def test_mixup_images_and_targets_use_same_lambda():
  x, t = _mix_inputs()
  lams = []
  for seed in range(3):
    y, ty = augment.mixup_or_cutmix(jax.random.key(seed), x, t, mixup_alpha=0.8, cutmix_alpha=0.0)
    lam = _lam_from_targets(np.asarray(ty))
    lams.append(lam)
    want = lam * np.asarray(x) + (1 - lam) * np.asarray(x)[::-1]
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
  assert len(set(np.round(lams, 6))) == 3 and 0 < min(lams) < max(lams) < 1


def test_cutmix_pasted_fraction_matches_targets():
  b, h, w = 6, 16, 12
  # Constant, distinct images so every pasted pixel is identifiable.
  x = jnp.broadcast_to(jnp.arange(1.0, b + 1)[:, None, None, None], (b, h, w, 2))
  t = jnp.eye(b, dtype=jnp.float32)
  f = jax.jit(lambda k: augment.mixup_or_cutmix(k, x, t, mixup_alpha=0.0, cutmix_alpha=1.0))
  nontrivial = 0
  for seed in range(12):
    y, ty = f(jax.random.key(seed))
    y = np.asarray(y)
    lam = _lam_from_targets(np.asarray(ty))
    pasted = y != np.asarray(x)
    # Pasted pixels come from the reversed batch, the rest are untouched.
    np.testing.assert_array_equal(y[pasted], np.asarray(x)[::-1][pasted])
    for i in range(b):
      np.testing.assert_allclose(pasted[i].mean(), 1 - lam, atol=1e-6)
    # The pasted region is one box, identical for every example.
    region = pasted[0, :, :, 0]
    assert np.all(pasted[..., 0] == region)
    if region.any():
      rows, cols = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
      assert region[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
      nontrivial += 1
  assert nontrivial >= 6


def test_switch_prob_selects_cutmix_or_mixup():
  x, t = _mix_inputs()
  xr = np.asarray(x)[::-1]
  kinds = []
  for switch in (0.0, 0.5, 1.0):
    f = jax.jit(
      lambda k: augment.mixup_or_cutmix(
        k, x, t, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch
      )
    )
    seen = set()
    for seed in range(16):
      y, ty = f(jax.random.key(seed))
      lam = _lam_from_targets(np.asarray(ty))
      y = np.asarray(y)
      is_cut = np.all((y == np.asarray(x)) | (y == xr))
      if not is_cut:
        np.testing.assert_allclose(y, lam * np.asarray(x) + (1 - lam) * xr, atol=1e-5)
      seen.add("cutmix" if is_cut else "mixup")
    kinds.append(seen)
  assert kinds == [{"mixup"}, {"mixup", "cutmix"}, {"cutmix"}]


def test_mix_disabled_is_identity_and_bad_alpha_rejected():
  x, t = _mix_inputs()
  y, ty = augment.mixup_or_cutmix(jax.random.key(0), x, t, mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(ty), np.asarray(t))
  with pytest.raises(ValueError, match="mixup_alpha"):
    augment.mixup_or_cutmix(jax.random.key(0), x, t, mixup_alpha=-1.0, cutmix_alpha=0.0)
  with pytest.raises(ValueError, match="switch_prob"):
    augment.mixup_or_cutmix(
      jax.random.key(0), x, t, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.5
    )


# ------------------------------------------------------------ whole batch


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_batch_jit_uint8(channels):
  cfg = _config()
  images = _uint8(16, 32, 32, channels)
  labels = jnp.arange(16) % 10
  f = jax.jit(lambda k, im, lb: augment.augment_batch(k, im, lb, num_classes=10, config=cfg))
  x, t = f(jax.random.key(0), images, labels)
  assert x.shape == images.shape and x.dtype == jnp.float32
  assert t.shape == (16, 10) and t.dtype == jnp.float32
  x, t = np.asarray(x), np.asarray(t)
  assert np.all(np.isfinite(x))
  assert x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5  # mean = std = 0.5
  np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-5)
  assert t.min() >= 0.1 / 10 - 1e-6  # label smoothing floor survives mixing
  # Differs from plain evaluation preprocessing.
  xe, _ = augment.preprocess_eval(images, labels, num_classes=10, config=cfg)
  assert not np.allclose(x, np.asarray(xe))


def test_augment_batch_same_key_same_output_different_key_differs():
  cfg = _config()
  images = _uint8(8, 16, 16, 3)
  labels = jnp.arange(8)
  f = jax.jit(lambda k: augment.augment_batch(k, images, labels, num_classes=8, config=cfg))
  base = jax.random.key(42)
  a = f(jax.random.fold_in(base, 5))
  b = f(jax.random.fold_in(base, 5))
  c = f(jax.random.fold_in(base, 6))
  for u, v in zip(a, b):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
  assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))


@pytest.mark.parametrize("channels", [1, 3])
def test_all_switches_off_equals_preprocess_eval(channels):
  cfg = _all_off()
  images = _uint8(6, 8, 8, channels, seed=3)
  labels = jnp.array([0, 1, 2, 3, 4, 0])
  x, t = jax.jit(lambda k: augment.augment_batch(k, images, labels, num_classes=5, config=cfg))(
    jax.random.key(9)
  )
  xe, te = augment.preprocess_eval(images, labels, num_classes=5, config=cfg)
  # Same arithmetic; allow 1 ulp in case XLA fuses the two graphs differently.
  np.testing.assert_allclose(np.asarray(x), np.asarray(xe), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(t), np.asarray(te))
  np.testing.assert_array_equal(np.asarray(te), np.eye(5, dtype=np.float32)[labels])


def test_preprocess_eval_per_channel_normalisation():
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
  cfg = _config(mean=mean, std=std)
  images = _uint8(2, 4, 4, 3)
  x, _ = augment.preprocess_eval(images, jnp.array([0, 1]), num_classes=2, config=cfg)
  want = (images.astype(np.float32) / 255 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(np.asarray(x), want, rtol=1e-6, atol=1e-6)


def test_bad_config_and_inputs_raise_value_error_naming_the_key():
  images = _uint8(2, 8, 8, 3)
  labels = jnp.array([0, 1])
  key = jax.random.key(0)

  def run(cfg, im=images):
    return augment.augment_batch(key, im, labels, num_classes=2, config=cfg)

  with pytest.raises(ValueError, match=r"config\.augment\.mean.*length 1 or 3"):
    run(_config(mean=(0.5, 0.5)))
  with pytest.raises(ValueError, match=r"config\.augment\.std"):
    run(_config(std=(0.0,)))
  with pytest.raises(ValueError, match=r"config\.augment\.crop_scale"):
    run(_config(crop_scale=(0.5, 1.5)))
  with pytest.raises(ValueError, match=r"config\.augment\.cutmix_alpha"):
    run(_config(cutmix_alpha=-0.5))
  with pytest.raises(ValueError, match=r"config\.augment\.mix_switch_prob"):
    run(_config(mix_switch_prob=2.0))
  with pytest.raises(ValueError, match=r"config\.augment\.flip"):
    # Any attribute object works as a config; a non-bool switch is rejected.
    run(types.SimpleNamespace(**{**_config().to_dict(), "flip": "yes"}))
  with pytest.raises(ValueError, match="missing field 'cutmix_alpha'"):
    c = _config().to_dict()
    del c["cutmix_alpha"]
    run(ml_collections.ConfigDict(c))
  with pytest.raises(ValueError, match="uint8"):
    run(_config(), im=images.astype(np.float32))
  with pytest.raises(ValueError, match=r"labels must have shape"):
    augment.augment_batch(key, images, jnp.array([0, 1, 1]), num_classes=2, config=_config())
  with pytest.raises(ValueError, match=r"labels must have shape"):
    augment.preprocess_eval(images, jnp.array([[0], [1]]), num_classes=2, config=_config())


def test_default_config_fields():
  c = configuration.default_augment_config()
  assert c.crop and c.flip
  assert c.label_smoothing == 0.1
  assert (c.mixup_alpha, c.cutmix_alpha, c.mix_switch_prob) == (0.8, 1.0, 0.5)
  assert 0 < c.crop_scale[0] < c.crop_scale[1] == 1.0
  augment.validate_augment_config(c)


# ------------------------------------------------------------ RandAugment


# A smooth 32x32 RGB picture on exact 8-bit levels: what timm's PIL ops see.
def _picture(channels=3, size=32, seed=0):
  rng = np.random.RandomState(seed)
  coarse = rng.randint(0, 256, (size // 8, size // 8, channels)).astype(np.float32)
  smooth = jax.image.resize(jnp.asarray(coarse), (size, size, channels), "linear")
  return np.clip(np.round(np.asarray(smooth)), 0, 255).astype(np.uint8)


def _unit(levels):
  """uint8 levels [.., H, W, C] -> float32 [B, H, W, C] in [0, 1]."""
  x = np.asarray(levels, np.float32) / 255.0
  return jnp.asarray(x if x.ndim == 4 else x[None])


def _op(images, name, magnitude, negate=False):
  return np.asarray(augment.rand_augment_op(images, name, magnitude, negate=negate))


# Whole-policy tests share one image shape, so RandAugment compiles once.
_RA_SHAPE = (64, 8, 8)


def test_randaugment_same_key_same_output_other_step_differs():
  x = _images(0, _RA_SHAPE + (3,))
  f = lambda k: augment.rand_augment(k, x)  # timm's rand-m9-mstd0.5-inc1
  base = jax.random.key(3)
  a, b = f(jax.random.fold_in(base, 5)), f(jax.random.fold_in(base, 5))
  c = f(jax.random.fold_in(base, 6))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  # Some examples change, and the two steps change different ones.
  changed_a = np.any(np.asarray(a) != np.asarray(x), axis=(1, 2, 3))
  changed_c = np.any(np.asarray(c) != np.asarray(x), axis=(1, 2, 3))
  assert 16 <= changed_a.sum() <= 60 and not np.array_equal(changed_a, changed_c)


def _op_test_images(channels, seed):
  """[4, 32, 32, C]: black, white, an 8-bit picture, uniform noise."""
  x = _images(seed, (4, 32, 32, channels))
  return x.at[0].set(0.0).at[1].set(1.0).at[2].set(_unit(_picture(channels))[0])


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_magnitude_zero_is_exactly_the_identity(channels):
  x = _op_test_images(channels, seed=1)
  for name in augment.RAND_AUGMENT_OPS:
    for negate in (False, True):
      np.testing.assert_array_equal(_op(x, name, 0.0, negate), np.asarray(x), err_msg=name)
  x = _images(1, _RA_SHAPE + (channels,))  # every op drawn, several times
  y = augment.rand_augment(
    jax.random.key(0), x, num_ops=2, magnitude=0.0, magnitude_std=0.0, prob=1.0
  )
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_every_op_keeps_unit_range(channels):
  x = _op_test_images(channels, seed=2)
  x = x.at[3].set(jnp.round(x[3]))  # black and white pixels
  for name in augment.RAND_AUGMENT_OPS:
    for magnitude in (5.0, 10.0):
      for negate in (False, True):
        y = _op(x, name, magnitude, negate)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert y.min() >= 0.0 and y.max() <= 1.0, (name, magnitude, negate)
  y = augment.rand_augment(
    jax.random.key(1),
    _images(2, _RA_SHAPE + (channels,)),
    num_ops=2,
    magnitude=10.0,
    magnitude_std=3.0,
    prob=1.0,
  )
  assert np.asarray(y).min() >= 0.0 and np.asarray(y).max() <= 1.0


def _pil_reference(image, name, magnitude, negate):
  """timm's op (auto_augment.py's level functions, on PIL), at magnitude m."""
  from PIL import Image, ImageEnhance, ImageOps  # pylint: disable=g-import-not-at-top

  sign = -1 if negate else 1
  level = magnitude / 10
  fill = dict(resample=Image.BILINEAR, fillcolor=(128,) * image.shape[-1])
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  enhance = {
    "ColorIncreasing": ImageEnhance.Color,
    "ContrastIncreasing": ImageEnhance.Contrast,
    "BrightnessIncreasing": ImageEnhance.Brightness,
    "SharpnessIncreasing": ImageEnhance.Sharpness,
  }
  affine = {
    "ShearX": (1, sign * 0.3 * level, 0, 0, 1, 0),
    "ShearY": (1, 0, 0, sign * 0.3 * level, 1, 0),
    "TranslateXRel": (1, 0, sign * 0.45 * level * pil.size[0], 0, 1, 0),
    "TranslateYRel": (1, 0, 0, 0, 1, sign * 0.45 * level * pil.size[1]),
  }
  if name == "AutoContrast":
    out = ImageOps.autocontrast(pil)
  elif name == "Equalize":
    out = ImageOps.equalize(pil)
  elif name == "Invert":
    out = ImageOps.invert(pil)
  elif name == "Rotate":
    out = pil.rotate(sign * 30 * level, **fill)
  elif name == "PosterizeIncreasing":
    out = ImageOps.posterize(pil, 8 - int(level * 4)) if level >= 0.25 else pil
  elif name == "SolarizeIncreasing":
    out = ImageOps.solarize(pil, 256 - int(level * 256))
  elif name == "SolarizeAdd":
    add = int(level * 110)
    out = pil.point([min(255, i + add) if i < 128 else i for i in range(256)] * image.shape[-1])
  elif name in enhance:
    out = enhance[name](pil).enhance(max(0.1, 1 + sign * 0.9 * level))
  else:
    out = pil.transform(pil.size, Image.AFFINE, affine[name], **fill)
  return np.asarray(out, np.float32).reshape(image.shape) / 255


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_ops_match_timm_on_pil(channels):
  # The ops timm applies with PIL, on an 8-bit picture: equal up to PIL's
  # rounding to uint8 (AutoContrast, Equalize, Invert at m = 10, where the blend
  # is the whole op).
  pytest.importorskip("PIL")
  picture = _picture(channels)
  x = _op_test_images(channels, seed=3)  # row 2 is the picture
  for name in augment.RAND_AUGMENT_OPS:
    for magnitude in (10.0,) if name in ("AutoContrast", "Equalize", "Invert") else (3.0, 9.0):
      for negate in (False, True):
        want = _pil_reference(picture, name, magnitude, negate)
        got = _op(x, name, magnitude, negate)[2]
        np.testing.assert_allclose(
          got, want, rtol=0, atol=1.5 / 255, err_msg=f"{name} m={magnitude} negate={negate}"
        )


def test_invert_blends_with_the_magnitude():
  x = _op_test_images(3, seed=4)
  # At m = 10 the blend is the whole op, bit for bit.
  np.testing.assert_array_equal(_op(x, "Invert", 10.0), 1 - np.asarray(x))
  np.testing.assert_allclose(_op(x, "Invert", 5.0), np.full(x.shape, 0.5), atol=1e-6)
  # The other magnitude-free ops blend the same way.
  for name in ("AutoContrast", "Equalize"):
    full, half = _op(x, name, 10.0), _op(x, name, 5.0)
    np.testing.assert_allclose(half, (np.asarray(x) + full) / 2, atol=1e-6)


def test_rotate_moves_a_known_pixel():
  # A bright 3x3 dot 8 pixels right of the centre of a 32x32 image; PIL's
  # rotate (and timm's) turns counter-clockwise, 30 degrees at m = 10.
  x = np.zeros((1, 32, 32, 1), np.float32)
  x[0, 15:18, 23:26] = 1.0  # centred on pixel (16, 24): (dy, dx) = (0.5, 8.5)
  for negate, turn in ((False, 30.0), (True, -30.0)):
    y = _op(jnp.asarray(x), "Rotate", 10.0, negate)[0, ..., 0]
    row, col = np.unravel_index(np.argmax(y), y.shape)
    angle = np.deg2rad(turn)
    dy, dx = 0.5, 8.5
    want_dx = dx * np.cos(angle) + dy * np.sin(angle)
    want_dy = -dx * np.sin(angle) + dy * np.cos(angle)
    assert abs(col + 0.5 - (16 + want_dx)) <= 1 and abs(row + 0.5 - (16 + want_dy)) <= 1, (
      negate,
      row,
      col,
    )
    assert y.max() > 0.5
  assert _op(jnp.asarray(x), "Rotate", 10.0)[0, 0, 0, 0] == 0.5  # corner: grey fill


def test_translate_and_shear_move_content_by_the_level():
  h = w = 32
  x = _coord_images(1, h, w) / (w - 1)  # channel 0 = row, channel 1 = column
  x = jnp.concatenate([x, jnp.zeros_like(x[..., :1])], axis=-1)  # RGB
  y = _op(x, "TranslateXRel", 10.0)[0]  # content moves left by 0.45 * 32 = 14.4
  cols = np.arange(w)
  inside = cols + 14.4 <= w - 1
  np.testing.assert_allclose(
    y[:, inside, 1] * (w - 1), np.broadcast_to(cols[inside] + 14.4, (h, inside.sum())), atol=1e-4
  )
  np.testing.assert_array_equal(y[:, cols + 0.5 + 14.4 >= w], 0.5)  # grey fill
  y = _op(x, "TranslateYRel", 10.0, negate=True)[0]  # moves down by 14.4
  np.testing.assert_array_equal(y[:14], 0.5)
  np.testing.assert_allclose(
    y[15:, :, 0] * (h - 1),
    np.broadcast_to((np.arange(15, h) - 14.4)[:, None], (h - 15, w)),
    atol=1e-4,
  )
  # ShearX moves row r by 0.3 * (r + 0.5) pixels and leaves the rows in place.
  y = _op(x, "ShearX", 10.0)[0]
  shift = y[:, 0, 1] * (w - 1)
  np.testing.assert_allclose(shift, 0.3 * (np.arange(h) + 0.5), atol=1e-4)
  np.testing.assert_allclose(y[:, :10, 0], np.asarray(x)[0, :, :10, 0], atol=1e-5)


def test_posterize_keeps_the_top_bits():
  levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  for magnitude, bits in ((10.0, 4), (9.0, 5), (5.0, 6), (2.4, 8)):
    y = np.round(_op(_unit(levels), "PosterizeIncreasing", magnitude) * 255)
    mask = 0xFF & ~((1 << (8 - bits)) - 1)
    np.testing.assert_array_equal(y, levels & mask, err_msg=f"m={magnitude}")


def test_solarize_inverts_levels_at_or_above_the_threshold():
  levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  x = _unit(levels)
  np.testing.assert_allclose(
    _op(x, "SolarizeIncreasing", 10.0), 1 - np.asarray(x), atol=1e-7
  )  # threshold 0: everything
  y = np.round(_op(x, "SolarizeIncreasing", 5.0) * 255)  # threshold 128
  np.testing.assert_array_equal(y, np.where(levels >= 128, 255 - levels, levels))
  y = np.round(_op(x, "SolarizeAdd", 10.0) * 255)  # +110 below 128
  np.testing.assert_array_equal(
    y, np.where(levels < 128, np.minimum(levels.astype(int) + 110, 255), levels)
  )


def test_equalize_flattens_a_narrow_histogram():
  # 21 neighbouring levels in a 32x32 image, 51 pixels each on the first 20
  # (so Pillow's step, pixels below the top level // 255, is exactly 4):
  # Equalize spreads them evenly over 0..255, in order.
  levels = np.concatenate([np.repeat(np.arange(100, 120), 51), [120] * 4])
  levels = np.random.RandomState(0).permutation(levels).reshape(1, 32, 32, 1)
  y = _op(_unit(levels.astype(np.uint8)), "Equalize", 10.0)
  want = (2 + 51 * np.arange(21)) // 4  # Pillow's lut: (step // 2 + below) // step
  np.testing.assert_allclose(y * 255, want[levels - 100], rtol=0, atol=1e-4)
  values = np.array(
    [np.unique(np.round(y * 255)[levels == level]).item() for level in range(100, 121)]
  )
  assert values[0] == 0 and values[-1] == 255
  assert np.all(np.diff(values) >= 12) and np.all(np.diff(values) <= 13)
  # Fewer than 256 pixels: Pillow's step is 0 and the image is unchanged.
  small = _unit(levels[:, :8, :8].astype(np.uint8))
  np.testing.assert_array_equal(_op(small, "Equalize", 10.0), np.asarray(small))


def test_colour_ops_on_grey_and_rgb():
  rgb = _images(4, (2, 8, 8, 3))
  grey = rgb[..., :1]
  np.testing.assert_array_equal(_op(grey, "ColorIncreasing", 10.0), np.asarray(grey))
  desaturated = _op(rgb, "ColorIncreasing", 10.0, negate=True)  # factor 0.1
  spread = lambda a: np.ptp(a, axis=-1).mean()
  np.testing.assert_allclose(spread(desaturated), 0.1 * spread(np.asarray(rgb)), rtol=1e-4)
  np.testing.assert_allclose(
    _op(rgb, "BrightnessIncreasing", 10.0, negate=True), 0.1 * np.asarray(rgb), atol=1e-6
  )
  stretched = _op(0.2 + 0.4 * rgb, "AutoContrast", 10.0)
  np.testing.assert_allclose(stretched.min(axis=(1, 2)), 0.0, atol=1e-6)
  np.testing.assert_allclose(stretched.max(axis=(1, 2)), 1.0, atol=1e-6)
  flat = _unit(np.full((1, 8, 8, 3), 77, np.uint8))  # nothing to enhance
  for name in ("ContrastIncreasing", "SharpnessIncreasing", "AutoContrast"):
    np.testing.assert_allclose(_op(flat, name, 10.0), 77 / 255, atol=1e-6, err_msg=name)


def test_randaugment_draws_ops_with_replacement_with_prob_and_magnitude_noise():
  # Invert and Posterize at m = 10 on level 55 tell the four two-op sequences
  # apart: II -> 55, PP -> 48, IP -> 192, PI -> 207.
  x = _unit(np.full((4000, 2, 2, 1), 55, np.uint8))
  y = np.round(
    np.asarray(
      augment.rand_augment(
        jax.random.key(0),
        x,
        num_ops=2,
        magnitude=10.0,
        magnitude_std=0.0,
        prob=1.0,
        ops=("Invert", "PosterizeIncreasing"),
      )
    )[:, 0, 0, 0]
    * 255
  )
  for level in (55, 48, 192, 207):
    assert 0.22 < np.mean(y == level) < 0.28, (level, np.mean(y == level))
  # Each drawn op is applied with probability `prob`.
  y = np.asarray(
    augment.rand_augment(
      jax.random.key(1), x, num_ops=1, magnitude=10.0, magnitude_std=0.0, prob=0.3, ops=("Invert",)
    )
  )
  inverted = y[:, 0, 0, 0] != np.asarray(x)[:, 0, 0, 0]
  assert 0.27 < inverted.mean() < 0.33
  # Magnitudes ~ N(magnitude, std) clipped to [0, 10]: Invert on black shows m / 10.
  black = jnp.zeros_like(x)
  m = (
    10
    * np.asarray(
      augment.rand_augment(
        jax.random.key(2),
        black,
        num_ops=1,
        magnitude=9.0,
        magnitude_std=1.0,
        prob=1.0,
        ops=("Invert",),
      )
    )[:, 0, 0, 0]
  )
  assert abs(np.median(m) - 9.0) < 0.1 and m.max() <= 10.0
  assert 0.14 < np.mean(m >= 10.0 - 1e-5) < 0.18  # P(N(9, 1) > 10) = 0.16
  # Directional ops pick their sign at random: half move left, half right.
  ramp = _coord_images(2000, 4, 8)[..., 1:] / 7
  y = np.asarray(
    augment.rand_augment(
      jax.random.key(3),
      ramp,
      num_ops=1,
      magnitude=5.0,
      magnitude_std=0.0,
      prob=1.0,
      ops=("TranslateXRel",),
    )
  )
  moved_left = y[:, 1, 3, 0] > np.asarray(ramp)[:, 1, 3, 0]
  assert 0.45 < moved_left.mean() < 0.55


def test_randaugment_rejects_bad_arguments():
  x = _images(0, (2, 8, 8, 3))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="ops=.*not allowed"):
    augment.rand_augment(key, x, ops=("Rotate", "Cutout"))
  with pytest.raises(ValueError, match="magnitude=12"):
    augment.rand_augment(key, x, magnitude=12)
  with pytest.raises(ValueError, match="num_ops"):
    augment.rand_augment(key, x, num_ops=-1)
  with pytest.raises(ValueError, match="float images"):
    augment.rand_augment(key, x.astype(jnp.uint8))
  with pytest.raises(ValueError, match="1-channel.*3-channel"):
    augment.rand_augment_op(_images(0, (2, 8, 8, 2)), "Invert", 5.0)


# ------------------------------------------------------------ random erasing


def _erased(x, y):
  """Per example: the erased mask [B, H, W] (pixels that changed)."""
  return np.any(np.asarray(y) != np.asarray(x), axis=-1)


# Erasing tests share one image shape, so erasing compiles once.
_ERASE_SHAPE = (500, 32, 32, 3)


def test_erasing_probability_zero_is_the_identity():
  x = _images(5, _ERASE_SHAPE)
  y = augment.random_erasing(jax.random.key(0), x, probability=0.0)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_erasing_probability_one_erases_one_box_of_allowed_size_with_noise():
  b, h, w, _ = _ERASE_SHAPE
  x = jnp.full(_ERASE_SHAPE, 100.0)  # far outside the noise: every change shows
  y = np.asarray(augment.random_erasing(jax.random.key(1), x, probability=1.0))
  mask = _erased(x, y)
  areas, aspects = [], []
  for i in range(b):
    rows, cols = np.nonzero(mask[i].any(1))[0], np.nonzero(mask[i].any(0))[0]
    box_h, box_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert mask[i].sum() == box_h * box_w  # one filled rectangle
    assert box_h < h and box_w < w  # fits strictly inside, as in timm
    areas.append(box_h * box_w / (h * w))
    aspects.append(box_w / box_h)
  areas, aspects = np.array(areas), np.array(aspects)
  # Area fraction in [0.02, 1/3] and aspect in [0.3, 3.3], up to rounding the
  # sides to whole pixels.
  assert areas.min() >= 0.015 and areas.max() <= 0.38, (areas.min(), areas.max())
  assert aspects.min() >= 0.25 and aspects.max() <= 4.0
  assert aspects.min() < 0.5 and aspects.max() > 2.0 and areas.max() > 0.25
  # Inside the box: per-pixel, per-channel standard normal noise.
  noise = y[np.broadcast_to(mask[..., None], y.shape)]
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02
  assert np.all(y[mask][:, 0] != y[mask][:, 1])


def test_erasing_rate_and_skip_when_no_box_fits():
  x = jnp.full(_ERASE_SHAPE, 100.0)
  y = augment.random_erasing(jax.random.key(2), x, probability=0.25)
  rate = _erased(x, y).any(axis=(1, 2)).mean()
  assert 0.19 < rate < 0.31, rate  # 3 standard deviations for 500 examples
  # A full-image box never fits strictly inside: nothing is erased (timm skips).
  y = augment.random_erasing(
    jax.random.key(2), x, probability=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0)
  )
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


# ------------------------------------------------------------ whole batch, new options


def _deit(**overrides):
  """DeiT's recipe: rand-m9-mstd0.5-inc1 and erasing 0.25 on the defaults."""
  return _config(
    **{
      "randaugment_ops": 2,
      "randaugment_magnitude": 9.0,
      "randaugment_magnitude_std": 0.5,
      "erase_prob": 0.25,
      **overrides,
    }
  )


def test_augment_batch_with_randaugment_and_erasing_jit_uint8_grey():
  # (RGB: the sharding test below runs the same under jit.)
  images = _uint8(16, 16, 16, 1)
  labels = jnp.arange(16) % 10
  f = jax.jit(lambda k: augment.augment_batch(k, images, labels, num_classes=10, config=_deit()))
  x, t = f(jax.random.key(0))
  assert x.shape == images.shape and x.dtype == jnp.float32 and t.shape == (16, 10)
  x = np.asarray(x)
  assert np.all(np.isfinite(x))
  np.testing.assert_allclose(np.asarray(t).sum(axis=1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(f(jax.random.key(0))[0]), x)
  assert not np.array_equal(np.asarray(f(jax.random.fold_in(jax.random.key(0), 1))[0]), x)
  xe, _ = augment.preprocess_eval(images, labels, num_classes=10, config=_deit())
  assert not np.allclose(x, np.asarray(xe))


def test_augment_batch_unchanged_when_new_options_off():
  # The path without RandAugment and erasing is the same arithmetic, in the
  # same order, with the same streams, as before they existed. (Bit for bit
  # against the code before them; against this hand-composed graph, XLA's
  # fusion leaves ulps, as it did before.)
  cfg = _config()
  assert cfg.randaugment_ops == 0 and cfg.erase_prob == 0.0
  images = _uint8(8, 16, 16, 3, seed=4)
  labels = jnp.arange(8) % 5
  key = jax.random.key(11)

  @jax.jit
  def reference(key):
    x = augment.normalize(images, cfg.mean, cfg.std)
    x = augment.random_resized_crop(
      jax.random.fold_in(key, 0), x, scale=cfg.crop_scale, ratio=cfg.crop_ratio
    )
    x = augment.random_flip(jax.random.fold_in(key, 1), x)
    t = augment.smooth_labels(labels, 5, cfg.label_smoothing)
    return augment.mixup_or_cutmix(
      jax.random.fold_in(key, 2),
      x,
      t,
      mixup_alpha=cfg.mixup_alpha,
      cutmix_alpha=cfg.cutmix_alpha,
      switch_prob=cfg.mix_switch_prob,
    )

  got = jax.jit(lambda k: augment.augment_batch(k, images, labels, num_classes=5, config=cfg))(key)
  for u, v in zip(got, reference(key)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=1e-6)


def test_augment_batch_randaugment_magnitude_zero_and_erasing_keep_other_draws():
  images = _uint8(8, 16, 16, 3, seed=5)
  labels = jnp.arange(8)
  key = jax.random.key(12)

  def run(cfg):
    return np.asarray(
      jax.jit(lambda k: augment.augment_batch(k, images, labels, num_classes=8, config=cfg))(key)[0]
    )

  plain = run(_config(mixup_alpha=0.0, cutmix_alpha=0.0))
  # RandAugment at magnitude 0 leaves the crop and flip; only the order of
  # normalising and cropping differs (rounding).
  zero = run(
    _config(
      mixup_alpha=0.0,
      cutmix_alpha=0.0,
      randaugment_ops=2,
      randaugment_magnitude=0.0,
      randaugment_magnitude_std=0.0,
    )
  )
  np.testing.assert_allclose(zero, plain, rtol=0, atol=1e-6)
  # Erasing has its own stream: outside the boxes nothing moves.
  erased = run(_config(mixup_alpha=0.0, cutmix_alpha=0.0, erase_prob=1.0))
  outside = ~np.any(erased != plain, axis=-1)
  assert np.all(outside.mean(axis=(1, 2)) < 0.99)  # every example has a box
  np.testing.assert_array_equal(erased[outside], plain[outside])


def test_augment_batch_new_options_independent_of_sharding_and_batch():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  by_example = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Mixing pairs example i with B - 1 - i (and, as before this test, XLA fuses
  # it differently per sharding, an ulp apart), so it is off here.
  cfg = _deit(erase_prob=0.5, mixup_alpha=0.0, cutmix_alpha=0.0)
  images = _uint8(16, 16, 16, 3, seed=6)
  labels = jnp.arange(16) % 10

  def run(key, im, lb):
    return augment.augment_batch(key, im, lb, num_classes=10, config=cfg)

  key = jax.random.key(13)
  whole = jax.jit(run)(key, images, labels)
  sharded = jax.jit(
    run, in_shardings=(replicated, by_example, by_example), out_shardings=(by_example, by_example)
  )(key, jax.device_put(images, by_example), jax.device_put(labels, by_example))
  assert len(sharded[0].sharding.device_set) == 8
  for u, v in zip(sharded, whole):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  # RandAugment ran on [0, 1] pixels before normalising: the darker half of
  # these uniform images is still below the mean (on normalised values its
  # clip to [0, 1] would leave negatives only in the erased boxes).
  assert np.mean(np.asarray(whole[0]) < 0) > 0.3

  # Example i's RandAugment and erasing depend on its own key only: run alone
  # on split(key, B)[i], it matches its row of the batch.
  x = _images(7, _RA_SHAPE + (3,))
  keys = jax.random.split(key, x.shape[0])
  ra = jax.jit(augment._rand_augment_keyed, static_argnums=(5, 6))
  ra_args = (9.0, 0.5, 1.0, 2, augment.RAND_AUGMENT_OPS)
  batch = np.asarray(
    augment.rand_augment(key, x, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=1.0)
  )
  erase = jax.jit(augment._random_erasing_keyed, static_argnums=(3, 4))
  erase_args = (0.5, (0.02, 1 / 3), (0.3, 1 / 0.3))
  erased = np.asarray(augment.random_erasing(key, x, probability=0.5))
  assert np.mean(np.any(batch != np.asarray(x), axis=(1, 2, 3))) > 0.7
  assert 0.3 < np.mean(np.any(erased != np.asarray(x), axis=(1, 2, 3))) < 0.7
  for i in (0, 5, 63):
    np.testing.assert_array_equal(
      np.asarray(ra(keys[i : i + 1], x[i : i + 1], *ra_args))[0], batch[i]
    )
    np.testing.assert_array_equal(
      np.asarray(erase(keys[i : i + 1], x[i : i + 1], *erase_args))[0], erased[i]
    )


def test_bad_new_config_values_raise_value_error_naming_the_key():
  images = _uint8(2, 8, 8, 3)
  labels = jnp.array([0, 1])

  def run(cfg, im=images):
    return augment.augment_batch(jax.random.key(0), im, labels, num_classes=2, config=cfg)

  for key, value, allowed in (
    ("randaugment_ops", -1, "integer >= 0"),
    ("randaugment_ops", 1.5, "integer >= 0"),
    ("randaugment_ops", True, "integer >= 0"),
    ("randaugment_magnitude", 11.0, r"\[0, 10\]"),
    ("randaugment_magnitude", -0.5, r"\[0, 10\]"),
    ("randaugment_magnitude", "high", r"\[0, 10\]"),
    ("randaugment_magnitude_std", -0.5, ">= 0"),
    ("randaugment_magnitude_std", float("inf"), ">= 0"),
    ("erase_prob", 1.5, r"\[0, 1\]"),
    ("erase_prob", -0.1, r"\[0, 1\]"),
  ):
    # Any attribute object is a config (ConfigDict itself refuses some types).
    with pytest.raises(ValueError, match=rf"config\.augment\.{key}={value!r}.*{allowed}"):
      run(types.SimpleNamespace(**{**_config().to_dict(), key: value}))
  with pytest.raises(ValueError, match="missing field 'erase_prob'"):
    c = _config().to_dict()
    del c["erase_prob"]
    run(ml_collections.ConfigDict(c))
  with pytest.raises(ValueError, match=r"config\.augment\.randaugment_ops.*channels"):
    run(_deit(), im=_uint8(2, 8, 8, 4))
  # The defaults are valid and off.
  c = configuration.default_augment_config()
  assert (
    c.randaugment_ops,
    c.randaugment_magnitude,
    c.randaugment_magnitude_std,
    c.erase_prob,
  ) == (0, 9.0, 0.5, 0.0)


def test_equalize_counts_the_same_by_comparison_as_by_scatter():
  # The TPU form (compare every pixel with the 256 levels) and the CPU form
  # (scatter-add histogram, gathered lookup) give identical histograms and
  # tables, so Equalize does not depend on the device it is compiled for.
  rng = np.random.RandomState(3)
  levels = jnp.asarray(
    np.concatenate(
      [
        rng.randint(0, 256, (3, 64, 3)),  # spread
        rng.randint(100, 104, (2, 64, 3)),  # narrow
        np.full((1, 64, 3), 7),
      ]
    ),
    jnp.int32,
  )  # one level
  hist = augment._histogram_by_scatter(levels)
  np.testing.assert_array_equal(augment._histogram_by_comparison(levels), hist)
  assert int(hist.sum()) == levels.size
  lut = jnp.asarray(rng.randint(0, 256, (6, 256, 3)), jnp.int32)
  np.testing.assert_array_equal(
    augment._lookup_by_comparison(lut, levels), augment._lookup_by_gather(lut, levels)
  )
