"""Host images/s of the streaming input path, per worker process.

  python -m benchmarks.input_pipeline [--images=512] [--sizes=224,28] [--workers=0,1,2]

Generates ImageNet-like JPEGs (about 400x350, quality 90, smooth content so
they compress like photographs), writes them as ArrayRecord with
`pixel_vit.write_records`, then times `data/stream.py`'s training batches:
read, decode, Inception random-resized crop of the original, resize to each
`--sizes` side, flip, batch. `--workers=0` runs everything in the training
process (grain's reader threads only); N > 0 uses N grain worker processes.
Printed per configuration: images/s, and images/s per worker (per process
for 0 workers), with the machine's core count: on 2 cores, more than 2
workers only shows contention.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image


def make_jpegs(root: str, count: int, classes: int = 10, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  for i in range(count):
    folder = os.path.join(root, f"class_{i % classes:02d}")
    os.makedirs(folder, exist_ok=True)
    height, width = int(rng.integers(300, 400)), int(rng.integers(350, 450))
    # Low-frequency content upsampled: compresses like a photograph.
    coarse = (rng.random((height // 16 + 1, width // 16 + 1, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    image.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
  return root


def time_stream(split, image_size: int, workers: int, batch: int, steps: int) -> float:
  from pixel_vit.data import stream

  host = stream.HostCrops(image_size=image_size)
  layout = stream.Layout(batch)
  batches = stream.train_batches(
    split, host, layout, seed=0, start_step=0, total_steps=steps + 1, workers=workers
  )
  next(batches)  # workers started, first batch made
  # Skip what was made ahead while the first batch waited (reader threads'
  # and workers' buffers), then time a steady stretch.
  warm = max(4, steps // 4)
  for _ in range(warm):
    next(batches)
  start = time.perf_counter()
  for _ in range(steps - warm):
    next(batches)
  return (steps - warm) * batch / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--sizes", default="224,28")
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args()
  from pixel_vit import write_records
  from pixel_vit.data import records

  with tempfile.TemporaryDirectory() as tmp:
    images = make_jpegs(os.path.join(tmp, "images"), args.images)
    mean_bytes = np.mean(
      [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(images) for f in files]
    )
    write_records.write_split(images=images, out=os.path.join(tmp, "records"), split="train")
    split = records.open_split(os.path.join(tmp, "records"), "train")
    print(
      f"{args.images} JPEGs, ~400x350, {mean_bytes / 1024:.0f} KiB each; {os.cpu_count()} cores"
    )
    print(f"{'size':>5} {'workers':>8} {'images/s':>9} {'per worker':>11}")
    for size in (int(s) for s in args.sizes.split(",")):
      for workers in (int(w) for w in args.workers.split(",")):
        rate = time_stream(split, size, workers, args.batch, args.steps)
        print(f"{size:>5} {workers:>8} {rate:>9.0f} {rate / max(workers, 1):>11.0f}", flush=True)


if __name__ == "__main__":
  main()
