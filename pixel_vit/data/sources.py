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
import os
import socket
import threading
import urllib.parse
import urllib.request

import numpy as np

SOURCE_FORMS = ("digits", "npz:PATH", "tfds:NAME")

# Fraction of a single-file source (digits, npz without `{split}`) that goes
# to 'train'; the rest is 'test'.
_TRAIN_FRACTION = (4, 5)

_RESIZE_CHUNK = 4096


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class ImageSplit:
  """One process's shard of one split, held in host memory at training resolution.

  `images` are uint8 pixels, or float32 VAE latents for a latent dataset
  (`npz:` files with a `latents` array, see data/encode_latents.py).
  """
  images: np.ndarray  # uint8 (pixels) or float32 (latents), NHWC
  labels: np.ndarray  # int32, [n]
  num_classes: int
  total_examples: int  # size of the whole split, over all processes
  process_index: int
  process_count: int

  @property
  def is_latent(self) -> bool:
    return self.images.dtype == np.float32

  def __post_init__(self):
    if self.images.dtype not in (np.uint8, np.float32) or self.images.ndim != 4:
      raise ValueError(f"ImageSplit.images must be uint8 or float32 (latents) NHWC, got "
                       f"{self.images.dtype} "
                       f"with shape {self.images.shape}.")
    if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
      raise ValueError(f"ImageSplit.labels must be int32 of shape {self.images.shape[:1]}, "
                       f"got {self.labels.dtype} with shape {self.labels.shape}.")
    _check_process(self.process_index, self.process_count)
    largest_shard = -(-self.total_examples // self.process_count)
    if len(self.images) > largest_shard:
      raise ValueError(f"ImageSplit holds {len(self.images)} examples, more than a "
                       f"1/{self.process_count} shard of {self.total_examples}.")


class Source(abc.ABC):
  """A named image classification dataset that can load per-process shards."""

  @property
  @abc.abstractmethod
  def name(self) -> str:
    """The source string this was parsed from, e.g. 'tfds:cifar100'."""

  @abc.abstractmethod
  def load(self, split: str, *, process_index: int = 0, process_count: int = 1,
           image_size: int | None = None) -> ImageSplit:
    """Reads this process's shard of `split`, resized to `image_size` if given."""


def parse_source(name: str, *, data_dir: str | None = None, download: bool = True) -> Source:
  """'digits' | 'npz:PATH' | 'tfds:NAME' -> Source. Reads no data.

  `data_dir` and `download` only apply to TFDS sources.
  """
  if not isinstance(name, str):
    raise ValueError(f"data source {name!r} must be a string, one of {list(SOURCE_FORMS)}.")
  kind, sep, arg = name.partition(":")
  if name == "digits":
    return DigitsSource()
  if sep and kind == "npz" and arg:
    return NpzSource(arg)
  if sep and kind == "tfds" and arg and not any(c.isspace() for c in arg):
    if data_dir and not download and "://" not in data_dir and not os.path.isdir(data_dir):
      raise ValueError(f"data_dir {data_dir!r} for {name!r} does not exist and download "
                       "is off; point --config.data.data_dir at a prepared TFDS directory.")
    return TfdsSource(arg, data_dir=data_dir, download=download)
  raise ValueError(f"data source {name!r} is not recognised; use one of {list(SOURCE_FORMS)}, "
                   "e.g. 'digits', 'npz:../shared/data/mnist_rasbt_{split}.npz' or "
                   "'tfds:cifar100'.")


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
  resized = tf.image.resize(images, (image_size, image_size), method="bilinear",
                            antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _resize(images: np.ndarray, image_size: int | None) -> np.ndarray:
  if image_size is None or images.shape[1:3] == (image_size, image_size):
    return images
  if images.dtype != np.uint8:
    raise ValueError(f"latents of size {images.shape[1]}x{images.shape[2]} cannot be resized "
                     f"to {image_size}: encode the images at the size you want (python -m "
                     "pixel_vit.data.encode_latents --image_size=8*SIZE) and leave "
                     "config.data.image_size unset.")
  tf = _import_tf()
  chunks = [_tf_resize(tf, images[i:i + _RESIZE_CHUNK], image_size).numpy()
            for i in range(0, len(images), _RESIZE_CHUNK)]
  if not chunks:
    return np.zeros((0, image_size, image_size, images.shape[3]), np.uint8)
  return np.concatenate(chunks)


class _InMemorySource(Source):
  """A source whose whole split is read into memory, then sharded."""

  @abc.abstractmethod
  def _read_split(self, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (uint8 NHWC images, int labels, num_classes) of the whole split."""

  def load(self, split: str, *, process_index: int = 0, process_count: int = 1,
           image_size: int | None = None) -> ImageSplit:
    _check_process(process_index, process_count)
    _check_image_size(image_size)
    images, labels, num_classes = self._read_split(split)
    shard = np.array_split(np.arange(len(images)), process_count)[process_index]
    return ImageSplit(
        images=_resize(np.ascontiguousarray(images[shard]), image_size),
        labels=labels[shard].astype(np.int32),
        num_classes=num_classes,
        total_examples=len(images),
        process_index=process_index,
        process_count=process_count)


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
    return images[index], digits.target[index], 10


@dataclasses.dataclass(frozen=True)
class NpzSource(_InMemorySource):
  """An .npz with `images` (uint8 NHWC or NHW), `labels` (int) and optional `class_names`.

  A latent dataset (written by `python -m pixel_vit.data.encode_latents`) has
  float32 `latents` [N, h, w, c] (already scaled) instead of `images`.

  A `{split}` in the path is replaced by the split name (one file per split);
  otherwise the one file is split 80/20 into 'train' and 'test'.
  """
  path: str

  def __post_init__(self):
    candidates = ([self.path.replace("{split}", s) for s in ("train", "test")]
                  if "{split}" in self.path else [self.path])
    if not any(os.path.isfile(p) for p in candidates):
      raise ValueError(f"npz source: no file at {' or '.join(candidates)}; pass "
                       "npz:PATH with an existing .npz (PATH may contain '{split}'). A "
                       "latent dataset is written by python -m pixel_vit.data.encode_latents.")

  @property
  def name(self) -> str:
    return f"npz:{self.path}"

  def _read_split(self, split):
    if "{split}" in self.path:
      return _read_npz(self.path.replace("{split}", split))
    _check_train_test(self.name, split)
    images, labels, num_classes = _read_npz(self.path)
    index = _train_test_indices(len(images), split)
    return images[index], labels[index], num_classes


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray, int]:
  """Loads and validates one .npz file."""
  fix = ("save it with np.savez(path, images=<uint8 [N,H,W,C]>, labels=<int [N]>"
         "[, class_names=<str [K]>])")
  if not os.path.isfile(path):
    raise ValueError(f"npz file {path} does not exist; {fix}.")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {key: data[key] for key in data.files}
  except (OSError, ValueError) as e:  # not a zip / object arrays need pickle
    raise ValueError(f"npz file {path} cannot be read without pickle ({e}); {fix}.") from e
  latent = "latents" in arrays and "images" not in arrays
  if latent:
    images = arrays["latents"]
    if images.dtype not in (np.float32, np.float16) or images.ndim != 4:
      raise ValueError(f"npz file {path}: latents have dtype {images.dtype} and shape "
                       f"{images.shape}, expected float32 [N, h, w, c]; write them with "
                       "python -m pixel_vit.data.encode_latents.")
    arrays["images"] = images.astype(np.float32)
  for key in ("images", "labels"):
    if key not in arrays:
      raise ValueError(f"npz file {path} has no {key!r} array (it has {sorted(arrays)}); "
                       f"{fix}.")
  images, labels = arrays["images"], arrays["labels"]
  if not latent and images.dtype != np.uint8:
    raise ValueError(f"npz file {path}: images have dtype {images.dtype}, expected uint8 "
                     "0..255; convert e.g. with np.round(x * 255).astype(np.uint8).")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or 0 in images.shape[1:]:
    raise ValueError(f"npz file {path}: images have shape {images.shape}, expected rank 4 "
                     "[N,H,W,C] (or rank 3 [N,H,W]); " + fix + ".")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"npz file {path}: labels have dtype {labels.dtype} and shape "
                     f"{labels.shape}, expected integer class ids of rank 1 [N]; {fix}.")
  if len(labels) != len(images):
    raise ValueError(f"npz file {path}: {len(images)} images but {len(labels)} labels; "
                     "they must have the same length.")
  if len(images) == 0:
    raise ValueError(f"npz file {path} is empty (0 examples).")
  if labels.min() < 0:
    raise ValueError(f"npz file {path}: labels contain negative value {labels.min()}; "
                     "class ids must be in [0, num_classes).")
  if "class_names" in arrays:
    num_classes = len(arrays["class_names"])
    if labels.max() >= num_classes:
      raise ValueError(f"npz file {path}: label {labels.max()} is >= the {num_classes} "
                       "class_names; add the missing names or fix the labels.")
  else:
    num_classes = int(labels.max()) + 1
  if num_classes > np.iinfo(np.int32).max:
    raise ValueError(f"npz file {path}: {num_classes} classes do not fit int32 labels.")
  return images, labels, num_classes


def _network_reachable(host: str = "storage.googleapis.com", port: int = 443,
                       timeout: float = 3.0) -> bool:
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

  With `image_size`, every image is resized (whole image, antialiased) to a
  square; datasets whose images vary in size (e.g. imagenet2012) need it.
  """
  dataset: str
  data_dir: str | None = None
  download: bool = True

  @property
  def name(self) -> str:
    return f"tfds:{self.dataset}"

  def _how_to_provide(self) -> str:
    return (f"To provide it: pass --config.data.data_dir=DIR pointing at a prepared TFDS "
            f"directory; or run `tfds build {self.dataset} --data_dir=DIR` on a machine "
            "with network and copy DIR here; or use an offline source: 'npz:PATH' or "
            "'digits'.")

  def _builder(self):
    import tensorflow_datasets as tfds
    try:
      return tfds.builder(self.dataset, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      # TFDS's own message lists every dataset it knows; keep only the first line.
      first_line = str(e).splitlines()[0]
      raise ValueError(f"{self.name}: {first_line} Check the spelling against "
                       "https://www.tensorflow.org/datasets/catalog, or use 'npz:PATH' / "
                       "'digits'.") from e

  def _prepare(self, builder) -> None:
    """Makes sure the data is on disk, failing fast when it cannot be."""
    if builder.is_prepared():
      return
    where = f"at {builder.data_dir}"
    if not self.download:
      raise ValueError(f"{self.name} is not prepared {where} and download is off. "
                       + self._how_to_provide())
    if not _network_reachable():
      raise ValueError(f"{self.name} is not prepared {where} and cannot be downloaded: "
                       "storage.googleapis.com is unreachable (no network). "
                       + self._how_to_provide())
    try:
      builder.download_and_prepare()
    except Exception as e:
      # Manual-download datasets (imagenet2012) and network errors land here.
      raise ValueError(f"{self.name}: download and preparation {where} failed: {e}\n"
                       + self._how_to_provide()) from e

  def load(self, split: str, *, process_index: int = 0, process_count: int = 1,
           image_size: int | None = None) -> ImageSplit:
    _check_process(process_index, process_count)
    _check_image_size(image_size)
    tf = _import_tf()  # before TFDS runs any TF op, so TF never claims a GPU
    builder = self._builder()
    features = builder.info.features
    if ("image" not in features or "label" not in features
        or not hasattr(features["label"], "num_classes")):
      raise ValueError(f"{self.name} has features {sorted(features)}; an image "
                       "classification dataset with 'image' and a class 'label' is needed.")
    self._prepare(builder)
    try:
      total_examples = builder.info.splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as e:
      raise ValueError(f"{self.name} has no split {split!r} ({e}); it has "
                       f"{sorted(builder.info.splits)} (sub-splits like 'train[:90%]' "
                       "work too).") from e
    image_shape = features["image"].shape
    if image_size is None and None in image_shape[:2]:
      raise ValueError(f"{self.name} images vary in size {image_shape}; set "
                       "--config.data.image_size to resize them to a square.")
    empty_shape = ((image_size, image_size) if image_size else image_shape[:2]) + image_shape[2:]
    images, labels = self._read(tf, builder, split, process_index, process_count,
                                image_size, empty_shape)
    return ImageSplit(
        images=images,
        labels=labels,
        num_classes=features["label"].num_classes,
        total_examples=total_examples,
        process_index=process_index,
        process_count=process_count)

  def _read(self, tf, builder, split, process_index, process_count, image_size, empty_shape):
    """Reads only this process's even split into numpy, in the dataset's fixed order."""
    import tensorflow_datasets as tfds
    shard = tfds.even_splits(split, n=process_count)[process_index]
    ds = builder.as_dataset(split=shard, shuffle_files=False)

    def to_pair(example):
      image = example["image"]
      if image_size is not None:
        image = _tf_resize(tf, image, image_size)
      return image, tf.cast(example["label"], tf.int32)

    ds = ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = list(tfds.as_numpy(ds.batch(1024).prefetch(tf.data.AUTOTUNE)))
    if not batches:  # fewer examples than processes
      return np.zeros((0, *empty_shape), np.uint8), np.zeros((0,), np.int32)
    return (np.concatenate([images for images, _ in batches]),
            np.concatenate([labels for _, labels in batches]))
