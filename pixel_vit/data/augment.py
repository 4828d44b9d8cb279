"""On-device data augmentation for image classification, in pure JAX.

The DeiT / timm recipe that the PiT paper trains CIFAR-100 with from scratch:
random resized crop, horizontal flip, RandAugment, label smoothing, random
erasing and batch-level mixup / cutmix. Every function here is jit-able,
vectorised over the batch (no Python loops over examples, no host syncs) and
keeps shapes static.

Randomness is a pure function of ``(key, batch)``. Per-example draws come from
``jax.random.split(key, B)``, so example ``i`` gets the same crop, flip,
RandAugment ops and erased box however the global batch is sharded across
devices. The training loop passes ``key = jax.random.fold_in(base_key, step)``
so a resumed run replays the same augmentations.

Configuration fields read by :func:`augment_batch` / :func:`preprocess_eval`
(see `pixel_vit.configuration.default_augment_config`): ``mean``, ``std``, ``crop``,
``crop_scale``, ``crop_ratio``, ``crop_padding``, ``flip``, ``randaugment_ops``,
``randaugment_magnitude``, ``randaugment_magnitude_std``, ``erase_prob``,
``label_smoothing``, ``mixup_alpha``, ``cutmix_alpha``, ``mix_switch_prob``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from pixel_vit import configuration, hardware

__all__ = [
  "RAND_AUGMENT_OPS",
  "augment_batch",
  "mixup_or_cutmix",
  "normalize",
  "preprocess_eval",
  "rand_augment",
  "rand_augment_op",
  "random_erasing",
  "random_flip",
  "random_pad_crop",
  "random_resized_crop",
  "smooth_labels",
  "validate_augment_config",
]

# Candidate boxes drawn per example before falling back to a centre crop, as in
# torchvision's RandomResizedCrop (which tries 10 times in a Python loop; here
# all trials are drawn at once and the first valid one is selected).
_CROP_TRIALS = 10

# Candidate boxes per example for random erasing: timm's RandomErasing makes 10
# attempts and erases nothing when none fits.
_ERASE_TRIALS = 10

# Stream ids for jax.random.fold_in in augment_batch: each transform has its own
# stream, so switching one transform off does not change the others' draws.
_STREAM_CROP, _STREAM_FLIP, _STREAM_MIX = 0, 1, 2
_STREAM_RANDAUGMENT, _STREAM_ERASE = 3, 4

# RandAugment magnitudes run from 0 (identity) to 10: timm's _LEVEL_DENOM, which
# every op's level function divides by, and the clip of the sampled magnitude.
_MAX_MAGNITUDE = 10.0


# --------------------------------------------------------------------------
# Validation (static, at trace time).
# --------------------------------------------------------------------------


def _field(config: Any, name: str) -> Any:
  try:
    return getattr(config, name)
  except (AttributeError, KeyError):
    raise ValueError(
      f"augment config is missing field {name!r}; expected the fields of "
      "default_augment_config(): "
      f"{sorted(configuration.default_augment_config().keys())}"
    ) from None


def _check_range_pair(
  name: str, value: Any, *, positive: bool, upper: float | None
) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(
      f"{name}={value!r} is not allowed: expected a pair (low, high) of numbers"
    ) from None
  ok = lo <= hi and (lo > 0 if positive else lo >= 0)
  ok = ok and math.isfinite(hi) and (upper is None or hi <= upper)
  if not ok:
    bound = ("0 < low" if positive else "0 <= low") + " <= high"
    bound += f" <= {upper}" if upper is not None else ""
    raise ValueError(f"{name}={value!r} is not allowed: expected {bound}")
  return lo, hi


def _check_scale_ratio(
  scale: Any, ratio: Any, prefix: str = ""
) -> tuple[tuple[float, float], tuple[float, float]]:
  return (
    _check_range_pair(prefix + "scale", scale, positive=True, upper=1.0),
    _check_range_pair(prefix + "ratio", ratio, positive=True, upper=None),
  )


def _check_prob(name: str, value: Any, *, upper_open: bool = False) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(
      f"{name}={value!r} is not allowed: expected a number "
      "(a static Python value, not a traced array)"
    ) from None
  if not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0):
    interval = "[0, 1)" if upper_open else "[0, 1]"
    raise ValueError(f"{name}={value!r} is not allowed: expected a value in {interval}")
  return v


def _check_alpha(name: str, value: Any, zero_means: str = "0 disables it") -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(
      f"{name}={value!r} is not allowed: expected a number >= 0 "
      "(a static Python value, not a traced array)"
    ) from None
  if not (v >= 0.0 and math.isfinite(v)):
    raise ValueError(
      f"{name}={value!r} is not allowed: expected a finite number >= 0 ({zero_means})"
    )
  return v


def _check_num_ops(name: str, value: Any) -> int:
  # bool is an Integral too, but True ops is a typo, not a count.
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(
      f"{name}={value!r} is not allowed: expected an integer >= 0 "
      "(ops per image; 0 turns RandAugment off, timm / DeiT use 2)"
    )
  return int(value)


def _check_padding(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(
      f"{name}={value!r} is not allowed: expected an integer >= 0 (pixels of "
      "padding on each side; 0 = no padded crop, CIFAR recipes use 4 at 32x32)"
    )
  return int(value)


def _check_magnitude(name: str, value: Any) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    v = math.nan
  if not 0.0 <= v <= _MAX_MAGNITUDE:
    raise ValueError(
      f"{name}={value!r} is not allowed: expected a number in "
      f"[0, {_MAX_MAGNITUDE:g}] (timm's RandAugment scale; 0 is the "
      "identity, DeiT uses 9)"
    )
  return v


def _check_channel_stats(
  mean: Any, std: Any, channels: int | None = None, prefix: str = "config.augment."
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  stats = []
  for name, value in (("mean", mean), ("std", std)):
    try:
      vals = tuple(float(v) for v in value)
    except TypeError:
      vals = (float(value),) if isinstance(value, (int, float)) else ()
    if not vals or (channels is not None and len(vals) not in (1, channels)):
      allowed = (
        "a non-empty per-channel sequence"
        if channels is None
        else f"a sequence of length 1 or {channels} (the image channels)"
      )
      raise ValueError(f"{prefix}{name}={value!r} is not allowed: expected {allowed}")
    if name == "std" and any(not v > 0 for v in vals):
      raise ValueError(f"{prefix}std={value!r} is not allowed: every entry must be > 0")
    stats.append(vals)
  return stats[0], stats[1]


def validate_augment_config(config: Any) -> None:
  """Raises ValueError naming the key, value and what is allowed."""
  _check_channel_stats(_field(config, "mean"), _field(config, "std"))
  for name in ("crop", "flip"):
    if not isinstance(_field(config, name), bool):
      raise ValueError(
        f"config.augment.{name}={_field(config, name)!r} is not allowed: expected True or False"
      )
  _check_scale_ratio(
    _field(config, "crop_scale"), _field(config, "crop_ratio"), prefix="config.augment.crop_"
  )
  padding = _check_padding("config.augment.crop_padding", _field(config, "crop_padding"))
  if padding and not _field(config, "crop"):
    raise ValueError(
      f"config.augment.crop_padding={padding} needs config.augment.crop=True "
      "(the padded crop replaces the random resized crop); set crop_padding=0 "
      "for no crop at all"
    )
  _check_num_ops("config.augment.randaugment_ops", _field(config, "randaugment_ops"))
  _check_magnitude("config.augment.randaugment_magnitude", _field(config, "randaugment_magnitude"))
  _check_alpha(
    "config.augment.randaugment_magnitude_std",
    _field(config, "randaugment_magnitude_std"),
    zero_means="0 keeps every op at randaugment_magnitude",
  )
  _check_prob("config.augment.erase_prob", _field(config, "erase_prob"))
  _check_prob("config.augment.label_smoothing", _field(config, "label_smoothing"), upper_open=True)
  _check_alpha("config.augment.mixup_alpha", _field(config, "mixup_alpha"))
  _check_alpha("config.augment.cutmix_alpha", _field(config, "cutmix_alpha"))
  _check_prob("config.augment.mix_switch_prob", _field(config, "mix_switch_prob"))


def _check_images(images: jax.Array, what: str = "images") -> None:
  if images.ndim != 4:
    raise ValueError(f"{what} must have shape [B, H, W, C]; got shape {tuple(images.shape)}")


def _check_labels(labels: jax.Array, batch: int) -> None:
  if labels.shape != (batch,):
    raise ValueError(
      f"labels must have shape [B] = ({batch},) to match the "
      f"images; got shape {tuple(labels.shape)}"
    )


# --------------------------------------------------------------------------
# Geometric transforms.
# --------------------------------------------------------------------------


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """torchvision's fallback: a centre crop with aspect clamped to `ratio`."""
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w = width
    h = int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    h = height
    w = int(round(h * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _box_trials(
  key: jax.Array,
  num_trials: int,
  height: int,
  width: int,
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Candidate boxes (top, left, h, w), each [num_trials], integers as float32.

  Area fraction uniform in `scale`, aspect w / h log-uniform in `ratio`, sides
  rounded, offsets uniform among the positions where the box fits (a box
  larger than the image gets meaningless offsets; callers check the sizes).
  """
  # One draw of 4 x T uniforms: area, log-ratio, top and left per trial.
  u_area, u_ratio, u_top, u_left = jax.random.uniform(key, (4, num_trials))
  area = height * width
  target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio)
  w = jnp.round(jnp.sqrt(target_area * aspect))
  h = jnp.round(jnp.sqrt(target_area / aspect))
  # Uniform integer offsets in [0, H - h] and [0, W - w].
  top = jnp.minimum(jnp.floor(u_top * (height - h + 1)), height - h)
  left = jnp.minimum(jnp.floor(u_left * (width - w + 1)), width - w)
  return top, left, h, w


def _sample_crop_box(
  key: jax.Array, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> jax.Array:
  """One example's crop box [top, left, h, w] (integers, as float32)."""
  top, left, h, w = _box_trials(key, _CROP_TRIALS, height, width, scale, ratio)
  valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  trials = jnp.stack([top, left, h, w], axis=-1)  # [T, 4]
  first = jnp.argmax(valid)  # index of the first valid trial (0 if none)
  fallback = jnp.asarray(_fallback_box(height, width, ratio), jnp.float32)
  return jnp.where(jnp.any(valid), trials[first], fallback)


def _resize_weights(start: jax.Array, size: jax.Array, in_size: int, out_size: int) -> jax.Array:
  """[out_size, in_size] bilinear weights resizing input[start:start+size].

  Half-pixel centres (align_corners=False); when downsampling the triangle
  kernel is widened (antialiasing), as in torchvision / PIL. Only pixels
  inside the crop get weight (crop-then-resize semantics, so nothing bleeds
  in from outside the box) and every row is normalised to sum to 1.
  """
  inv_scale = size / out_size
  kernel_scale = jnp.maximum(inv_scale, 1.0)
  sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale + start - 0.5
  idx = jnp.arange(in_size, dtype=jnp.float32)
  w = jnp.maximum(0.0, 1.0 - jnp.abs(sample[:, None] - idx[None, :]) / kernel_scale)
  inside = (idx >= start) & (idx < start + size)
  w = jnp.where(inside[None, :], w, 0.0)
  # Every sample lies within half a pixel of a crop pixel, so sums are > 0.
  return w / jnp.sum(w, axis=1, keepdims=True)


def _crop_and_resize(image: jax.Array, box: jax.Array, out_size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of image[top:top+h, left:left+w] to out_size."""
  top, left, h, w = box[0], box[1], box[2], box[3]
  height, width, _ = image.shape
  wy = _resize_weights(top, h, height, out_size[0])
  wx = _resize_weights(left, w, width, out_size[1])
  hp = jax.lax.Precision.HIGHEST  # keep f32 accuracy on TPU/GPU matmul units
  out = jnp.einsum("oh,hwc->owc", wy, image.astype(jnp.float32), precision=hp)
  return jnp.einsum("pw,owc->opc", wx, out, precision=hp)


def random_resized_crop(
  key: jax.Array,
  images: jax.Array,
  *,
  scale: Sequence[float] = (0.08, 1.0),
  ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
  out_size: int | Sequence[int] | None = None,
) -> jax.Array:
  """torchvision-style RandomResizedCrop, one box per example.

  Args:
    key: PRNG key; example i uses ``jax.random.split(key, B)[i]``.
    images: float [B, H, W, C].
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio (w / h), sampled log-uniformly.
    out_size: (height, width) or int of the output; default (H, W).

  Returns:
    [B, out_h, out_w, C] in images.dtype. Bilinear interpolation (antialiased
    when shrinking) of the crop only, like torchvision's resized_crop; the
    weights are non-negative and normalised, so values stay within the input
    range. Implemented as two small per-example weight-matrix contractions
    (vmapped), so shapes are static under jit.
  """
  _check_images(images)
  scale, ratio = _check_scale_ratio(scale, ratio)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
      f"random_resized_crop needs float images; got dtype "
      f"{images.dtype} (normalise uint8 images first)"
    )
  batch, height, width, _ = images.shape
  if out_size is None:
    out_size = (height, width)
  elif isinstance(out_size, int):
    out_size = (out_size, out_size)
  out_size = tuple(int(s) for s in out_size)
  if len(out_size) != 2 or min(out_size) <= 0:
    raise ValueError(
      f"out_size={out_size!r} is not allowed: expected a positive int or (height, width)"
    )
  return _random_resized_crop(key, images, scale, ratio, out_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _random_resized_crop(key, images, scale, ratio, out_size):
  batch, height, width, _ = images.shape
  keys = jax.random.split(key, batch)
  boxes = jax.vmap(lambda k: _sample_crop_box(k, height, width, scale, ratio))(keys)
  out = jax.vmap(lambda im, b: _crop_and_resize(im, b, out_size))(images, boxes)
  return out.astype(images.dtype)


def random_pad_crop(
  key: jax.Array, images: jax.Array, *, padding: int, fill: float | Sequence[float] = 0.0
) -> jax.Array:
  """The CIFAR recipe's crop: pad each side by `padding` pixels of `fill`
  (per channel, or one value), then cut a random window of the original size
  (torchvision's RandomCrop(size, padding)). Translation only: no rescaling,
  so nothing is interpolated; example i uses ``jax.random.split(key, B)[i]``.
  """
  _check_images(images)
  padding = _check_padding("padding", padding)
  fill = jnp.broadcast_to(jnp.asarray(fill, images.dtype), images.shape[-1:])
  return _random_pad_crop(key, images, padding, fill)


@functools.partial(jax.jit, static_argnums=(2,))
def _random_pad_crop(key, images, padding, fill):
  if not padding:
    return images
  batch, height, width, _ = images.shape
  widths = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  inside = jnp.pad(jnp.ones(images.shape[:-1] + (1,), bool), widths)
  padded = jnp.where(inside, jnp.pad(images, widths), fill)
  offsets = jax.vmap(lambda k: jax.random.randint(k, (2,), 0, 2 * padding + 1))(
    jax.random.split(key, batch)
  )
  return jax.vmap(
    lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, image.shape[-1])
    )
  )(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Horizontal flip of each example with probability 0.5."""
  _check_images(images)
  return _random_flip(key, images)


@jax.jit
def _random_flip(key, images):
  keys = jax.random.split(key, images.shape[0])
  flip = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5))(keys)
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


# --------------------------------------------------------------------------
# RandAugment (timm's rand-m9-mstd0.5-inc1) on [0, 1] images.
# --------------------------------------------------------------------------

# timm's _RAND_INCREASING_TRANSFORMS, in timm's order: each op gets stronger as
# the magnitude grows, and magnitude 0 leaves the image unchanged.
RAND_AUGMENT_OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "PosterizeIncreasing",
  "SolarizeIncreasing",
  "SolarizeAdd",
  "ColorIncreasing",
  "ContrastIncreasing",
  "BrightnessIncreasing",
  "SharpnessIncreasing",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)

# Grey of the area a geometric op uncovers (timm fills with the dataset mean,
# (128, 128, 128) by default).
_FILL = 0.5

# PIL's convert("L") weights: the grey that Color and Contrast blend towards.
_LUMA = (0.299, 0.587, 0.114)

# The ops below work on a whole batch [B, H, W, C] of [0, 1] images with one
# magnitude in [0, 10] and one sign (+-1) per example, both [B]: written for
# the batch rather than vmapped from one image because XLA runs a batched
# scatter (Equalize's histogram) ~10x slower than one flat scatter.


def _per_example(values: jax.Array) -> jax.Array:
  """[B] -> [B, 1, 1, 1], to broadcast against images."""
  return values[:, None, None, None]


def _levels(images: jax.Array) -> jax.Array:
  """[0, 1] floats -> the 0..255 levels an 8-bit op sees (PIL images are uint8)."""
  return jnp.clip(jnp.round(images * 255.0), 0, 255).astype(jnp.int32)


def _blend_towards(images: jax.Array, target: jax.Array, amount: jax.Array) -> jax.Array:
  """(1 - amount) * images + amount * target, bit for bit images at amount 0
  and target at amount 1 (``images + amount * (target - images)`` is not)."""
  return (1.0 - amount) * images + amount * target


def _grey(images: jax.Array) -> jax.Array:
  """Luminance [B, H, W, 1]; a 1-channel image is its own grey."""
  if images.shape[-1] == 1:
    return images
  # Written out: XLA's CPU reduction over a size-3 minor axis is ~25x slower.
  red, green, blue = (images[..., i : i + 1] for i in range(3))
  return red * _LUMA[0] + green * _LUMA[1] + blue * _LUMA[2]


def _enhance(images, degenerate, magnitude, sign):
  """PIL ImageEnhance: blend(degenerate, image, factor), timm's increasing factor.

  factor = 1 +- 0.9 * m / 10 (timm's _enhance_increasing_level_to_arg), so the
  op moves away from the image in either direction as the magnitude grows.
  """
  factor = jnp.maximum(0.1, 1.0 + sign * 0.9 * magnitude / _MAX_MAGNITUDE)
  return _blend_towards(images, degenerate, _per_example(1.0 - factor))


def _auto_contrast(images, magnitude, sign):
  del sign
  low = jnp.min(images, axis=(1, 2), keepdims=True)
  span = jnp.max(images, axis=(1, 2), keepdims=True) - low
  # PIL leaves a flat channel alone; the guarded divide keeps NaNs out.
  stretched = jnp.where(span > 0, (images - low) / jnp.where(span > 0, span, 1.0), images)
  return _blend_towards(images, stretched, _per_example(magnitude / _MAX_MAGNITUDE))


def _equalize(images, magnitude, sign):
  """Pillow's ImageOps.equalize per image and channel, on a 256-bin histogram."""
  del sign
  batch, height, width, channels = images.shape
  levels = _levels(images).reshape(batch, height * width, channels)
  by_comparison = hardware.active_target().platform == "tpu"
  hist = (_histogram_by_comparison if by_comparison else _histogram_by_scatter)(levels)
  below = jnp.cumsum(hist, axis=1) - hist  # pixels below each level
  # Pillow (and torchvision): step = pixels below the top occupied level // 255,
  # lut[i] = (step // 2 + below[i]) // step clipped to 255; step 0 (a single
  # level, or too few pixels) leaves the channel unchanged.
  step = jnp.max(jnp.where(hist > 0, below, 0), axis=1, keepdims=True) // 255
  lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
  equalized = (_lookup_by_comparison if by_comparison else _lookup_by_gather)(lut, levels)
  equalized = jnp.where(
    step[:, None] > 0, equalized.reshape(images.shape).astype(images.dtype) / 255.0, images
  )
  return _blend_towards(images, equalized, _per_example(magnitude / _MAX_MAGNITUDE))


# Equalize's histogram [B, 256, C] of levels [B, pixels, C] and its lookup
# table applied to them, two ways with identical (integer) results, chosen by
# the target (`hardware.active_target`): a TPU serialises scatters and
# gathers (one batch of 1,024 CIFAR images compiled in 90 s and read an
# estimated 140 GB), while comparing every pixel with the 256 levels is
# vector work it does in one pass (2 s, 0.06 GB); on a CPU the scatter and
# the gather are the cheaper ones.


def _histogram_by_scatter(levels):
  batch, _, channels = levels.shape
  bins = (jnp.arange(batch)[:, None, None] * 256 + levels) * channels + jnp.arange(channels)
  hist = jnp.zeros(batch * 256 * channels, jnp.int32).at[bins.ravel()].add(1)
  return hist.reshape(batch, 256, channels)


def _histogram_by_comparison(levels):
  is_level = levels[:, :, None, :] == jnp.arange(256)[:, None]  # [B, pixels, 256, C]
  return jnp.sum(is_level.astype(jnp.int32), axis=1)


def _lookup_by_gather(lut, levels):
  return jnp.take_along_axis(lut, levels, axis=1)


def _lookup_by_comparison(lut, levels):
  is_level = levels[:, :, None, :] == jnp.arange(256)[:, None]  # [B, pixels, 256, C]
  return jnp.sum(jnp.where(is_level, lut[:, None], 0), axis=2)


def _invert(images, magnitude, sign):
  del sign
  return _blend_towards(images, 1.0 - images, _per_example(magnitude / _MAX_MAGNITUDE))


def _posterize(images, magnitude, sign):
  del sign
  # Bits kept: 8 - int(4 m / 10), so 8 (identity) at m = 0 and 4 at m = 10.
  dropped = _per_example(jnp.floor(magnitude * 4.0 / _MAX_MAGNITUDE).astype(jnp.int32))
  posterized = (_levels(images) >> dropped) << dropped
  return jnp.where(dropped > 0, posterized.astype(images.dtype) / 255.0, images)


def _solarize(images, magnitude, sign):
  del sign
  # timm's threshold 256 - int(256 m / 10): levels >= it are inverted.
  threshold = 256 - jnp.floor(magnitude * 256.0 / _MAX_MAGNITUDE)
  return jnp.where(_levels(images) >= _per_example(threshold), 1.0 - images, images)


def _solarize_add(images, magnitude, sign):
  del sign
  # timm adds int(110 m / 10) levels to the levels below 128, saturating.
  added = _per_example(jnp.floor(magnitude * 110.0 / _MAX_MAGNITUDE) / 255.0)
  return jnp.where(_levels(images) < 128, jnp.minimum(images + added, 1.0), images)


def _color(images, magnitude, sign):
  if images.shape[-1] == 1:
    return images  # saturation of a grey image: nothing to change
  return _enhance(images, _grey(images), magnitude, sign)


def _contrast(images, magnitude, sign):
  # PIL's degenerate: the mean of the 8-bit grey image, rounded to a level.
  # Summed as integers, so it is exact and the same however XLA orders the
  # reduction (a float mean differs by an ulp between batch shardings).
  _, height, width, _ = images.shape
  total = jnp.sum(_levels(_grey(images)), axis=(1, 2, 3), keepdims=True)
  mean = jnp.floor(total.astype(jnp.float32) / (height * width) + 0.5)
  return _enhance(images, mean / 255.0, magnitude, sign)


def _brightness(images, magnitude, sign):
  return _enhance(images, 0.0, magnitude, sign)


def _sharpness(images, magnitude, sign):
  """PIL's Sharpness: blend with the SMOOTH filter; border pixels stay as they are."""
  _, height, width, _ = images.shape
  window = sum(
    images[:, dy : height - 2 + dy, dx : width - 2 + dx] for dy in range(3) for dx in range(3)
  )
  # Kernel 1 1 1 / 1 5 1 / 1 1 1, over 13.
  smooth = (window + 4.0 * images[:, 1:-1, 1:-1]) / 13.0
  return _enhance(images, images.at[:, 1:-1, 1:-1].set(smooth), magnitude, sign)


# Geometric ops are affine warps; each gives the matrix (a, b, c, d, e, f) of
# PIL's Image.transform(AFFINE), one [B] array per entry.
_AffineMatrix = tuple[jax.Array, ...]


def _rotate_matrix(shape, magnitude, sign) -> _AffineMatrix:
  """PIL's Image.rotate: counter-clockwise by 30 m / 10 degrees, about the centre."""
  _, height, width, _ = shape
  angle = -jnp.deg2rad(sign * 30.0 * magnitude / _MAX_MAGNITUDE)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = width / 2.0, height / 2.0
  return (cos, sin, cx - (cos * cx + sin * cy), -sin, cos, cy - (-sin * cx + cos * cy))


def _shear_x_matrix(shape, magnitude, sign) -> _AffineMatrix:
  del shape
  one, zero = jnp.ones_like(magnitude), jnp.zeros_like(magnitude)
  return (one, sign * 0.3 * magnitude / _MAX_MAGNITUDE, zero, zero, one, zero)


def _shear_y_matrix(shape, magnitude, sign) -> _AffineMatrix:
  del shape
  one, zero = jnp.ones_like(magnitude), jnp.zeros_like(magnitude)
  return (one, zero, zero, sign * 0.3 * magnitude / _MAX_MAGNITUDE, one, zero)


def _translate_x_matrix(shape, magnitude, sign) -> _AffineMatrix:
  """Moves the content left by 0.45 m / 10 of the width (right when negated)."""
  one, zero = jnp.ones_like(magnitude), jnp.zeros_like(magnitude)
  shift = sign * 0.45 * magnitude / _MAX_MAGNITUDE * shape[2]
  return (one, zero, shift, zero, one, zero)


def _translate_y_matrix(shape, magnitude, sign) -> _AffineMatrix:
  one, zero = jnp.ones_like(magnitude), jnp.zeros_like(magnitude)
  shift = sign * 0.45 * magnitude / _MAX_MAGNITUDE * shape[1]
  return (one, zero, zero, zero, one, shift)


def _affine_warp(images: jax.Array, matrix: _AffineMatrix) -> jax.Array:
  """PIL's Image.transform(size, AFFINE, matrix), bilinear, grey fill.

  The output pixel centred at (u, v) -- in PIL's coordinates, which put the
  image's top-left corner at 0 -- samples the input at (a u + b v + c,
  d u + e v + f). As in PIL, a sample outside the image is the fill and one
  inside interpolates between the nearest pixel centres, edge pixels
  repeated. The identity matrix returns the images bit for bit (every
  sample lands on a pixel centre with weight exactly 1).
  """
  a, b, c, d, e, f = (entry[:, None, None] for entry in matrix)
  batch, height, width, _ = images.shape
  v, u = jnp.meshgrid(
    jnp.arange(height, dtype=jnp.float32) + 0.5,
    jnp.arange(width, dtype=jnp.float32) + 0.5,
    indexing="ij",
  )
  x = a * u + b * v + c  # [B, H, W]
  y = d * u + e * v + f
  inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
  x0, y0 = jnp.floor(x - 0.5), jnp.floor(y - 0.5)  # pixel above-left of the sample
  fx, fy = (x - 0.5 - x0)[..., None], (y - 0.5 - y0)[..., None]
  example = jnp.arange(batch)[:, None, None]

  def tap(dy: int, dx: int) -> jax.Array:
    rows = jnp.clip(y0.astype(jnp.int32) + dy, 0, height - 1)
    cols = jnp.clip(x0.astype(jnp.int32) + dx, 0, width - 1)
    return images[example, rows, cols]

  top = _blend_towards(tap(0, 0), tap(0, 1), fx)
  bottom = _blend_towards(tap(1, 0), tap(1, 1), fx)
  return jnp.where(inside[..., None], _blend_towards(top, bottom, fy), _FILL)


# Pixel ops map (images, magnitude [B], sign [B]) to images; geometric ops map
# (images.shape, magnitude, sign) to a warp matrix. Ops without a direction
# ignore the sign.
_PIXEL_OPS = {
  "AutoContrast": _auto_contrast,
  "Equalize": _equalize,
  "Invert": _invert,
  "PosterizeIncreasing": _posterize,
  "SolarizeIncreasing": _solarize,
  "SolarizeAdd": _solarize_add,
  "ColorIncreasing": _color,
  "ContrastIncreasing": _contrast,
  "BrightnessIncreasing": _brightness,
  "SharpnessIncreasing": _sharpness,
}
_WARP_MATRICES = {
  "Rotate": _rotate_matrix,
  "ShearX": _shear_x_matrix,
  "ShearY": _shear_y_matrix,
  "TranslateXRel": _translate_x_matrix,
  "TranslateYRel": _translate_y_matrix,
}
assert set(_PIXEL_OPS) | set(_WARP_MATRICES) == set(RAND_AUGMENT_OPS)


def _apply_drawn_ops(
  images: jax.Array,
  op_index: jax.Array,
  magnitude: jax.Array,
  sign: jax.Array,
  ops: tuple[str, ...],
) -> jax.Array:
  """Example i gets op ``ops[op_index[i]]`` at magnitude[i], sign[i].

  Every op in `ops` runs on the whole batch and each example keeps its own
  op's result (a vectorised batch cannot branch per example). The geometric
  ops share one warp, with each example's drawn matrix (identity when its op
  is not geometric).
  """
  outputs = {name: _PIXEL_OPS[name](images, magnitude, sign) for name in ops if name in _PIXEL_OPS}
  geometric = [name for name in ops if name in _WARP_MATRICES]
  if geometric:
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    candidates = jnp.stack(
      [
        jnp.stack(
          _WARP_MATRICES[name](images.shape, magnitude, sign)
          if name in _WARP_MATRICES
          else [jnp.full_like(magnitude, v) for v in identity]
        )
        for name in ops
      ]
    )  # [ops, 6, B]
    matrix = jnp.take_along_axis(candidates, op_index[None, None], axis=0)[0]
    warped = _affine_warp(images, tuple(matrix))
    outputs.update((name, warped) for name in geometric)
  which = jnp.broadcast_to(_per_example(op_index), images.shape)
  selected = jax.lax.select_n(which, *(outputs[name] for name in ops))
  # Rounding can step a blend an ulp outside [0, 1]; PIL's uint8 cannot.
  return jnp.clip(selected.astype(images.dtype), 0.0, 1.0)


def _check_ra_images(images: jax.Array, what: str) -> None:
  _check_images(images)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{what} needs float images in [0, 1]; got dtype {images.dtype}")
  if images.shape[-1] not in (1, 3):
    raise ValueError(
      f"{what} needs grey (1-channel) or RGB (3-channel) images; got {images.shape[-1]} channels"
    )


def _check_op_names(ops: Any) -> tuple[str, ...]:
  names = (ops,) if isinstance(ops, str) else tuple(ops)
  unknown = [name for name in names if name not in RAND_AUGMENT_OPS]
  if not names or unknown:
    raise ValueError(
      f"ops={ops!r} is not allowed: expected a non-empty sequence of names from {RAND_AUGMENT_OPS}"
    )
  return names


def rand_augment(
  key: jax.Array,
  images: jax.Array,
  *,
  num_ops: int = 2,
  magnitude: float = 9.0,
  magnitude_std: float = 0.5,
  prob: float = 0.5,
  ops: Sequence[str] = RAND_AUGMENT_OPS,
) -> jax.Array:
  """timm's RandAugment; the defaults are its ``rand-m9-mstd0.5-inc1`` policy.

  Per example, `num_ops` times: an op drawn uniformly (with replacement) from
  `ops`, applied with probability `prob` at a magnitude drawn from
  N(magnitude, magnitude_std) clipped to [0, 10], with a random sign where
  timm negates (rotate, shear, translate, the enhance factors). Magnitude m
  scales the ops as timm's level functions do: rotate by up to 30 degrees,
  shear up to 0.3, translate up to 0.45 of the side, solarize levels >=
  256 - int(25.6 m), add int(11 m) to levels below 128, enhance factors
  1 +- 0.09 m; the 8-bit ops see the image as 0..255 levels and follow
  Pillow. Geometric ops are bilinear affine warps filling with grey 0.5; on
  1-channel images Color is the identity.

  Deviations from timm, so that magnitude 0 is exactly the identity:
  AutoContrast, Equalize and Invert, which ignore the magnitude in timm, are
  blended as ``x + (m / 10) * (op(x) - x)``; PosterizeIncreasing keeps
  8 - int(0.4 m) bits (8 -> 4) where timm keeps 4 - int(0.4 m) (4 -> 0).
  Also images stay float between ops (PIL rounds to uint8 after each), and
  resampling is always bilinear (timm picks bilinear or bicubic at random).

  Args:
    key: PRNG key; example i uses ``jax.random.split(key, B)[i]``.
    images: float [B, H, W, C] in [0, 1], C = 1 or 3.
    num_ops: ops per example (static); 0 returns the images.
    magnitude: mean op magnitude in [0, 10].
    magnitude_std: standard deviation of the per-op magnitude (0: fixed).
    prob: probability that each drawn op is applied.
    ops: the op names to draw from, a subset of RAND_AUGMENT_OPS.

  Returns:
    [B, H, W, C] in images.dtype, in [0, 1].
  """
  _check_ra_images(images, "rand_augment")
  num_ops = _check_num_ops("num_ops", num_ops)
  magnitude = _check_magnitude("magnitude", magnitude)
  magnitude_std = _check_alpha(
    "magnitude_std", magnitude_std, zero_means="0 keeps every op at `magnitude`"
  )
  prob = _check_prob("prob", prob)
  ops = _check_op_names(ops)
  if num_ops == 0:
    return images
  return _rand_augment(key, images, magnitude, magnitude_std, prob, num_ops, ops)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _rand_augment(key, images, magnitude, magnitude_std, prob, num_ops, ops):
  return _rand_augment_keyed(
    jax.random.split(key, images.shape[0]), images, magnitude, magnitude_std, prob, num_ops, ops
  )


def _rand_augment_keyed(
  keys: jax.Array,
  images: jax.Array,
  magnitude: jax.Array,
  magnitude_std: jax.Array,
  prob: jax.Array,
  num_ops: int,
  ops: tuple[str, ...],
) -> jax.Array:
  """RandAugment with example i's draws all from keys[i]; the counts are static."""

  def draw(key):
    k_op, k_apply, k_magnitude, k_sign = jax.random.split(key, 4)
    noise = jax.random.normal(k_magnitude, (num_ops,))
    return (
      jax.random.randint(k_op, (num_ops,), 0, len(ops)),
      jax.random.uniform(k_apply, (num_ops,)) < prob,
      jnp.clip(magnitude + magnitude_std * noise, 0.0, _MAX_MAGNITUDE),
      jnp.where(jax.random.bernoulli(k_sign, 0.5, (num_ops,)), -1.0, 1.0),
    )

  op_index, applied, magnitudes, signs = jax.vmap(draw)(keys)  # each [B, num_ops]

  def layer(i, x):
    out = _apply_drawn_ops(x, op_index[:, i], magnitudes[:, i], signs[:, i], ops)
    return jnp.where(_per_example(applied[:, i]), out, x)

  return jax.lax.fori_loop(0, num_ops, layer, images)


def rand_augment_op(
  images: jax.Array, name: str, magnitude: float, *, negate: bool = False
) -> jax.Array:
  """Applies one RandAugment op to every image at a fixed magnitude.

  Deterministic (no key): for looking at what an op does and for tests.
  `negate` takes the direction timm picks at random (rotate clockwise, shift
  right / down, shear the other way, factor below 1).
  """
  _check_ra_images(images, "rand_augment_op")
  ops = _check_op_names((name,))
  magnitude = _check_magnitude("magnitude", magnitude)
  return _rand_augment_op(images, jnp.float32(magnitude), jnp.float32(-1.0 if negate else 1.0), ops)


@functools.partial(jax.jit, static_argnums=(3,))
def _rand_augment_op(images, magnitude, sign, ops):
  batch = images.shape[0]
  return _apply_drawn_ops(
    images, jnp.zeros(batch, jnp.int32), jnp.full(batch, magnitude), jnp.full(batch, sign), ops
  )


# --------------------------------------------------------------------------
# Random erasing (timm's RandomErasing, mode='pixel', one box).
# --------------------------------------------------------------------------


def random_erasing(
  key: jax.Array,
  images: jax.Array,
  *,
  probability: float,
  scale: Sequence[float] = (0.02, 1.0 / 3.0),
  ratio: Sequence[float] = (0.3, 1.0 / 0.3),
) -> jax.Array:
  """timm's RandomErasing(probability, mode='pixel', max_count=1).

  With probability `probability` per example, one box whose area is a
  fraction in `scale` of the image and whose aspect ratio is log-uniform in
  `ratio` (timm's defaults) is replaced by per-pixel, per-channel standard
  normal noise. Up to 10 boxes are tried and the first whose sides are
  shorter than the image's is used; if none is, the example is left as it is.
  Meant for normalised images (timm erases after normalising).

  Args:
    key: PRNG key; example i uses ``jax.random.split(key, B)[i]``.
    images: float [B, H, W, C].
    probability: chance that an example gets a box.
    scale: range of the box area as a fraction of the image area.
    ratio: range of the box aspect ratio w / h, sampled log-uniformly (timm
      samples h / w; the default range is symmetric, so the boxes are alike).

  Returns:
    [B, H, W, C] in images.dtype.
  """
  _check_images(images)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"random_erasing needs float images; got dtype {images.dtype}")
  probability = _check_prob("probability", probability)
  scale, ratio = _check_scale_ratio(scale, ratio)
  if probability == 0.0:
    return images
  return _random_erasing(key, images, probability, scale, ratio)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _random_erasing(key, images, probability, scale, ratio):
  return _random_erasing_keyed(
    jax.random.split(key, images.shape[0]), images, probability, scale, ratio
  )


def _random_erasing_keyed(
  keys: jax.Array,
  images: jax.Array,
  probability: jax.Array,
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> jax.Array:
  """Random erasing with example i's draws all from keys[i]."""
  return jax.vmap(lambda k, image: _erase_image(k, image, probability, scale, ratio))(keys, images)


def _erase_image(
  key: jax.Array,
  image: jax.Array,
  probability: jax.Array,
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> jax.Array:
  """One example's random erasing: all of its draws come from its own key."""
  k_apply, k_box, k_noise = jax.random.split(key, 3)
  height, width, _ = image.shape
  top, left, h, w = _box_trials(k_box, _ERASE_TRIALS, height, width, scale, ratio)
  fits = (h < height) & (w < width)  # timm's test: strictly smaller sides
  first = jnp.argmax(fits)
  erase = jax.random.bernoulli(k_apply, probability) & jnp.any(fits)
  rows = jnp.arange(height, dtype=jnp.float32)
  cols = jnp.arange(width, dtype=jnp.float32)
  in_box = ((rows >= top[first]) & (rows < top[first] + h[first]))[:, None] & (
    (cols >= left[first]) & (cols < left[first] + w[first])
  )[None, :]
  # Noise for the whole image (a static shape); the box keeps its share.
  noise = jax.random.normal(k_noise, image.shape, image.dtype)
  return jnp.where(erase & in_box[:, :, None], noise, image)


# --------------------------------------------------------------------------
# Targets and batch mixing.
# --------------------------------------------------------------------------


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """One-hot float32 targets [B, num_classes] with label smoothing.

  Off-target entries are ``smoothing / num_classes``; the target entry is
  ``1 - smoothing + smoothing / num_classes`` (timm's convention).
  """
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes={num_classes!r} is not allowed: expected a positive int")
  smoothing = _check_prob("label_smoothing", smoothing, upper_open=True)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape [B]; got shape {tuple(labels.shape)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids; got dtype {labels.dtype}")
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  hot = labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)
  return jnp.where(hot, jnp.float32(on), jnp.float32(off))


def _mixup(images: jax.Array, lam: jax.Array):
  mixed = lam * images + (1.0 - lam) * images[::-1]
  return mixed.astype(images.dtype), lam


def _cutmix(key: jax.Array, images: jax.Array, lam: jax.Array):
  """timm's rand_bbox + paste; lambda corrected to the clipped box area."""
  _, height, width, _ = images.shape
  cut_rat = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut_rat).astype(jnp.int32)
  cut_w = jnp.floor(width * cut_rat).astype(jnp.int32)
  # Box centre uniform over the pixels, as timm's randint(0, H), randint(0, W).
  center = jax.random.randint(key, (2,), 0, jnp.array([height, width]))
  cy, cx = center[0], center[1]
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)
  cols = jnp.arange(width)
  in_box = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
  mixed = jnp.where(in_box[None, :, :, None], images[::-1], images)
  area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  return mixed, 1.0 - area / float(height * width)


def mixup_or_cutmix(
  key: jax.Array,
  images: jax.Array,
  targets: jax.Array,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
  """timm's batch-mode Mixup / CutMix: the batch is mixed with its reverse.

  One lambda for the whole batch. With both alphas > 0, cutmix is chosen
  with probability `switch_prob` (else mixup); with one > 0 that one is
  used; with both 0 the inputs are returned unchanged. For cutmix, lambda is
  the fraction of pixels kept from the original image after clipping the
  box, so targets match the pixels exactly.

  Args:
    key: PRNG key.
    images: float [B, H, W, C].
    targets: probability vectors [B, num_classes].
    mixup_alpha, cutmix_alpha: Beta(alpha, alpha) parameters (static).
    switch_prob: probability of cutmix when both are enabled (static).

  Returns:
    (images, targets) with targets = lam * t + (1 - lam) * t[::-1].
  """
  _check_images(images)
  mixup_alpha = _check_alpha("mixup_alpha", mixup_alpha)
  cutmix_alpha = _check_alpha("cutmix_alpha", cutmix_alpha)
  switch_prob = _check_prob("switch_prob", switch_prob)
  if targets.ndim != 2 or targets.shape[0] != images.shape[0]:
    raise ValueError(
      f"targets must have shape [B, num_classes] with B = "
      f"{images.shape[0]}; got shape {tuple(targets.shape)}"
    )
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"mixup_or_cutmix needs float images; got dtype {images.dtype}")
  if mixup_alpha == 0.0 and cutmix_alpha == 0.0:
    return images, targets
  return _mixup_or_cutmix(key, images, targets, mixup_alpha, cutmix_alpha, switch_prob)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _mixup_or_cutmix(key, images, targets, mixup_alpha, cutmix_alpha, switch_prob):
  k_switch, k_lam, k_box = jax.random.split(key, 3)
  if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
    use_cutmix = jax.random.bernoulli(k_switch, switch_prob)
    # One Beta sampler with a selected alpha (compiles once, not per branch).
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(jnp.float32)
    mixed, lam = jax.lax.cond(
      use_cutmix, lambda x, lam_: _cutmix(k_box, x, lam_), _mixup, images, lam
    )
  elif cutmix_alpha > 0.0:
    lam = jax.random.beta(k_lam, cutmix_alpha, cutmix_alpha)
    mixed, lam = _cutmix(k_box, images, lam.astype(jnp.float32))
  else:
    lam = jax.random.beta(k_lam, mixup_alpha, mixup_alpha)
    mixed, lam = _mixup(images, lam.astype(jnp.float32))
  lam_t = lam.astype(targets.dtype)
  mixed_targets = lam_t * targets + (1 - lam_t) * targets[::-1]
  return mixed, mixed_targets


# --------------------------------------------------------------------------
# Whole-batch entry points.
# --------------------------------------------------------------------------


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 [B,H,W,C] -> float32 ((x / 255) - mean) / std, per channel.

  mean / std of length 1 broadcast over all channels.
  """
  _check_images(images)
  if images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8 [B, H, W, C]; got dtype {images.dtype}")
  mean, std = _check_channel_stats(mean, std, images.shape[-1], prefix="")
  return _standardize(_unit_range(images), mean, std)


def _unit_range(images: jax.Array) -> jax.Array:
  """uint8 -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def _standardize(x: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def preprocess_eval(
  images: jax.Array, labels: jax.Array, *, num_classes: int, config: Any
) -> tuple[jax.Array, jax.Array]:
  """Deterministic evaluation preprocessing: normalise + plain one-hot."""
  _check_images(images)
  _check_labels(labels, images.shape[0])
  mean, std = _check_channel_stats(_field(config, "mean"), _field(config, "std"), images.shape[-1])
  return _preprocess_eval(images, labels, num_classes, mean, std)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _preprocess_eval(images, labels, num_classes, mean, std):
  return (normalize(images, mean, std), smooth_labels(labels, num_classes, 0.0))


def augment_batch(
  key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int, config: Any
) -> tuple[jax.Array, jax.Array]:
  """Training augmentation of one (global) batch.

  uint8 [B,H,W,C] images -> normalised float32 with (each switchable in
  `config`) random resized crop, horizontal flip, RandAugment, random
  erasing, label smoothing and mixup / cutmix, in timm's order: crop and
  flip, RandAugment on [0, 1] pixels, normalisation, erasing of the
  normalised image, mixing. Returns (images float32 [B,H,W,C], targets
  float32 [B, num_classes]). A pure function of (key, images, labels); pass
  ``key = jax.random.fold_in(base_key, step)``.
  """
  validate_augment_config(config)
  _check_images(images)
  _check_labels(labels, images.shape[0])
  if images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8 [B, H, W, C]; got dtype {images.dtype}")
  mean, std = _check_channel_stats(config.mean, config.std, images.shape[-1])
  if config.randaugment_ops and images.shape[-1] not in (1, 3):
    raise ValueError(
      f"config.augment.randaugment_ops={config.randaugment_ops!r} needs grey "
      f"(1-channel) or RGB (3-channel) images; got {images.shape[-1]} channels "
      "(set it to 0)"
    )
  # Plain hashable values, so the jitted body is cached per configuration.
  params = _AugmentParams(
    mean=mean,
    std=std,
    crop=bool(config.crop),
    crop_scale=tuple(float(v) for v in config.crop_scale),
    crop_ratio=tuple(float(v) for v in config.crop_ratio),
    crop_padding=int(config.crop_padding),
    flip=bool(config.flip),
    randaugment_ops=int(config.randaugment_ops),
    randaugment_magnitude=float(config.randaugment_magnitude),
    randaugment_magnitude_std=float(config.randaugment_magnitude_std),
    erase_prob=float(config.erase_prob),
    label_smoothing=float(config.label_smoothing),
    mixup_alpha=float(config.mixup_alpha),
    cutmix_alpha=float(config.cutmix_alpha),
    mix_switch_prob=float(config.mix_switch_prob),
  )
  return _augment_batch(key, images, labels, num_classes, params)


class _AugmentParams(NamedTuple):
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop: bool
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  crop_padding: int
  flip: bool
  randaugment_ops: int
  randaugment_magnitude: float
  randaugment_magnitude_std: float
  erase_prob: float
  label_smoothing: float
  mixup_alpha: float
  cutmix_alpha: float
  mix_switch_prob: float


@functools.partial(jax.jit, static_argnums=(3, 4))
def _augment_batch(key, images, labels, num_classes: int, p: _AugmentParams):
  if p.randaugment_ops:
    # RandAugment's 8-bit style ops need [0, 1] pixels, so crop, flip and
    # RandAugment come before normalising, as in timm.
    x = _crop_and_flip(key, _unit_range(images), p, black=0.0)
    x = rand_augment(
      jax.random.fold_in(key, _STREAM_RANDAUGMENT),
      x,
      num_ops=p.randaugment_ops,
      magnitude=p.randaugment_magnitude,
      magnitude_std=p.randaugment_magnitude_std,
    )
    x = _standardize(x, p.mean, p.std)
  else:
    # Crop and flip commute with the per-channel affine normalisation; doing it
    # first, as before RandAugment existed, keeps those runs' numbers bit for
    # bit.
    x = _crop_and_flip(
      key,
      normalize(images, p.mean, p.std),
      p,
      black=_standardize(jnp.zeros((len(p.mean),)), p.mean, p.std),
    )
  if p.erase_prob:
    x = random_erasing(jax.random.fold_in(key, _STREAM_ERASE), x, probability=p.erase_prob)
  targets = smooth_labels(labels, num_classes, p.label_smoothing)
  x, targets = mixup_or_cutmix(
    jax.random.fold_in(key, _STREAM_MIX),
    x,
    targets,
    mixup_alpha=p.mixup_alpha,
    cutmix_alpha=p.cutmix_alpha,
    switch_prob=p.mix_switch_prob,
  )
  return x, targets


def _crop_and_flip(key: jax.Array, x: jax.Array, p: _AugmentParams, *, black) -> jax.Array:
  """`black`: what a 0 pixel is in `x`'s scale, the padded crop's border."""
  if p.crop and p.crop_padding:
    x = random_pad_crop(
      jax.random.fold_in(key, _STREAM_CROP), x, padding=p.crop_padding, fill=black
    )
  elif p.crop:
    x = random_resized_crop(
      jax.random.fold_in(key, _STREAM_CROP), x, scale=p.crop_scale, ratio=p.crop_ratio
    )
  if p.flip:
    x = random_flip(jax.random.fold_in(key, _STREAM_FLIP), x)
  return x
