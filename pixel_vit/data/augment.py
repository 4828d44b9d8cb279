"""On-device data augmentation for image classification, in pure JAX.

The DeiT / timm recipe that the PiT paper trains CIFAR-100 with from scratch:
random resized crop, horizontal flip, label smoothing and batch-level
mixup / cutmix. Every function here is jit-able, vectorised over the batch
(no Python loops over examples, no host syncs) and keeps shapes static.

Randomness is a pure function of ``(key, batch)``. Per-example draws come from
``jax.random.split(key, B)``, so example ``i`` gets the same crop and flip
however the global batch is sharded across devices. The training loop passes
``key = jax.random.fold_in(base_key, step)`` so a resumed run replays the same
augmentations.

Configuration fields read by :func:`augment_batch` / :func:`preprocess_eval`
(see :func:`default_augment_config`): ``mean``, ``std``, ``crop``,
``crop_scale``, ``crop_ratio``, ``flip``, ``label_smoothing``,
``mixup_alpha``, ``cutmix_alpha``, ``mix_switch_prob``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections

__all__ = [
    "augment_batch",
    "default_augment_config",
    "mixup_or_cutmix",
    "normalize",
    "preprocess_eval",
    "random_flip",
    "random_resized_crop",
    "smooth_labels",
    "validate_augment_config",
]

# Candidate boxes drawn per example before falling back to a centre crop, as in
# torchvision's RandomResizedCrop (which tries 10 times in a Python loop; here
# all trials are drawn at once and the first valid one is selected).
_CROP_TRIALS = 10

# Stream ids for jax.random.fold_in in augment_batch: each transform has its own
# stream, so switching one transform off does not change the others' draws.
_STREAM_CROP, _STREAM_FLIP, _STREAM_MIX = 0, 1, 2


def default_augment_config() -> ml_collections.ConfigDict:
  """DeiT-style augmentation defaults for CIFAR-sized (32x32) images."""
  c = ml_collections.ConfigDict()
  # Length-1 mean/std broadcast over channels: (0.5,) == (0.5,)*3 for RGB and
  # also works unchanged for 1-channel sources (digits, MNIST).
  c.mean = (0.5,)
  c.std = (0.5,)
  c.crop = True
  # DeiT uses (0.08, 1) at 224px. At 32x32 an 8% crop is ~9x9 pixels blown up
  # 3.5x, which destroys most of the object; a 25% floor (>= 16x16 source
  # pixels) keeps strong scale jitter while the label stays recognisable.
  c.crop_scale = (0.25, 1.0)
  c.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.flip = True
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.mix_switch_prob = 0.5
  return c


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
        f"{sorted(default_augment_config().keys())}") from None


def _check_range_pair(name: str, value: Any, *, positive: bool,
                      upper: float | None) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(
        f"{name}={value!r} is not allowed: expected a pair (low, high) of "
        "numbers") from None
  ok = lo <= hi and (lo > 0 if positive else lo >= 0)
  ok = ok and math.isfinite(hi) and (upper is None or hi <= upper)
  if not ok:
    bound = ("0 < low" if positive else "0 <= low") + " <= high"
    bound += f" <= {upper}" if upper is not None else ""
    raise ValueError(f"{name}={value!r} is not allowed: expected {bound}")
  return lo, hi


def _check_scale_ratio(scale: Any, ratio: Any,
                       prefix: str = "") -> tuple[tuple[float, float], tuple[float, float]]:
  return (_check_range_pair(prefix + "scale", scale, positive=True, upper=1.0),
          _check_range_pair(prefix + "ratio", ratio, positive=True, upper=None))


def _check_prob(name: str, value: Any, *, upper_open: bool = False) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not allowed: expected a number "
                     "(a static Python value, not a traced array)") from None
  if not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0):
    interval = "[0, 1)" if upper_open else "[0, 1]"
    raise ValueError(f"{name}={value!r} is not allowed: expected a value in "
                     f"{interval}")
  return v


def _check_alpha(name: str, value: Any) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not allowed: expected a number >= 0 "
                     "(a static Python value, not a traced array)") from None
  if not (v >= 0.0 and math.isfinite(v)):
    raise ValueError(f"{name}={value!r} is not allowed: expected a finite "
                     "number >= 0 (0 disables it)")
  return v


def _check_channel_stats(mean: Any, std: Any, channels: int | None = None,
                         prefix: str = "config.augment."
                         ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  stats = []
  for name, value in (("mean", mean), ("std", std)):
    try:
      vals = tuple(float(v) for v in value)
    except TypeError:
      vals = (float(value),) if isinstance(value, (int, float)) else ()
    if not vals or (channels is not None and len(vals) not in (1, channels)):
      allowed = ("a non-empty per-channel sequence" if channels is None else
                 f"a sequence of length 1 or {channels} (the image channels)")
      raise ValueError(f"{prefix}{name}={value!r} is not allowed: expected "
                       f"{allowed}")
    if name == "std" and any(not v > 0 for v in vals):
      raise ValueError(f"{prefix}std={value!r} is not allowed: every entry "
                       "must be > 0")
    stats.append(vals)
  return stats[0], stats[1]


def validate_augment_config(config: Any) -> None:
  """Raises ValueError naming the key, value and what is allowed."""
  _check_channel_stats(_field(config, "mean"), _field(config, "std"))
  for name in ("crop", "flip"):
    if not isinstance(_field(config, name), bool):
      raise ValueError(f"config.augment.{name}={_field(config, name)!r} is not "
                       "allowed: expected True or False")
  _check_scale_ratio(_field(config, "crop_scale"), _field(config, "crop_ratio"),
                     prefix="config.augment.crop_")
  _check_prob("config.augment.label_smoothing", _field(config, "label_smoothing"),
              upper_open=True)
  _check_alpha("config.augment.mixup_alpha", _field(config, "mixup_alpha"))
  _check_alpha("config.augment.cutmix_alpha", _field(config, "cutmix_alpha"))
  _check_prob("config.augment.mix_switch_prob", _field(config, "mix_switch_prob"))


def _check_images(images: jax.Array, what: str = "images") -> None:
  if images.ndim != 4:
    raise ValueError(f"{what} must have shape [B, H, W, C]; got shape "
                     f"{tuple(images.shape)}")


def _check_labels(labels: jax.Array, batch: int) -> None:
  if labels.shape != (batch,):
    raise ValueError(f"labels must have shape [B] = ({batch},) to match the "
                     f"images; got shape {tuple(labels.shape)}")


# --------------------------------------------------------------------------
# Geometric transforms.
# --------------------------------------------------------------------------


def _fallback_box(height: int, width: int,
                  ratio: tuple[float, float]) -> tuple[int, int, int, int]:
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


def _sample_crop_box(key: jax.Array, height: int, width: int,
                     scale: tuple[float, float],
                     ratio: tuple[float, float]) -> jax.Array:
  """One example's crop box [top, left, h, w] (integers, as float32)."""
  # One draw of 4 x T uniforms: area, log-ratio, top and left per trial.
  u_area, u_ratio, u_top, u_left = jax.random.uniform(key, (4, _CROP_TRIALS))
  area = height * width
  target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio)
  w = jnp.round(jnp.sqrt(target_area * aspect))
  h = jnp.round(jnp.sqrt(target_area / aspect))
  valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  # Uniform integer offsets in [0, H - h] and [0, W - w].
  top = jnp.minimum(jnp.floor(u_top * (height - h + 1)), height - h)
  left = jnp.minimum(jnp.floor(u_left * (width - w + 1)), width - w)
  trials = jnp.stack([top, left, h, w], axis=-1)  # [T, 4]
  first = jnp.argmax(valid)  # index of the first valid trial (0 if none)
  fallback = jnp.asarray(_fallback_box(height, width, ratio), jnp.float32)
  return jnp.where(jnp.any(valid), trials[first], fallback)


def _resize_weights(start: jax.Array, size: jax.Array, in_size: int,
                    out_size: int) -> jax.Array:
  """[out_size, in_size] bilinear weights resizing input[start:start+size].

  Half-pixel centres (align_corners=False); when downsampling the triangle
  kernel is widened (antialiasing), as in torchvision / PIL. Only pixels
  inside the crop get weight (crop-then-resize semantics, so nothing bleeds
  in from outside the box) and every row is normalised to sum to 1.
  """
  inv_scale = size / out_size
  kernel_scale = jnp.maximum(inv_scale, 1.0)
  sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale \
      + start - 0.5
  idx = jnp.arange(in_size, dtype=jnp.float32)
  w = jnp.maximum(0.0, 1.0 - jnp.abs(sample[:, None] - idx[None, :])
                  / kernel_scale)
  inside = (idx >= start) & (idx < start + size)
  w = jnp.where(inside[None, :], w, 0.0)
  # Every sample lies within half a pixel of a crop pixel, so sums are > 0.
  return w / jnp.sum(w, axis=1, keepdims=True)


def _crop_and_resize(image: jax.Array, box: jax.Array,
                     out_size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of image[top:top+h, left:left+w] to out_size."""
  top, left, h, w = box[0], box[1], box[2], box[3]
  height, width, _ = image.shape
  wy = _resize_weights(top, h, height, out_size[0])
  wx = _resize_weights(left, w, width, out_size[1])
  hp = jax.lax.Precision.HIGHEST  # keep f32 accuracy on TPU/GPU matmul units
  out = jnp.einsum("oh,hwc->owc", wy, image.astype(jnp.float32), precision=hp)
  return jnp.einsum("pw,owc->opc", wx, out, precision=hp)


def random_resized_crop(key: jax.Array, images: jax.Array, *,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
                        out_size: int | Sequence[int] | None = None
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
    raise ValueError(f"random_resized_crop needs float images; got dtype "
                     f"{images.dtype} (normalise uint8 images first)")
  batch, height, width, _ = images.shape
  if out_size is None:
    out_size = (height, width)
  elif isinstance(out_size, int):
    out_size = (out_size, out_size)
  out_size = tuple(int(s) for s in out_size)
  if len(out_size) != 2 or min(out_size) <= 0:
    raise ValueError(f"out_size={out_size!r} is not allowed: expected a "
                     "positive int or (height, width)")
  return _random_resized_crop(key, images, scale, ratio, out_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _random_resized_crop(key, images, scale, ratio, out_size):
  batch, height, width, _ = images.shape
  keys = jax.random.split(key, batch)
  boxes = jax.vmap(
      lambda k: _sample_crop_box(k, height, width, scale, ratio))(keys)
  out = jax.vmap(lambda im, b: _crop_and_resize(im, b, out_size))(images,
                                                                    boxes)
  return out.astype(images.dtype)


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
# Targets and batch mixing.
# --------------------------------------------------------------------------


def smooth_labels(labels: jax.Array, num_classes: int,
                  smoothing: float) -> jax.Array:
  """One-hot float32 targets [B, num_classes] with label smoothing.

  Off-target entries are ``smoothing / num_classes``; the target entry is
  ``1 - smoothing + smoothing / num_classes`` (timm's convention).
  """
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes={num_classes!r} is not allowed: expected a "
                     "positive int")
  smoothing = _check_prob("label_smoothing", smoothing, upper_open=True)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape [B]; got shape "
                     f"{tuple(labels.shape)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids; got dtype "
                     f"{labels.dtype}")
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
  in_box = (((rows >= y0) & (rows < y1))[:, None]
            & ((cols >= x0) & (cols < x1))[None, :])
  mixed = jnp.where(in_box[None, :, :, None], images[::-1], images)
  area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  return mixed, 1.0 - area / float(height * width)


def mixup_or_cutmix(key: jax.Array, images: jax.Array, targets: jax.Array, *,
                    mixup_alpha: float, cutmix_alpha: float,
                    switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
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
    raise ValueError(f"targets must have shape [B, num_classes] with B = "
                     f"{images.shape[0]}; got shape {tuple(targets.shape)}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"mixup_or_cutmix needs float images; got dtype "
                     f"{images.dtype}")
  if mixup_alpha == 0.0 and cutmix_alpha == 0.0:
    return images, targets
  return _mixup_or_cutmix(key, images, targets, mixup_alpha, cutmix_alpha,
                          switch_prob)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _mixup_or_cutmix(key, images, targets, mixup_alpha, cutmix_alpha,
                     switch_prob):
  k_switch, k_lam, k_box = jax.random.split(key, 3)
  if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
    use_cutmix = jax.random.bernoulli(k_switch, switch_prob)
    # One Beta sampler with a selected alpha (compiles once, not per branch).
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(jnp.float32)
    mixed, lam = jax.lax.cond(
        use_cutmix,
        lambda x, l: _cutmix(k_box, x, l),
        _mixup,
        images, lam)
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


def normalize(images: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """uint8 [B,H,W,C] -> float32 ((x / 255) - mean) / std, per channel.

  mean / std of length 1 broadcast over all channels.
  """
  _check_images(images)
  if images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8 [B, H, W, C]; got dtype "
                     f"{images.dtype}")
  mean, std = _check_channel_stats(mean, std, images.shape[-1], prefix="")
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def preprocess_eval(images: jax.Array, labels: jax.Array, *, num_classes: int,
                    config: Any) -> tuple[jax.Array, jax.Array]:
  """Deterministic evaluation preprocessing: normalise + plain one-hot."""
  _check_images(images)
  _check_labels(labels, images.shape[0])
  mean, std = _check_channel_stats(_field(config, "mean"), _field(config, "std"),
                                   images.shape[-1])
  return _preprocess_eval(images, labels, num_classes, mean, std)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _preprocess_eval(images, labels, num_classes, mean, std):
  return (normalize(images, mean, std),
          smooth_labels(labels, num_classes, 0.0))


def augment_batch(key: jax.Array, images: jax.Array, labels: jax.Array, *,
                  num_classes: int, config: Any) -> tuple[jax.Array, jax.Array]:
  """Training augmentation of one (global) batch.

  uint8 [B,H,W,C] images -> normalised float32, then (each switchable in
  `config`) random resized crop, horizontal flip, label smoothing,
  mixup / cutmix. Returns (images float32 [B,H,W,C], targets float32
  [B, num_classes]). A pure function of (key, images, labels); pass
  ``key = jax.random.fold_in(base_key, step)``.
  """
  validate_augment_config(config)
  _check_images(images)
  _check_labels(labels, images.shape[0])
  if images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8 [B, H, W, C]; got dtype "
                     f"{images.dtype}")
  mean, std = _check_channel_stats(config.mean, config.std, images.shape[-1])
  # Plain hashable values, so the jitted body is cached per configuration.
  params = _AugmentParams(
      mean=mean, std=std, crop=bool(config.crop),
      crop_scale=tuple(float(v) for v in config.crop_scale),
      crop_ratio=tuple(float(v) for v in config.crop_ratio),
      flip=bool(config.flip), label_smoothing=float(config.label_smoothing),
      mixup_alpha=float(config.mixup_alpha),
      cutmix_alpha=float(config.cutmix_alpha),
      mix_switch_prob=float(config.mix_switch_prob))
  return _augment_batch(key, images, labels, num_classes, params)


class _AugmentParams(NamedTuple):
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop: bool
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip: bool
  label_smoothing: float
  mixup_alpha: float
  cutmix_alpha: float
  mix_switch_prob: float


@functools.partial(jax.jit, static_argnums=(3, 4))
def _augment_batch(key, images, labels, num_classes: int,
                   p: _AugmentParams):
  x = normalize(images, p.mean, p.std)
  if p.crop:
    x = random_resized_crop(jax.random.fold_in(key, _STREAM_CROP), x,
                            scale=p.crop_scale, ratio=p.crop_ratio)
  if p.flip:
    x = random_flip(jax.random.fold_in(key, _STREAM_FLIP), x)
  targets = smooth_labels(labels, num_classes, p.label_smoothing)
  x, targets = mixup_or_cutmix(
      jax.random.fold_in(key, _STREAM_MIX), x, targets,
      mixup_alpha=p.mixup_alpha, cutmix_alpha=p.cutmix_alpha,
      switch_prob=p.mix_switch_prob)
  return x, targets
