"""Image grids people look at: PNG files and TensorBoard images."""

from __future__ import annotations

import numpy as np
from etils import epath
from PIL import Image

# Tiny images (8x8 digits, 28x28 MNIST) are enlarged so a grid is readable.
MIN_CELL_PIXELS = 64


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Float images in [0, 1] -> uint8, clipped."""
  return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def grid(columns: list[np.ndarray], *, separator: int = 2) -> np.ndarray:
  """Rows = examples, columns = the given [N, H, W, C] uint8 arrays side by side.

  Cells are enlarged by an integer factor (nearest neighbour) up to
  MIN_CELL_PIXELS; 1-channel images become RGB; white separators.
  """
  n, h, w, _ = columns[0].shape
  if any(c.shape[:3] != (n, h, w) for c in columns):
    raise ValueError(f"grid columns differ in shape: {[c.shape for c in columns]}")
  scale = max(1, -(-MIN_CELL_PIXELS // max(h, w)))
  cells = [
    np.repeat(
      np.repeat(np.broadcast_to(c, (n, h, w, 3)) if c.shape[-1] == 1 else c, scale, axis=1),
      scale,
      axis=2,
    )
    for c in columns
  ]
  ch, cw = h * scale, w * scale
  out = np.full(
    (n * ch + (n - 1) * separator, len(cells) * cw + (len(cells) - 1) * separator, 3), 255, np.uint8
  )
  for j, column in enumerate(cells):
    for i in range(n):
      y, x = i * (ch + separator), j * (cw + separator)
      out[y : y + ch, x : x + cw] = column[i]
  return out


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a PNG to a local or gs:// path, creating its directory."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    Image.fromarray(image).save(f, format="PNG")
