"""Host crops of the original image: the paper's (DeiT / MAE) recipe.

Training takes an Inception-style random-resized crop of the image as it was
stored (its own size and aspect ratio), resizes that box to the training
size, then flips. Evaluation resizes the shorter side to
`image_size / crop_fraction` and takes the centre `image_size` square.
Cropping before resizing is the point: resizing to a square first (what the
in-memory path does for small datasets) distorts the aspect ratio of every
image and crops a different region.

Everything here is numpy + PIL on one image, so it runs in grain's worker
processes. Randomness comes from a numpy Generator the caller derives from
(seed, epoch, position in the global order), so a crop does not depend on
which process or worker made it.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

RESAMPLE = Image.BICUBIC  # timm / DeiT / MAE: bicubic


class BadImageError(ValueError):
  """An image that cannot be decoded (corrupt or not an image)."""


def open_image(data: bytes, *, where: str = "an image") -> Image.Image:
  """Encoded bytes (JPEG, PNG, ...) fully decoded, in the file's own mode."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as e:  # PIL raises OSError, SyntaxError, ... on bad data
    raise BadImageError(f"{where} cannot be decoded ({type(e).__name__}: {e}).") from e
  return image


def decode(data: bytes, channels: int, *, where: str = "an image") -> Image.Image:
  """Encoded bytes as a PIL image with `channels` (1: 'L', 3: 'RGB').
  Greyscale, palette, CMYK and alpha images are converted, as ImageNet's few
  CMYK and greyscale JPEGs must be."""
  if channels not in (1, 3):
    raise ValueError(f"channels={channels} must be 1 or 3.")
  return open_image(data, where=where).convert("L" if channels == 1 else "RGB")


def random_resized_crop_box(
  rng: np.random.Generator,
  height: int,
  width: int,
  *,
  scale: tuple[float, float],
  ratio: tuple[float, float],
  attempts: int = 10,
) -> tuple[int, int, int, int]:
  """(top, left, height, width) of an Inception-style crop: an area fraction
  uniform in `scale`, an aspect ratio (w/h) log-uniform in `ratio`, placed
  uniformly; after `attempts` draws that do not fit, the centre crop at the
  nearest allowed ratio (the torchvision / timm rule)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target_area * aspect))
    h = round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, round(width / min(ratio))
  elif in_ratio > max(ratio):
    w, h = round(height * max(ratio)), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def train_crop(
  image: Image.Image,
  rng: np.random.Generator,
  image_size: int,
  *,
  scale: tuple[float, float],
  ratio: tuple[float, float],
  flip: bool,
) -> np.ndarray:
  """uint8 [image_size, image_size, C]: a random-resized crop of the original
  image, resized, then flipped left-right with probability 1/2 if `flip`."""
  top, left, h, w = random_resized_crop_box(
    rng, image.height, image.width, scale=scale, ratio=ratio
  )
  # One resample from the box (PIL filters over the box, no second pass).
  crop = image.resize((image_size, image_size), RESAMPLE, box=(left, top, left + w, top + h))
  return maybe_flip(_with_channels(np.asarray(crop, np.uint8)), rng, flip)


def maybe_flip(pixels: np.ndarray, rng: np.random.Generator, flip: bool) -> np.ndarray:
  """Left-right with probability 1/2 if `flip` (one draw from `rng` either way
  of the coin, none when `flip` is off)."""
  if flip and rng.random() < 0.5:
    return np.ascontiguousarray(pixels[:, ::-1])
  return pixels


def eval_crop(image: Image.Image, image_size: int, *, crop_fraction: float) -> np.ndarray:
  """uint8 [image_size, image_size, C]: the shorter side resized to
  floor(image_size / crop_fraction) (timm's rule), then the centre square."""
  if not 0 < crop_fraction <= 1:
    raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1].")
  shorter = math.floor(image_size / crop_fraction)
  width, height = image.size
  if width <= height:
    size = (shorter, max(shorter, round(height * shorter / width)))
  else:
    size = (max(shorter, round(width * shorter / height)), shorter)
  resized = image.resize(size, RESAMPLE)
  left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
  return _with_channels(
    np.asarray(resized.crop((left, top, left + image_size, top + image_size)), np.uint8)
  )


def _with_channels(pixels: np.ndarray) -> np.ndarray:
  return pixels[..., None] if pixels.ndim == 2 else np.ascontiguousarray(pixels)
