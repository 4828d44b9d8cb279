"""Tests for pixel_vit.data.augment (on-device augmentation in JAX)."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pixel_vit.data import augment


def _images(key, shape=(8, 32, 32, 3)):
  return jax.random.uniform(jax.random.key(key), shape, jnp.float32)


def _coord_images(batch, height, width):
  """Channel 0 = row index, channel 1 = column index (linear ramps)."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  img = np.stack([rows, cols], axis=-1).astype(np.float32)
  return jnp.asarray(np.broadcast_to(img, (batch, height, width, 2)))


def _config(**overrides):
  c = augment.default_augment_config()
  for k, v in overrides.items():
    c[k] = v
  return c


def _all_off(**overrides):
  return _config(crop=False, flip=False, label_smoothing=0.0, mixup_alpha=0.0,
                 cutmix_alpha=0.0, **overrides)


def _uint8(batch, height, width, channels, seed=0):
  rng = np.random.RandomState(seed)
  return rng.randint(0, 256, (batch, height, width, channels)).astype(np.uint8)


# ------------------------------------------------------------ resized crop


def test_crop_full_scale_square_ratio_is_identity():
  x = _images(0)
  y = augment.random_resized_crop(jax.random.key(1), x, scale=(1.0, 1.0),
                                  ratio=(1.0, 1.0))
  np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6)


def test_crop_static_shape_under_jit_and_values_in_range():
  x = _images(0, (6, 24, 20, 3))

  @jax.jit
  def f(key, images):
    return (augment.random_resized_crop(key, images),
            augment.random_resized_crop(key, images, scale=(0.05, 0.3),
                                        out_size=(16, 12)))

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
  y = np.asarray(augment.random_resized_crop(
      jax.random.key(4), x, scale=(0.25, 0.5), ratio=(0.5, 2.0)))
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
  y = augment.random_resized_crop(jax.random.key(0), x, scale=(1.0, 1.0),
                                  ratio=(2.0, 2.0))
  want = jax.image.resize(x[:, 8:24], x.shape, "linear")
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5)
  # Shrinking output: antialiased bilinear of the crop only.
  y = augment.random_resized_crop(jax.random.key(0), x, scale=(1.0, 1.0),
                                  ratio=(2.0, 2.0), out_size=(4, 8))
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


# ------------------------------------------------------------ labels


def test_smooth_labels_exact_values():
  t = np.asarray(augment.smooth_labels(jnp.array([3, 0, 9]), 10, 0.1))
  assert t.dtype == np.float32 and t.shape == (3, 10)
  want = np.full((3, 10), np.float32(0.1 / 10), np.float32)
  want[[0, 1, 2], [3, 0, 9]] = np.float32(1 - 0.1 + 0.1 / 10)
  np.testing.assert_array_equal(t, want)
  np.testing.assert_array_equal(
      np.asarray(augment.smooth_labels(jnp.array([1, 2]), 4, 0.0)),
      np.eye(4, dtype=np.float32)[[1, 2]])
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
  np.testing.assert_allclose(t[np.arange(b), b - 1 - np.arange(b)], 1 - lam,
                             atol=1e-6)
  np.testing.assert_allclose(lam, lam[0], atol=1e-6)  # one lambda per batch
  return float(lam[0])


def test_mixup_images_and_targets_use_same_lambda():
  x, t = _mix_inputs()
  lams = []
  for seed in range(3):
    y, ty = augment.mixup_or_cutmix(jax.random.key(seed), x, t,
                                    mixup_alpha=0.8, cutmix_alpha=0.0)
    lam = _lam_from_targets(np.asarray(ty))
    lams.append(lam)
    want = lam * np.asarray(x) + (1 - lam) * np.asarray(x)[::-1]
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
  assert len(set(np.round(lams, 6))) == 3 and 0 < min(lams) < max(lams) < 1


def test_cutmix_pasted_fraction_matches_targets():
  b, h, w = 6, 16, 12
  # Constant, distinct images so every pasted pixel is identifiable.
  x = jnp.broadcast_to(jnp.arange(1.0, b + 1)[:, None, None, None],
                       (b, h, w, 2))
  t = jnp.eye(b, dtype=jnp.float32)
  f = jax.jit(lambda k: augment.mixup_or_cutmix(k, x, t, mixup_alpha=0.0,
                                                cutmix_alpha=1.0))
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
      assert region[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
      nontrivial += 1
  assert nontrivial >= 6


def test_switch_prob_selects_cutmix_or_mixup():
  x, t = _mix_inputs()
  xr = np.asarray(x)[::-1]
  kinds = []
  for switch in (0.0, 0.5, 1.0):
    f = jax.jit(lambda k: augment.mixup_or_cutmix(
        k, x, t, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch))
    seen = set()
    for seed in range(16):
      y, ty = f(jax.random.key(seed))
      lam = _lam_from_targets(np.asarray(ty))
      y = np.asarray(y)
      is_cut = np.all((y == np.asarray(x)) | (y == xr))
      if not is_cut:
        np.testing.assert_allclose(
            y, lam * np.asarray(x) + (1 - lam) * xr, atol=1e-5)
      seen.add("cutmix" if is_cut else "mixup")
    kinds.append(seen)
  assert kinds == [{"mixup"}, {"mixup", "cutmix"}, {"cutmix"}]


def test_mix_disabled_is_identity_and_bad_alpha_rejected():
  x, t = _mix_inputs()
  y, ty = augment.mixup_or_cutmix(jax.random.key(0), x, t, mixup_alpha=0.0,
                                  cutmix_alpha=0.0)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(ty), np.asarray(t))
  with pytest.raises(ValueError, match="mixup_alpha"):
    augment.mixup_or_cutmix(jax.random.key(0), x, t, mixup_alpha=-1.0,
                            cutmix_alpha=0.0)
  with pytest.raises(ValueError, match="switch_prob"):
    augment.mixup_or_cutmix(jax.random.key(0), x, t, mixup_alpha=1.0,
                            cutmix_alpha=1.0, switch_prob=1.5)


# ------------------------------------------------------------ whole batch


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_batch_jit_uint8(channels):
  cfg = _config()
  images = _uint8(16, 32, 32, channels)
  labels = jnp.arange(16) % 10
  f = jax.jit(lambda k, im, lb: augment.augment_batch(
      k, im, lb, num_classes=10, config=cfg))
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
  f = jax.jit(lambda k: augment.augment_batch(k, images, labels,
                                              num_classes=8, config=cfg))
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
  x, t = jax.jit(lambda k: augment.augment_batch(
      k, images, labels, num_classes=5, config=cfg))(jax.random.key(9))
  xe, te = augment.preprocess_eval(images, labels, num_classes=5, config=cfg)
  # Same arithmetic; allow 1 ulp in case XLA fuses the two graphs differently.
  np.testing.assert_allclose(np.asarray(x), np.asarray(xe), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(t), np.asarray(te))
  np.testing.assert_array_equal(np.asarray(te), np.eye(5, dtype=np.float32)[labels])


def test_preprocess_eval_per_channel_normalisation():
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
  cfg = _config(mean=mean, std=std)
  images = _uint8(2, 4, 4, 3)
  x, _ = augment.preprocess_eval(images, jnp.array([0, 1]), num_classes=2,
                                 config=cfg)
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
    augment.augment_batch(key, images, jnp.array([0, 1, 1]), num_classes=2,
                          config=_config())
  with pytest.raises(ValueError, match=r"labels must have shape"):
    augment.preprocess_eval(images, jnp.array([[0], [1]]), num_classes=2,
                            config=_config())


def test_default_config_fields():
  c = augment.default_augment_config()
  assert c.crop and c.flip
  assert c.label_smoothing == 0.1
  assert (c.mixup_alpha, c.cutmix_alpha, c.mix_switch_prob) == (0.8, 1.0, 0.5)
  assert 0 < c.crop_scale[0] < c.crop_scale[1] == 1.0
  augment.validate_augment_config(c)
