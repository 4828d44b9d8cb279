"""The paper's pixel-permutation ablation: a fixed scramble of pixel positions.

`config.data.permute_pixels` = {swaps: T, max_distance: delta, seed}: starting
from the identity, T times a pixel is drawn uniformly and swapped with a
pixel drawn uniformly from those at Chebyshev distance 1..delta from it
(inside a (2 delta + 1)^2 window, clipped to the image). The result is one
permutation of the H x W positions, a pure function of (T, delta, seed, H, W):
the same for every image of every split and epoch. Successive swaps compose,
so a pixel that is swapped twice can end up further than delta from home;
every single swap is within delta.

It is applied on device to the model's input, after augmentation and before
tokenisation (`permute`), so ViT/2 and PiT/1 see the same scrambled image and
crops / flips / mixup act on the real image first. Diffusion samples are
mapped back with `unpermute` before they are shown or scored.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def validate_permute_config(permute) -> None:
  """Raises ValueError naming the key, the value and what is allowed."""
  for key, lowest in (("swaps", 0), ("max_distance", 1), ("seed", 0)):
    value = permute.get(key)
    if not _is_int(value) or value < lowest:
      raise ValueError(
        f"config.data.permute_pixels.{key}={value!r} is not allowed: expected an int "
        f">= {lowest} (swaps = T pixel-pair swaps, 0 = off; max_distance = delta, the "
        "largest row/column offset of a swapped pair; seed fixes the permutation)."
      )


@dataclasses.dataclass(frozen=True, eq=False)
class PixelPermutation:
  """Output pixel i (row-major) takes input pixel `source[i]`."""

  height: int
  width: int
  source: np.ndarray  # int32 [H * W], a permutation of range(H * W)
  swaps: np.ndarray  # int32 [T, 2]: the flat index pairs swapped, in order

  @property
  def inverse(self) -> np.ndarray:
    return np.argsort(self.source).astype(np.int32)

  def _gather(self, images, index: np.ndarray):
    """Reorders the pixels of [..., H, W, C] numpy or JAX arrays by `index`."""
    *lead, height, width, channels = images.shape
    if (height, width) != (self.height, self.width):
      raise ValueError(
        f"pixel permutation was made for {self.height}x{self.width} images, got {height}x{width}."
      )
    xp = jnp if isinstance(images, jax.Array) else np
    flat = images.reshape(*lead, height * width, channels)
    return xp.take(flat, xp.asarray(index), axis=-2).reshape(images.shape)

  def permute(self, images):
    return self._gather(images, self.source)

  def unpermute(self, images):
    return self._gather(images, self.inverse)


def make_permutation(
  height: int, width: int, *, swaps: int, max_distance: int, seed: int
) -> PixelPermutation:
  """T swaps of pixel pairs at Chebyshev distance <= max_distance (see module doc)."""
  validate_permute_config(dict(swaps=swaps, max_distance=max_distance, seed=seed))
  if swaps and height * width < 2:
    raise ValueError(
      f"config.data.permute_pixels.swaps={swaps} needs at least 2 pixels; "
      f"the images are {height}x{width}."
    )
  rng = np.random.default_rng([seed, height, width])
  source = np.arange(height * width, dtype=np.int32)
  pairs = np.zeros((swaps, 2), np.int32)
  reach = min(max_distance, max(height, width) - 1)
  for t in range(swaps):
    a = int(rng.integers(height * width))
    row, col = divmod(a, width)
    # Partners: the window around (row, col) clipped to the image, minus itself.
    rows = np.arange(max(0, row - reach), min(height, row + reach + 1))
    cols = np.arange(max(0, col - reach), min(width, col + reach + 1))
    b = int(rng.integers(len(rows) * len(cols) - 1))
    b += b >= (row - rows[0]) * len(cols) + (col - cols[0])  # skip (row, col)
    b = int(rows[b // len(cols)]) * width + int(cols[b % len(cols)])
    source[[a, b]] = source[[b, a]]
    pairs[t] = (a, b)
  return PixelPermutation(height, width, source, pairs)


def permutation_for(data_config, height: int, width: int) -> PixelPermutation | None:
  """The run's permutation from `config.data.permute_pixels`, or None when off."""
  permute = data_config.get("permute_pixels")
  if permute is None or permute.swaps == 0:
    return None
  return make_permutation(
    height, width, swaps=permute.swaps, max_distance=permute.max_distance, seed=permute.seed
  )


def permute(permutation: PixelPermutation | None, images):
  """`images` scrambled by `permutation` (unchanged when it is None)."""
  return images if permutation is None else permutation.permute(images)
