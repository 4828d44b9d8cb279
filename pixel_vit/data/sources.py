"""Image classification sources: `digits`, `npz:PATH`, `tfds:NAME`.

`parse_source` turns the config string into a `Source` without reading data,
so configs can be validated before anything compiles. `Source.load` returns
one process's shard of one split as uint8 NHWC numpy arrays in host memory;
`pixel_vit.data.pipeline` batches it.

Sharding is contiguous and disjoint with `np.array_split` semantics (for
TFDS, `tfds.even_splits`, which splits the same way): the first
`total % process_count` processes hold one example more than the rest.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
import socket
import threading
import urllib.parse
import urllib.request
import zipfile
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image

from pixel_vit.config_checks import check_positive, named
from pixel_vit.data import crops, records

SOURCE_FORMS = ("digits", "npz:PATH", "tfds:NAME", "records:DIR")
LOADERS = ("auto", "memory", "stream")

# Fraction of a single-file source (digits, npz without `{split}`) that goes
# to 'train'; the rest is 'test'.
_TRAIN_FRACTION = (4, 5)

_RESIZE_CHUNK = 4096


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class ImageSplit:
  """One process's shard of one split, held in host memory at training resolution.

  `images` are uint8 pixels, or float32 VAE latents for a latent dataset
  (`npz:` files with a `latents` array, see `write_latents`).
  """

  images: np.ndarray  # uint8 (pixels) or float32 (latents), NHWC
  labels: np.ndarray  # int32, [n]
  num_classes: int
  total_examples: int  # size of the whole split, over all processes
  process_index: int
  process_count: int
  # Where the split came from, for messages: "npz file PATH", "tfds:NAME split 'test'".
  origin: str = ""
  # Examples per class id over the whole split (all processes), when the
  # source read the whole split (digits, npz); None for TFDS.
  class_counts: np.ndarray | None = None
  # True when num_classes was inferred as the largest label + 1 (an npz file
  # without `class_names`) rather than stated by the dataset.
  num_classes_inferred: bool = False
  # A streamed split (records:DIR): its shards, read by data/stream.py. Then
  # `images` and `labels` hold no examples, only the training shape.
  stream: records.StreamSplit | None = None
  # How the split is read, for the run's first log line: 'in memory' or
  # 'streamed from ArrayRecord' and, where `loader='auto'` chose, why.
  reading: str = "in memory"

  @property
  def is_latent(self) -> bool:
    return self.images.dtype == np.float32

  def __post_init__(self):
    if self.images.dtype not in (np.uint8, np.float32) or self.images.ndim != 4:
      raise ValueError(
        f"ImageSplit.images must be uint8 or float32 (latents) NHWC, got "
        f"{self.images.dtype} "
        f"with shape {self.images.shape}."
      )
    if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
      raise ValueError(
        f"ImageSplit.labels must be int32 of shape {self.images.shape[:1]}, "
        f"got {self.labels.dtype} with shape {self.labels.shape}."
      )
    _check_process(self.process_index, self.process_count)
    largest_shard = -(-self.total_examples // self.process_count)
    if len(self.images) > largest_shard:
      raise ValueError(
        f"ImageSplit holds {len(self.images)} examples, more than a "
        f"1/{self.process_count} shard of {self.total_examples}."
      )


def _describe_counts(ids, counts, limit: int = 5) -> str:
  """'999 (1 example), 1000 (3 examples)' for the first `limit` ids."""
  ids, counts = list(ids), list(counts)
  shown = ", ".join(
    f"{i} ({c} example{'s' if c != 1 else ''})" for i, c in zip(ids[:limit], counts[:limit])
  )
  return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def describe_labels(labels: np.ndarray, limit: int = 5) -> str:
  """'999 (1 example), 1000 (3 examples)': the distinct values of `labels` with counts."""
  values, counts = np.unique(labels, return_counts=True)
  return _describe_counts(values, counts, limit)


def _describe_images(split: ImageSplit) -> str:
  height, width, channels = split.images.shape[1:]
  kind = "latents" if split.is_latent else "images"
  return f"{height}x{width}x{channels} {kind}"


def _padded(counts: np.ndarray, length: int) -> np.ndarray:
  return np.pad(counts, (0, max(0, length - len(counts))))


def check_splits(train: ImageSplit, test: ImageSplit, *, labelled: bool = True) -> list[str]:
  """Checks, before anything compiles, that a model built for `train` can evaluate `test`.

  Raises ValueError when the eval images have another size, channel count or
  kind (pixels / latents) than the train images; with `labelled` (the labels
  are the target), when eval labels fall outside the model's class count
  (the train split's), when the two splits state different class counts,
  when a class count inferred from the largest label (no `class_names`)
  leaves most ids unused (a stray label), or when no eval class occurs in
  train. Returns warnings, one paragraph each, for what a run can live with:
  a few eval classes absent from a small train split, a few unused ids.
  """
  train_name = train.origin or "the train split"
  test_name = test.origin or "the eval split"
  if train.images.shape[1:] != test.images.shape[1:] or train.is_latent != test.is_latent:
    fix = (
      "encode both splits at one size with python -m pixel_vit.encode_latents"
      if train.is_latent or test.is_latent
      else "set config.data.image_size to resize both splits to one square size, or write "
      "both at one size"
    )
    raise ValueError(
      f"{test_name} holds {_describe_images(test)} but {train_name} holds "
      f"{_describe_images(train)}: the model is built for the train split and "
      f"could not evaluate the other (it would fail at the first evaluation, "
      f"after training). Fix: {fix}."
    )
  if not labelled:
    return []
  num_classes = train.num_classes
  if (
    not train.num_classes_inferred
    and not test.num_classes_inferred
    and test.num_classes != num_classes
  ):
    raise ValueError(
      f"{test_name} states {test.num_classes} classes but {train_name} states "
      f"{num_classes}: both splits must share one class list (the same "
      "class_names); write them with the same class_names."
    )
  if train.class_counts is None or test.class_counts is None:
    return []  # a TFDS dataset: labels are within its ClassLabel, the same for every split
  length = max(num_classes, len(train.class_counts), len(test.class_counts))
  train_counts = _padded(train.class_counts, length)
  test_counts = _padded(test.class_counts, length)
  if train.num_classes_inferred:
    origin = f"inferred as the largest train label + 1, since {train_name} has no class_names"
    explicit = (
      "save class_names=<the names of all classes> in the npz file(s) so the class "
      "count is explicit"
    )
  else:
    origin = f"the class_names of {train_name}"
    explicit = "use files with the same class_names"
  beyond = np.nonzero(test_counts[num_classes:])[0] + num_classes
  if len(beyond):
    count = int(test_counts[beyond].sum())
    raise ValueError(
      f"{test_name}: {count} of {test.total_examples} labels are outside [0, "
      f"{num_classes}) of the model's {num_classes} classes ({origin}): "
      f"{_describe_counts(beyond, test_counts[beyond])}. Those examples would "
      "score eval/top1 0 and eval/loss nan. Fix: drop or relabel them, or "
      f"{explicit}."
    )
  warnings = []
  if train.num_classes_inferred:
    used = (train_counts[:num_classes] + test_counts[:num_classes]) > 0
    unused = np.nonzero(~used)[0]
    largest = num_classes - 1
    examples = int(train_counts[largest] + test_counts[largest])
    message = (
      f"{train_name} has no class_names, so the class count {num_classes} is "
      f"inferred from the largest label, {largest} ({examples} example"
      f"{'s' if examples != 1 else ''}), but {len(unused)} of the {num_classes} ids "
      f"0..{largest} never occur in either split (e.g. "
      f"{', '.join(map(str, unused[:5]))})."
    )
    if len(unused) > used.sum():
      raise ValueError(
        f"{message} Most of the {num_classes}-class head would never train: a "
        f"stray label is the likely cause. Fix: drop or relabel the stray "
        f"examples, or, if the dataset really has {num_classes} classes, "
        f"{explicit}."
      )
    if len(unused):
      warnings.append(
        f"{message} Their outputs never train. If {num_classes} classes are "
        f"intended, {explicit} (which also silences this warning); else fix "
        "the labels."
      )
  only_eval = np.nonzero((test_counts[:num_classes] > 0) & (train_counts[:num_classes] == 0))[0]
  if len(only_eval):
    count = int(test_counts[only_eval].sum())
    share = 100.0 * count / test.total_examples
    message = (
      f"{len(only_eval)} of the {num_classes} classes occur in {test_name} "
      f"({count} of {test.total_examples} examples, {share:.1f}%) but never in "
      f"{train_name}: {_describe_counts(only_eval, test_counts[only_eval])}."
    )
    if count == test.total_examples:
      raise ValueError(
        f"{message} No eval example is of a class the model trains on, so "
        "eval/top1 would be 0. Fix: check config.data.train_split / "
        "eval_split (or the npz files): the splits must share classes."
      )
    warnings.append(
      f"{message} The model never trains on them, so eval/top1 is at most "
      f"{100.0 - share:.1f}%. Expected for a train split too small to hold every "
      "class; otherwise use a train split with every class or drop those eval "
      "examples."
    )
  return warnings


class Source(abc.ABC):
  """A named image classification dataset that can load per-process shards."""

  @property
  @abc.abstractmethod
  def name(self) -> str:
    """The source string this was parsed from, e.g. 'tfds:cifar100'."""

  @abc.abstractmethod
  def load(
    self,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
  ) -> ImageSplit:
    """Reads this process's shard of `split`, resized to `image_size` if given."""


def source_form(name: str) -> tuple[str, str]:
  """'npz:PATH' -> ('npz', 'PATH'): the form of a source string, checked
  without looking at any file."""
  if not isinstance(name, str):
    raise ValueError(f"data source {name!r} must be a string, one of {list(SOURCE_FORMS)}.")
  kind, sep, arg = name.partition(":")
  if name == "digits":
    return "digits", ""
  if sep and kind == "npz" and arg:
    return kind, arg
  if sep and kind == "tfds" and arg and not any(c.isspace() for c in arg):
    return kind, arg
  if sep and kind == "records" and arg:
    return kind, arg
  raise ValueError(
    f"data source {name!r} is not recognised; use one of {list(SOURCE_FORMS)}, "
    "e.g. 'digits', 'npz:../shared/data/mnist_rasbt_{split}.npz' or "
    "'tfds:cifar100'."
  )


def parse_source(
  name: str,
  *,
  data_dir: str | None = None,
  download: bool = True,
  loader: str = "auto",
  crop_fraction: float = 0.875,
) -> Source:
  """'digits' | 'npz:PATH' | 'tfds:NAME' | 'records:DIR' -> Source. Reads no data.

  `data_dir`, `download`, `loader` and `crop_fraction` only apply to TFDS
  sources (`TfdsSource`).
  """
  kind, arg = source_form(name)
  if kind == "digits":
    return DigitsSource()
  if kind == "npz":
    return NpzSource(arg)
  if kind == "records":
    return RecordsSource(arg)
  if data_dir and not download and "://" not in data_dir and not os.path.isdir(data_dir):
    raise ValueError(
      f"data_dir {data_dir!r} for {name!r} does not exist and download "
      "is off; point --config.data.data_dir at a prepared TFDS directory."
    )
  return TfdsSource(
    arg, data_dir=data_dir, download=download, loader=loader, crop_fraction=crop_fraction
  )


def _check_process(process_index: int, process_count: int) -> None:
  if not (isinstance(process_count, (int, np.integer)) and process_count >= 1):
    raise ValueError(f"process_count={process_count!r} must be an int >= 1.")
  if not (isinstance(process_index, (int, np.integer)) and 0 <= process_index < process_count):
    raise ValueError(f"process_index={process_index!r} must be an int in [0, {process_count}).")


def _check_image_size(image_size: int | None) -> None:
  if image_size is not None and not (isinstance(image_size, (int, np.integer)) and image_size > 0):
    raise ValueError(f"image_size={image_size!r} must be a positive int or None (native size).")


def _check_train_test(source: str, split: str) -> None:
  if split not in ("train", "test"):
    raise ValueError(f"split {split!r} of {source!r} is not available; use 'train' or 'test'.")


def _train_test_indices(n: int, split: str) -> np.ndarray:
  """The fixed 80/20 split of a single-file dataset, each part in file order."""
  order = np.random.default_rng(0).permutation(n)
  n_train = n * _TRAIN_FRACTION[0] // _TRAIN_FRACTION[1]
  return np.sort(order[:n_train] if split == "train" else order[n_train:])


def _import_tf():
  """Imports TensorFlow for tf.data / resizing, hidden from every GPU."""
  import tensorflow as tf

  # TF would otherwise reserve GPU memory that JAX needs; TF here only feeds data.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices in this process
    if tf.config.get_visible_devices("GPU"):
      raise
  return tf


def _tf_resize(tf, images, image_size: int):
  """Antialiased resize of HWC or NHWC uint8 tensors to image_size x image_size, uint8."""
  resized = tf.image.resize(images, (image_size, image_size), method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _resize(images: np.ndarray, image_size: int | None) -> np.ndarray:
  if image_size is None or images.shape[1:3] == (image_size, image_size):
    return images
  if images.dtype != np.uint8:
    raise ValueError(
      f"latents of size {images.shape[1]}x{images.shape[2]} cannot be resized "
      f"to {image_size}: encode the images at the size you want (python -m "
      "pixel_vit.encode_latents --image_size=8*SIZE) and leave "
      "config.data.image_size unset."
    )
  tf = _import_tf()
  chunks = [
    _tf_resize(tf, images[i : i + _RESIZE_CHUNK], image_size).numpy()
    for i in range(0, len(images), _RESIZE_CHUNK)
  ]
  if not chunks:
    return np.zeros((0, image_size, image_size, images.shape[3]), np.uint8)
  return np.concatenate(chunks)


class _WholeSplit(NamedTuple):
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  num_classes_inferred: bool = False  # the largest label + 1 (no class_names)


class _InMemorySource(Source):
  """A source whose whole split is read into memory, then sharded."""

  @abc.abstractmethod
  def _read_split(self, split: str) -> _WholeSplit:
    """The whole split: uint8 NHWC images, int labels and the class count."""

  def _origin(self, split: str) -> str:
    return f"{self.name} split {split!r}"

  def load(
    self,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
  ) -> ImageSplit:
    _check_process(process_index, process_count)
    _check_image_size(image_size)
    images, labels, num_classes, inferred = self._read_split(split)
    shard = np.array_split(np.arange(len(images)), process_count)[process_index]
    return ImageSplit(
      images=_resize(np.ascontiguousarray(images[shard]), image_size),
      labels=labels[shard].astype(np.int32),
      num_classes=num_classes,
      total_examples=len(images),
      process_index=process_index,
      process_count=process_count,
      origin=self._origin(split),
      class_counts=np.bincount(labels, minlength=num_classes),
      num_classes_inferred=inferred,
    )


@dataclasses.dataclass(frozen=True)
class DigitsSource(_InMemorySource):
  """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes); never downloads."""

  @property
  def name(self) -> str:
    return "digits"

  def _read_split(self, split):
    _check_train_test(self.name, split)
    from sklearn import datasets

    digits = datasets.load_digits()
    # Pixel values are 0..16; stretch them to the 0..255 range of every other source.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    index = _train_test_indices(len(images), split)
    return _WholeSplit(images[index], digits.target[index], 10)


@dataclasses.dataclass(frozen=True)
class NpzSource(_InMemorySource):
  """An .npz with `images` (uint8 NHWC or NHW), `labels` (int) and optional `class_names`.

  A latent dataset (written by `python -m pixel_vit.encode_latents`, see
  `write_latents`) has float32 `latents` [N, h, w, c] (already scaled) instead
  of `images`.

  A `{split}` in the path is replaced by the split name (one file per split);
  otherwise the one file is split 80/20 into 'train' and 'test'.
  """

  path: str

  def __post_init__(self):
    candidates = (
      [self.path.replace("{split}", s) for s in ("train", "test")]
      if "{split}" in self.path
      else [self.path]
    )
    if not any(os.path.isfile(p) for p in candidates):
      raise ValueError(
        f"npz source: no file at {' or '.join(candidates)}; pass "
        "npz:PATH with an existing .npz (PATH may contain '{split}'). A "
        "latent dataset is written by python -m pixel_vit.encode_latents."
      )

  @property
  def name(self) -> str:
    return f"npz:{self.path}"

  def _file(self, split: str) -> str:
    return self.path.replace("{split}", split)

  def _origin(self, split: str) -> str:
    if "{split}" in self.path:
      return f"npz file {self._file(split)}"
    return f"npz file {self.path} (its {split!r} part)"

  def _read_split(self, split):
    if "{split}" in self.path:
      return _read_npz(self._file(split), split)
    _check_train_test(self.name, split)
    whole = _read_npz(self.path)
    index = _train_test_indices(len(whole.images), split)
    if not len(index):
      n = len(whole.images)
      raise ValueError(
        f"npz file {self.path} has {n} example(s): its fixed {_TRAIN_FRACTION[0]}/"
        f"{_TRAIN_FRACTION[1]} train/test split leaves none for {split!r}. Use a file with at "
        f"least {_TRAIN_FRACTION[1]} examples, or give the splits their own files "
        "(npz:PATH_{split}.npz with PATH_train.npz and PATH_test.npz)."
      )
    return whole._replace(images=whole.images[index], labels=whole.labels[index])


_NPZ_FIX = (
  "save it with np.savez(path, images=<uint8 [N,H,W,C]>, labels=<int [N]>[, class_names=<str [K]>])"
)


def _open_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of the .npz at `path`, or a ValueError saying what the file is instead."""
  if not os.path.isfile(path):
    raise ValueError(f"npz file {path} does not exist; {_NPZ_FIX}.")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(64)
  if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip's first record / empty zip
    if head.startswith(b"\x93NUMPY"):
      what = "a single .npy array (np.save), not an .npz archive of named arrays"
    elif not head:
      what = "empty (0 bytes): an interrupted write or copy"
    elif all(32 <= c < 127 or c in b"\t\r\n" for c in head):
      what = f"text, not an .npz (zip) archive; it starts with {head[:40].decode()!r}"
    else:
      what = f"not an .npz (zip) archive; its first bytes are {head[:8]!r}"
    raise ValueError(
      f"npz file {path} cannot be read: it is {what}. Point config.data.source "
      f"at the right file, or {_NPZ_FIX}."
    )
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    raise ValueError(
      f"npz file {path} cannot be read: it is truncated or damaged ({size} "
      f"bytes; {type(e).__name__}: {e}). Copy or write it again (an "
      f"interrupted download or np.savez leaves such a file); {_NPZ_FIX}."
    ) from None
  except ValueError as e:  # object arrays would need pickle
    raise ValueError(
      f"npz file {path} cannot be read without pickle ({e}); store plain "
      f"number / string arrays instead: {_NPZ_FIX}."
    ) from None


def _read_npz(path: str, split: str | None = None) -> _WholeSplit:
  """Loads and validates one .npz file (`split`: which one it is, for messages)."""
  arrays = _open_npz(path)
  fix = _NPZ_FIX
  latent = "latents" in arrays and "images" not in arrays
  if latent:
    images = arrays["latents"]
    if images.dtype not in (np.float32, np.float16) or images.ndim != 4:
      raise ValueError(
        f"npz file {path}: latents have dtype {images.dtype} and shape "
        f"{images.shape}, expected float32 [N, h, w, c]; write them with "
        "python -m pixel_vit.encode_latents."
      )
    # A NaN would train on silently and make every eval NaN. min and max show
    # NaN and Inf in two passes without an array-sized mask (latent ImageNet
    # is gigabytes); the mask is built only to describe what is wrong.
    if len(images) and not np.isfinite([images.min(), images.max()]).all():
      bad = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
      first = int(np.argmax(bad))
      raise ValueError(
        f"npz file {path}{f' (split {split!r})' if split else ''}: {int(bad.sum())} of "
        f"{len(images)} latents hold NaN or Inf ({int((~np.isfinite(images)).sum())} "
        f"values; the first is example {first}). Encode the images again with python -m "
        "pixel_vit.encode_latents (float16 overflows above 65504: keep float32), or drop "
        "those examples."
      )
    arrays["images"] = images.astype(np.float32)
  for key in ("images", "labels"):
    if key not in arrays:
      raise ValueError(f"npz file {path} has no {key!r} array (it has {sorted(arrays)}); {fix}.")
  images, labels = arrays["images"], arrays["labels"]
  if not latent and images.dtype != np.uint8:
    raise ValueError(
      f"npz file {path}: images have dtype {images.dtype}, expected uint8 "
      "0..255; convert e.g. with np.round(x * 255).astype(np.uint8)."
    )
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or 0 in images.shape[1:]:
    raise ValueError(
      f"npz file {path}: images have shape {images.shape}, expected rank 4 "
      "[N,H,W,C] (or rank 3 [N,H,W]); " + fix + "."
    )
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"npz file {path}: labels have dtype {labels.dtype} and shape "
      f"{labels.shape}, expected integer class ids of rank 1 [N]; {fix}."
    )
  if len(labels) != len(images):
    raise ValueError(
      f"npz file {path}: {len(images)} images but {len(labels)} labels; "
      "they must have the same length."
    )
  if len(images) == 0:
    raise ValueError(f"npz file {path} is empty (0 examples).")
  if labels.min() < 0:
    bad = labels < 0
    raise ValueError(
      f"npz file {path}: {bad.sum()} of {len(labels)} labels are negative: "
      f"{describe_labels(labels[bad])}; class ids must be in [0, num_classes): "
      "fix or drop these examples."
    )
  inferred = "class_names" not in arrays
  if not inferred:
    num_classes = len(arrays["class_names"])
    if labels.max() >= num_classes:
      bad = labels >= num_classes
      raise ValueError(
        f"npz file {path}: {bad.sum()} of {len(labels)} labels are outside "
        f"[0, {num_classes}) of its {num_classes} class_names: "
        f"{describe_labels(labels[bad])}; add the missing class_names or fix "
        "the labels."
      )
  else:
    num_classes = int(labels.max()) + 1
  if num_classes > np.iinfo(np.int32).max:
    raise ValueError(f"npz file {path}: {num_classes} classes do not fit int32 labels.")
  return _WholeSplit(images, labels, num_classes, inferred)


def write_latents(
  path: str, latents: np.ndarray, labels: np.ndarray, *, latent_scale: float, vae_weights: str
) -> None:
  """Writes one split of a latent dataset, the .npz an `npz:` source reads back:
    latents       float32 [N, h, w, c], already multiplied by `latent_scale`
    labels        int32 [N]
    latent_scale  float32 scalar, the VAE's scaling factor (divide by it to decode)
    vae_weights   str, the basename of the VAE's weights file
  To a temporary file first, so a crash never leaves a truncated .npz behind."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = path + ".tmp"
  with open(temporary, "wb") as f:  # a file object keeps np.savez from appending '.npz'
    np.savez(
      f,
      latents=latents,
      labels=labels,
      latent_scale=np.float32(latent_scale),
      vae_weights=np.str_(vae_weights),
    )
  os.replace(temporary, path)


def _network_reachable(
  host: str = "storage.googleapis.com", port: int = 443, timeout: float = 3.0
) -> bool:
  """Whether a TCP connection to TFDS's download host (or the HTTPS proxy) opens in time."""
  proxy = urllib.request.getproxies().get("https")
  if proxy:
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = parsed.hostname or host, parsed.port or 80
  reachable = []

  def probe():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      reachable.append(True)
    except OSError:
      pass

  # The name lookup ignores socket timeouts and can hang for long on a
  # machine with a broken resolver, so bound the whole probe with a thread.
  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(reachable)


@dataclasses.dataclass(frozen=True)
class TfdsSource(Source):
  """A TensorFlow Datasets image classification dataset ('image' and 'label' features).

  `loader` (config.data.loader): 'memory' decodes this process's shard into
  host memory; 'stream' reads an ArrayRecord-prepared dataset with grain
  (data/stream.py), the image cropped from the original as it is read;
  'auto' streams when the dataset is prepared as ArrayRecord and either its
  images vary in size (the crops need the original) or the decoded shard
  would not fit MEMORY_FRACTION of the host's available memory.

  In memory, `image_size` resizes every image: a whole-image resize for a
  dataset of one image size; for images of many sizes the shorter side to
  image_size / crop_fraction and the centre square (the evaluation crop:
  no aspect distortion), which the device's random crop then works within.
  """

  dataset: str
  data_dir: str | None = None
  download: bool = True
  loader: str = "auto"
  crop_fraction: float = 0.875

  @property
  def name(self) -> str:
    return f"tfds:{self.dataset}"

  def _how_to_provide(self) -> str:
    return (
      f"To provide it: pass --config.data.data_dir=DIR pointing at a prepared TFDS "
      f"directory; or run `tfds build {self.dataset} --data_dir=DIR` on a machine "
      "with network and copy DIR here; or use an offline source: 'npz:PATH' or "
      "'digits'."
    )

  def _builder(self):
    import tensorflow_datasets as tfds

    try:
      return tfds.builder(self.dataset, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      # TFDS's own message lists every dataset it knows; keep only the first line.
      first_line = str(e).splitlines()[0]
      raise ValueError(
        f"{self.name}: {first_line} Check the spelling against "
        "https://www.tensorflow.org/datasets/catalog, or use 'npz:PATH' / "
        "'digits'."
      ) from e

  def _prepare(self, builder) -> None:
    """Makes sure the data is on disk, failing fast when it cannot be."""
    if builder.is_prepared():
      return
    where = f"at {builder.data_dir}"
    if not self.download:
      raise ValueError(
        f"{self.name} is not prepared {where} and download is off. " + self._how_to_provide()
      )
    if not _network_reachable():
      raise ValueError(
        f"{self.name} is not prepared {where} and cannot be downloaded: "
        "storage.googleapis.com is unreachable (no network). " + self._how_to_provide()
      )
    try:
      builder.download_and_prepare()
    except Exception as e:
      # Manual-download datasets (imagenet2012) and network errors land here.
      raise ValueError(
        f"{self.name}: download and preparation {where} failed: {e}\n" + self._how_to_provide()
      ) from e

  def load(
    self,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
  ) -> ImageSplit:
    _check_process(process_index, process_count)
    _check_image_size(image_size)
    tf = _import_tf()  # before TFDS runs any TF op, so TF never claims a GPU
    builder = self._builder()
    features = builder.info.features
    if (
      "image" not in features
      or "label" not in features
      or not hasattr(features["label"], "num_classes")
    ):
      raise ValueError(
        f"{self.name} has features {sorted(features)}; an image "
        "classification dataset with 'image' and a class 'label' is needed."
      )
    self._prepare(builder)
    try:
      total_examples = builder.info.splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as e:
      raise ValueError(
        f"{self.name} has no split {split!r} ({e}); it has "
        f"{sorted(builder.info.splits)} (sub-splits like 'train[:90%]' "
        "work too)."
      ) from e
    image_shape = features["image"].shape
    varied = None in image_shape[:2]
    if image_size is None and varied:
      raise ValueError(
        f"{self.name} images vary in size {image_shape}; set "
        "--config.data.image_size (the side of the square crops)."
      )
    empty_shape = ((image_size, image_size) if image_size else image_shape[:2]) + image_shape[2:]
    what = f"{self.name} split {split!r}"
    shard_examples = -(-total_examples // process_count)
    fits_reason = memory_shortfall(what, shard_examples, empty_shape, available_memory_bytes())
    formats = _file_formats(builder)
    can_stream = "array_record" in formats
    if self.loader == "stream" or (
      self.loader == "auto" and can_stream and (varied or fits_reason)
    ):
      if not can_stream:
        raise ValueError(
          f"{what} is not prepared as ArrayRecord (it is "
          f"{builder.info.file_format.value}), which streaming reads. "
          + self._how_to_convert(builder)
          + " Or use config.data.loader='memory'."
        )
      if self.loader == "stream":
        why = "config.data.loader='stream'"
      elif varied:
        why = "its images vary in size, so crops are taken from the originals"
      else:
        why = "decoded it would not fit in memory"
      return ImageSplit(
        images=np.zeros((0, *empty_shape), np.uint8),
        labels=np.zeros((0,), np.int32),
        num_classes=features["label"].num_classes,
        total_examples=total_examples,
        process_index=process_index,
        process_count=process_count,
        origin=what,
        stream=self._stream_split(builder, split, total_examples),
        reading=f"streamed from ArrayRecord ({why})",
      )
    if fits_reason:
      raise ValueError(
        fits_reason
        + " Stream it instead: "
        + (
          "it is prepared as ArrayRecord, so use config.data.loader='auto' or 'stream'."
          if can_stream
          else self._how_to_convert(builder)
          + " Or write its images with `python -m pixel_vit.write_records` and use "
          "dataset=records:DIR (README: Streamed images)."
        )
      )
    shard = tfds_even_split(split, process_index, process_count)
    if "tfrecord" in formats:
      images, labels = self._read(tf, builder, shard, image_size, empty_shape, varied)
    else:
      images, labels = self._read_array_record(shard, image_size, empty_shape, varied)
    return ImageSplit(
      images=images,
      labels=labels,
      num_classes=features["label"].num_classes,
      total_examples=total_examples,
      process_index=process_index,
      process_count=process_count,
      origin=what,
      reading="in memory"
      + (
        f" (images of many sizes: each stored as its centre crop, shorter side to "
        f"{math.floor(image_size / self.crop_fraction)}; loader='stream' crops originals)"
        if varied
        else ""
      ),
    )

  def _stream_split(self, builder, split: str, total_examples: int) -> records.TfdsRecordSplit:
    """The ArrayRecord-prepared split, its shards checked to exist."""
    base = split.split("[")[0]
    shards = tuple(builder.info.splits[base].filenames)
    missing = [name for name in shards if not os.path.exists(os.path.join(builder.data_dir, name))]
    if missing:
      raise ValueError(
        f"{len(missing)} of {len(shards)} ArrayRecord shards of {self.name} split "
        f"{base!r} in {builder.data_dir} are missing, e.g. {missing[0]}: restore "
        f"them, or prepare the dataset again (`tfds build {self.dataset} "
        "--file_format=array_record`)."
      )
    return records.TfdsRecordSplit(
      dataset=self.dataset,
      data_dir=self.data_dir,
      split=split,
      directory=str(builder.data_dir),
      num_examples=total_examples,
      num_classes=builder.info.features["label"].num_classes,
      shards=shards,
    )

  def _how_to_convert(self, builder) -> str:
    return (
      f"Convert it once: `tfds convert_format --dataset_version_dir={builder.data_dir} "
      "--out_file_format=array_record` (it needs `pip install apache-beam`), or prepare "
      f"it again with `tfds build {self.dataset} --file_format=array_record`."
    )

  def _read(self, tf, builder, shard, image_size, empty_shape, varied):
    """Reads this process's shard (TFRecord) into numpy with tf.data, in the
    dataset's fixed order."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=shard, shuffle_files=False)

    def to_pair(example):
      image = example["image"]
      if image_size is not None and varied:
        image = tf.numpy_function(
          lambda pixels: _centre_crop(pixels, image_size, self.crop_fraction), [image], tf.uint8
        )
        image.set_shape(empty_shape)
      elif image_size is not None:
        image = _tf_resize(tf, image, image_size)
      return image, tf.cast(example["label"], tf.int32)

    ds = ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = list(tfds.as_numpy(ds.batch(1024).prefetch(tf.data.AUTOTUNE)))
    if not batches:  # fewer examples than processes
      return np.zeros((0, *empty_shape), np.uint8), np.zeros((0,), np.int32)
    return (
      np.concatenate([images for images, _ in batches]),
      np.concatenate([labels for _, labels in batches]),
    )

  def _read_array_record(self, shard, image_size, empty_shape, varied):
    """Reads this process's shard of an ArrayRecord-only dataset (which
    tf.data cannot read) into numpy through `tfds.data_source`."""
    import tensorflow_datasets as tfds

    examples = tfds.data_source(self.dataset, split=shard, data_dir=self.data_dir, download=False)
    labels = np.zeros((len(examples),), np.int32)
    pixels = []
    for i in range(len(examples)):  # each example read (and decoded) once
      example = examples[i]
      labels[i] = example["label"]
      pixels.append(
        _centre_crop(example["image"], image_size, self.crop_fraction)
        if varied
        else example["image"]
      )
    if not pixels:  # fewer examples than processes
      return np.zeros((0, *empty_shape), np.uint8), labels
    images = np.stack(pixels)
    return (images if varied else _resize(images, image_size)), labels


def _file_formats(builder) -> set[str]:
  """The file formats a prepared TFDS dataset is on disk in ('tfrecord', 'array_record')."""
  info = builder.info
  return {fmt.value for fmt in (info.file_format, *info.alternative_file_formats)}


def _centre_crop(pixels: np.ndarray, image_size: int, crop_fraction: float) -> np.ndarray:
  """crops.eval_crop of decoded HWC uint8 pixels: what the in-memory path
  stores for images of many sizes, the same pixels the stream evaluates."""
  image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
  return crops.eval_crop(image, image_size, crop_fraction=crop_fraction)


def tfds_even_split(split: str, process_index: int, process_count: int) -> str:
  """This process's part of a TFDS split: 'train[0%:50%]'-style, as
  `tfds.even_splits` cuts it."""
  import tensorflow_datasets as tfds

  return tfds.even_splits(split, n=process_count)[process_index]


@dataclasses.dataclass(frozen=True)
class RecordsSource(Source):
  """'records:DIR': ArrayRecord shards of original images written by
  `python -m pixel_vit.write_records`, streamed with grain (data/stream.py).
  `load` reads the split's description only; crops to `image_size` happen
  per example when streamed."""

  directory: str

  @property
  def name(self) -> str:
    return f"records:{self.directory}"

  def load(
    self,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
  ) -> ImageSplit:
    _check_process(process_index, process_count)
    if image_size is None:
      raise ValueError(
        f"{self.name} holds images of many sizes: set config.data.image_size "
        "(the side of the training crops)."
      )
    _check_image_size(image_size)
    info = records.open_split(self.directory, split)
    return ImageSplit(
      images=np.zeros((0, image_size, image_size, 3), np.uint8),
      labels=np.zeros((0,), np.int32),
      num_classes=info.num_classes,
      total_examples=info.num_examples,
      process_index=process_index,
      process_count=process_count,
      origin=f"records {self.directory} split {split!r}",
      class_counts=np.asarray(info.class_counts, np.int64),
      stream=info,
      reading="streamed from ArrayRecord",
    )


def loader_for(data) -> str:
  """What `config.data.loader` selects for its source: 'memory', 'stream',
  or (TFDS with 'auto') 'auto', which TfdsSource.load decides."""
  kind, _ = source_form(data.source)
  loader = data.get("loader", "auto")
  if loader not in LOADERS:
    raise ValueError(f"config.data.loader={loader!r} is not one of {list(LOADERS)}.")
  if kind == "tfds":
    return loader
  streams = kind == "records"
  if loader == "auto":
    return "stream" if streams else "memory"
  if loader == "stream" and not streams:
    raise ValueError(
      f"config.data.loader='stream' reads ArrayRecord: records written by "
      f"`python -m pixel_vit.write_records` (config.data.source='records:DIR') "
      f"or a TFDS dataset prepared as ArrayRecord; {data.source!r} is read into "
      "memory: use loader='memory' or 'auto'."
    )
  if loader == "memory" and streams:
    raise ValueError(
      f"config.data.loader='memory' cannot hold {data.source!r}: records are "
      "streamed; use loader='stream' or 'auto'."
    )
  return loader


# The in-memory path holds a decoded shard and, while it is concatenated, a
# second copy; it may take at most this share of the host's available memory.
MEMORY_FRACTION = 0.5


def available_memory_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (None where there is none)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def memory_shortfall(what: str, examples: int, shape: tuple, available: int | None) -> str | None:
  """Why a split's decoded uint8 shard (twice: it is concatenated) would not
  fit MEMORY_FRACTION of `available` bytes, or None when it fits (or
  cannot be known)."""
  if available is None or None in shape:
    return None
  needed = 2 * examples * int(np.prod(shape))
  if needed <= MEMORY_FRACTION * available:
    return None
  return (
    f"{what} decoded into memory needs about {needed / 2**30:.1f} GiB on this host "
    f"({examples:,} images of {'x'.join(map(str, shape))} uint8, twice while they are "
    f"joined), more than {MEMORY_FRACTION:.0%} of its {available / 2**30:.1f} GiB "
    "available."
  )


def validate_config(data, *, files: bool = True) -> None:
  """`config.data` (the locality ablation's keys: `locality.validate_permute_config`);
  `files=False` checks the source's form only, not that its files exist."""
  if files:
    named(
      "data.source",
      lambda: parse_source(
        data.source, data_dir=data.get("data_dir"), download=data.get("download", True)
      ),
    )
  else:
    named("data.source", source_form, data.source)
  if data.get("image_size") is not None:
    check_positive("data.image_size", data.image_size)
  loader_for(data)
  if data.get("workers", 0) < 0:
    raise ValueError(
      f"config.data.workers={data.workers} must be 0 (decode in the training process) or more."
    )
  records.check_on_bad_example(data.get("on_bad_example", "fail"))
  if not 0 < data.get("crop_fraction", 0.875) <= 1:
    raise ValueError(
      f"config.data.crop_fraction={data.crop_fraction} must be in (0, 1] "
      "(0.875: the standard centre crop)."
    )


# ---------------------------------------------------------------- without data


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
  """What a dataset's splits look like, known without reading them."""

  image_shape: tuple[int, int, int] | None  # native H, W, C (None: sizes vary)
  channels: int
  num_classes: int
  examples: dict  # split name -> examples
  latent: bool = False  # float32 VAE latents, not uint8 pixels


# The datasets the configs name, by source string (as in config.data.source).
KNOWN_DATASETS = {
  "digits": DatasetFacts((8, 8, 1), 1, 10, {"train": 1437, "test": 360}),
  "tfds:cifar100": DatasetFacts((32, 32, 3), 3, 100, {"train": 50_000, "test": 10_000}),
  "tfds:cifar10": DatasetFacts((32, 32, 3), 3, 10, {"train": 50_000, "test": 10_000}),
  "tfds:mnist": DatasetFacts((28, 28, 1), 1, 10, {"train": 60_000, "test": 10_000}),
  "tfds:fashion_mnist": DatasetFacts((28, 28, 1), 1, 10, {"train": 60_000, "test": 10_000}),
  "tfds:imagenet2012": DatasetFacts(None, 3, 1000, {"train": 1_281_167, "validation": 50_000}),
  # python -m pixel_vit.encode_latents of ImageNet at 256x256 (configs' imagenet256_latents).
  "npz:data/imagenet256_latents_{split}.npz": DatasetFacts(
    (32, 32, 4), 4, 1000, {"train": 1_281_167, "validation": 50_000}, latent=True
  ),
}


def stand_in_split(
  facts: DatasetFacts, split: str, *, image_size: int | None = None, process_count: int = 1
) -> ImageSplit:
  """A split with the dataset's shape, class count and size but no examples:
  what a model, a schedule and the programs are built from when compiling
  ahead of time (pixel_vit.compile), which reads no data."""
  if image_size is None and facts.image_shape is None:
    raise ValueError("the dataset's images come in many sizes: set config.data.image_size.")
  height = image_size or facts.image_shape[0]
  width = image_size or facts.image_shape[1]
  if facts.latent and image_size and image_size != facts.image_shape[0]:
    raise ValueError(
      f"latents of size {facts.image_shape[0]} cannot be resized to "
      f"{image_size}: leave config.data.image_size unset."
    )
  if split not in facts.examples:
    raise ValueError(
      f"split {split!r} is not one of this dataset's splits "
      f"{sorted(facts.examples)}; set config.data.train_split / eval_split."
    )
  dtype = np.float32 if facts.latent else np.uint8
  return ImageSplit(
    images=np.zeros((0, height, width, facts.channels), dtype),
    labels=np.zeros((0,), np.int32),
    num_classes=facts.num_classes,
    total_examples=facts.examples[split],
    process_index=0,
    process_count=process_count,
    origin=f"a stand-in for split {split!r}",
  )
