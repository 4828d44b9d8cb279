r"""Writes an image folder as ArrayRecord shards for the streaming loader.

  python -m pixel_vit.write_records --images=/data/imagenet/train \
      --out=/data/imagenet_records --split=train --workers=8

`--images` holds one folder per class (ImageFolder layout: `<class>/<file>`);
classes are numbered in sorted folder-name order, as torchvision and
big_vision's imagefolder do. Each image file is stored as it is (see
data/records.py) after a full decode proves it readable; an image that does
not decode is skipped and listed (`--on_bad_image=skip`, the default) or
stops the command naming it (`fail`). Greyscale and CMYK images are kept and
converted to RGB when read; the summary counts them.

Resumable: the file list and its order are fixed by the folder's contents
(`<split>.plan.json` records them); each finished shard is renamed into place
with its own summary, so a rerun with the same flags writes only the
missing shards, and a changed folder is refused instead of mixed in.
`<split>.json` is written last and marks the split complete.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import time

import numpy as np
from absl import app, flags, logging

from pixel_vit import command_line
from pixel_vit.data import crops, records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PROGRESS_EVERY_SECONDS = 10.0


def list_image_folder(images: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(class names, [(path relative to `images`, label)]) in a fixed order."""
  if not os.path.isdir(images):
    raise ValueError(f"--images={images!r} is not a directory.")
  class_names = sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)))
  if not class_names:
    raise ValueError(
      f"--images={images!r} holds no class folders: the layout is <images>/<class>/<file>.jpg."
    )
  files = []
  for label, name in enumerate(class_names):
    found = sorted(
      f for f in os.listdir(os.path.join(images, name)) if f.lower().endswith(IMAGE_SUFFIXES)
    )
    if not found:
      raise ValueError(
        f"class folder {os.path.join(images, name)!r} holds no image files "
        f"({', '.join(IMAGE_SUFFIXES)}): remove it or add its images (an empty "
        "class would shift no label but train a class that never occurs)."
      )
    files.extend((os.path.join(name, f), label) for f in found)
  return class_names, files


def plan_shards(files: list, examples_per_shard: int) -> list[list]:
  """Files in a fixed shuffled order (classes mixed within a shard), cut into shards."""
  if examples_per_shard < 1:
    raise ValueError(f"--examples_per_shard={examples_per_shard} must be positive.")
  order = np.random.default_rng(0).permutation(len(files))
  shuffled = [files[i] for i in order]
  return [shuffled[i : i + examples_per_shard] for i in range(0, len(shuffled), examples_per_shard)]


def write_shard(images: str, path: str, files: list, on_bad_image: str) -> dict:
  """Writes one shard (to a temporary name, renamed when complete) and its
  summary `<path>.json`; returns the summary."""
  from array_record.python import array_record_module  # a dependency of the stream path only

  summary = {"labels": [], "skipped": [], "converted": {}}
  temporary = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(temporary, "group_size:1")
  try:
    for relative, label in files:
      with open(os.path.join(images, relative), "rb") as f:
        data = f.read()
      try:
        # A full decode proves the file readable; its mode says what is converted when read.
        mode = crops.open_image(data, where=f"image {relative!r}").mode
      except crops.BadImageError as e:
        if on_bad_image == "fail":
          raise ValueError(
            f"{e} Remove or replace it, or pass --on_bad_image=skip to skip and list such files."
          ) from None
        summary["skipped"].append(relative)
        continue
      if mode != "RGB":  # greyscale, CMYK, palette, alpha: converted when read
        summary["converted"][mode] = summary["converted"].get(mode, 0) + 1
      writer.write(records.encode_record(label, data))
      summary["labels"].append(label)
  finally:
    writer.close()
  with open(path + ".json.tmp", "w") as f:
    json.dump(summary, f)
  os.replace(temporary, path)
  os.replace(path + ".json.tmp", path + ".json")
  return summary


def write_split(
  *,
  images: str,
  out: str,
  split: str,
  examples_per_shard: int = 1024,
  workers: int = 1,
  on_bad_image: str = "skip",
) -> records.RecordSplit:
  class_names, files = list_image_folder(images)
  shards = plan_shards(files, examples_per_shard)
  os.makedirs(out, exist_ok=True)
  _check_plan(out, split, images, shards)
  names = [records.shard_name(split, i, len(shards)) for i in range(len(shards))]
  todo = [
    i for i, name in enumerate(names) if not os.path.exists(os.path.join(out, name + ".json"))
  ]
  logging.info(
    "write_records: %d images in %d classes -> %d shards in %s (%d to write)",
    len(files),
    len(class_names),
    len(shards),
    out,
    len(todo),
  )
  progress = _Progress(sum(len(shards[i]) for i in todo))
  if workers <= 1:
    for i in todo:
      write_shard(images, os.path.join(out, names[i]), shards[i], on_bad_image)
      progress.advance(len(shards[i]))
  else:  # spawned, not forked: the caller may hold JAX's threads
    with concurrent.futures.ProcessPoolExecutor(
      max_workers=workers, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
      futures = {
        pool.submit(write_shard, images, os.path.join(out, names[i]), shards[i], on_bad_image): i
        for i in todo
      }
      for future in concurrent.futures.as_completed(futures):
        future.result()
        progress.advance(len(shards[futures[future]]))
  summaries = []
  for name in names:
    with open(os.path.join(out, name + ".json")) as f:
      summaries.append(json.load(f))
  labels = np.concatenate([np.asarray(s["labels"], np.int64) for s in summaries])
  converted: dict = {}
  for s in summaries:
    for mode, count in s["converted"].items():
      converted[mode] = converted.get(mode, 0) + count
  written = records.RecordSplit(
    directory=out,
    split=split,
    num_examples=len(labels),
    class_names=tuple(class_names),
    class_counts=tuple(int(c) for c in np.bincount(labels, minlength=len(class_names))),
    shards=tuple(names),
    shard_sizes=tuple(len(s["labels"]) for s in summaries),
    skipped=tuple(sorted(p for s in summaries for p in s["skipped"])),
    converted=converted,
  )
  with open(records.metadata_path(out, split) + ".tmp", "w") as f:
    json.dump(written.to_json(), f, indent=1)
  os.replace(records.metadata_path(out, split) + ".tmp", records.metadata_path(out, split))
  logging.info(
    "write_records: wrote %s: %d examples%s%s",
    records.metadata_path(out, split),
    written.num_examples,
    f"; skipped {len(written.skipped)} that do not decode (listed there)"
    if written.skipped
    else "",
    f"; converted to RGB when read: {converted}" if converted else "",
  )
  return written


def _check_plan(out: str, split: str, images: str, shards: list) -> None:
  """A rerun continues only the same plan: the same files in the same shards."""
  digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()
  path = os.path.join(out, f"{split}.plan.json")
  if os.path.exists(path):
    with open(path) as f:
      earlier = json.load(f)
    if earlier["digest"] != digest:
      raise ValueError(
        f"{out} holds a partly written {split!r} split of a different file list (another "
        f"folder, or files added or removed since: {path} was {earlier['images']!r} with "
        f"{earlier['examples']} files). Write to a fresh --out, or delete its {split}-* "
        "files to start over."
      )
    return
  with open(path, "w") as f:
    json.dump(
      {"images": os.path.abspath(images), "examples": sum(map(len, shards)), "digest": digest}, f
    )


class _Progress:
  """A log line every PROGRESS_EVERY_SECONDS: images done, images/s, ETA."""

  def __init__(self, total: int):
    self.total, self.done, self.start, self.last = total, 0, time.monotonic(), 0.0

  def advance(self, count: int) -> None:
    self.done += count
    now = time.monotonic()
    if now - self.last < PROGRESS_EVERY_SECONDS and self.done < self.total:
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    eta = (self.total - self.done) / rate if rate else float("inf")
    logging.info(
      "write_records: %d/%d images (%.0f%%), %.0f images/s, ETA %.0f s",
      self.done,
      self.total,
      100 * self.done / max(self.total, 1),
      rate,
      eta,
    )


def define_flags() -> None:
  """The command's flags, defined when it runs (not at import: --out is also
  another command's flag, and tests import both)."""
  flags.DEFINE_string("images", None, "Folder with one sub-folder of images per class.")
  flags.DEFINE_string("out", None, "Output folder (created).")
  flags.DEFINE_string("split", "train", "Split name: the files are <split>-*.")
  flags.DEFINE_integer("examples_per_shard", 1024, "Records per shard.")
  flags.DEFINE_integer("workers", 1, "Processes that decode and write shards.")
  flags.DEFINE_enum(
    "on_bad_image",
    "skip",
    ["skip", "fail"],
    "An image that does not decode: skip and list it, or stop.",
  )
  flags.mark_flags_as_required(["images", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a --flag.")
  values = flags.FLAGS
  with command_line.stops_with_one_message():
    write_split(
      images=values.images,
      out=values.out,
      split=values.split,
      examples_per_shard=values.examples_per_shard,
      workers=values.workers,
      on_bad_image=values.on_bad_image,
    )


if __name__ == "__main__":
  define_flags()
  app.run(main)
