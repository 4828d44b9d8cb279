"""Streaming batches from ArrayRecord shards with grain: host memory bounded
whatever the dataset's size, decoding and crops in grain's worker processes.

The training order is a pure function of (seed, epoch), over the whole split,
and independent of the number of processes: epoch e visits the permutation
`np.random.default_rng([seed, e])` of all records, cut into global batches
(what does not fill one is dropped); process p of P takes the p-th
contiguous part of each global batch. A crop's randomness is keyed by
(seed, step, position in the global batch). So a run resumed at step s,
on any number of processes with the same global batch, sees exactly the
examples and crops an uninterrupted run sees from step s on; the position
is the step, and `data_position` is what a checkpoint records to check it.

Evaluation reads every record once: process p takes the p-th contiguous
part of the split, zero-padded to the same number of batches as the
largest part, with 'mask' 1.0 on real examples.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Iterator

import grain
import numpy as np
from absl import flags, logging
from PIL import Image

from pixel_vit.data import crops, records


@dataclasses.dataclass(frozen=True)
class HostCrops:
  """What the host does to each example (data/crops.py)."""

  image_size: int
  channels: int = 3
  random_crop: bool = True  # False: training takes the evaluation crop (then flips)
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  crop_fraction: float = 0.875  # evaluation
  # An image that does not decode: 'fail' stops; 'skip' takes the next
  # record in training, masks it in evaluation; both count it ('skipped').
  on_bad_example: str = "fail"

  def __post_init__(self):
    records.check_on_bad_example(self.on_bad_example)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the global batch is shared among processes."""

  global_batch: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index={self.process_index} is not in [0, {self.process_count}).")
    if self.global_batch % self.process_count:
      raise ValueError(
        f"the global batch {self.global_batch} does not split evenly over "
        f"{self.process_count} processes."
      )

  @property
  def local_batch(self) -> int:
    return self.global_batch // self.process_count


def steps_per_epoch(split: records.StreamSplit, global_batch: int) -> int:
  steps = split.num_examples // global_batch
  if steps == 0:
    raise ValueError(
      f"the global batch {global_batch} is larger than {split.split!r} in "
      f"{split.directory} ({split.num_examples} examples); lower the batch size."
    )
  return steps


def data_position(split: records.StreamSplit, *, seed: int, global_batch: int, step: int) -> dict:
  """What a checkpoint records of the input at `step`: enough to resume it
  and to refuse a resume over other data or another order."""
  spe = steps_per_epoch(split, global_batch)
  return {
    "loader": "stream",
    "split": split.split,
    "num_examples": split.num_examples,
    "shards": len(split.shards),
    "seed": seed,
    "global_batch": global_batch,
    "step": step,
    "epoch": step // spe,
    "step_in_epoch": step % spe,
  }


# A skipped training image is replaced by the next record that decodes; this
# many bad records in a row mean the data, not an image, is broken.
MAX_BAD_IN_A_ROW = 16


class _Records:
  """Random access to a split's (label, image bytes), opened lazily in each worker."""

  def __init__(self, split: records.StreamSplit):
    self.split = split
    self._reader = None

  def __getitem__(self, index: int) -> tuple[int, bytes]:
    if self._reader is None:
      self._reader = self.split.open()
    return self._reader[index]

  def decoded(self, index: int, channels: int) -> tuple[int, Image.Image]:
    label, data = self[index]
    return label, crops.decode(
      data, channels, where=f"record {index} of {self.split.directory} split {self.split.split!r}"
    )

  def __getstate__(self):  # a worker opens its own readers
    return {"split": self.split, "_reader": None}


def _skipping(error: crops.BadImageError, host: HostCrops) -> None:
  """Raises `error` with the fix unless config.data.on_bad_example='skip'."""
  if host.on_bad_example != "skip":
    raise crops.BadImageError(
      f"{error} Set config.data.on_bad_example='skip' to skip such "
      "images (each is counted and logged), or rewrite the "
      "dataset without it."
    ) from error
  logging.warning("skipping %s", error)


class _TrainExample:
  """Local position -> {'images', 'labels'}: the record the global order puts
  there, decoded and randomly cropped."""

  def __init__(self, split: records.StreamSplit, host: HostCrops, layout: Layout, seed: int):
    self.records, self.host, self.layout, self.seed = _Records(split), host, layout, seed
    self.spe = steps_per_epoch(split, layout.global_batch)
    self._orders: dict[int, np.ndarray] = {}  # epoch -> permutation (the last two)
    self._lock = threading.Lock()  # grain reads with several threads

  def order(self, epoch: int) -> np.ndarray:
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        order = np.random.default_rng([self.seed, epoch]).permutation(
          self.records.split.num_examples
        )
        self._orders[epoch] = order
        for old in sorted(e for e in self._orders if e != epoch)[:-1]:
          del self._orders[old]  # a thread late for an old epoch recomputes it
      return order

  def record_index(self, step: int, slot: int) -> int:
    """The record at global position `slot` of step `step`'s global batch."""
    order = self.order(step // self.spe)
    return int(order[(step % self.spe) * self.layout.global_batch + slot])

  def __getstate__(self):  # a worker process makes its own lock and orders
    return {**self.__dict__, "_orders": {}, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __call__(self, position: int) -> dict:
    step, j = divmod(int(position), self.layout.local_batch)
    slot = self.layout.process_index * self.layout.local_batch + j
    index = self.record_index(step, slot)
    label, image, skipped = self.decoded_or_next(index)
    rng = np.random.default_rng([self.seed, step, slot])
    if self.host.random_crop:
      pixels = crops.train_crop(
        image,
        rng,
        self.host.image_size,
        scale=self.host.scale,
        ratio=self.host.ratio,
        flip=self.host.flip,
      )
    else:
      pixels = crops.maybe_flip(
        crops.eval_crop(image, self.host.image_size, crop_fraction=self.host.crop_fraction),
        rng,
        self.host.flip,
      )
    return {"images": pixels, "labels": np.int32(label), "skipped": np.int32(skipped)}

  def decoded_or_next(self, index: int) -> tuple[int, Image.Image, int]:
    """(label, image, records skipped): record `index`, or with
    on_bad_example='skip' the first one after it that decodes (the same on
    every run: the substitute depends on the index only)."""
    n = self.records.split.num_examples
    for skipped in range(MAX_BAD_IN_A_ROW):
      try:
        label, image = self.records.decoded((index + skipped) % n, self.host.channels)
        return label, image, skipped
      except crops.BadImageError as error:
        _skipping(error, self.host)
    raise crops.BadImageError(
      f"records {index} to {index + MAX_BAD_IN_A_ROW - 1} of {self.records.split.directory} "
      f"split {self.records.split.split!r} all fail to decode: the dataset is damaged, not "
      "one image; rewrite it."
    )


class _EvalExample:
  """Position -> the record there, centre-cropped; padding and (with
  on_bad_example='skip') an image that does not decode have mask 0, so
  every record is counted once or reported skipped."""

  def __init__(self, split: records.StreamSplit, host: HostCrops, first: int, count: int):
    self.records, self.host, self.first, self.count = _Records(split), host, first, count

  def __call__(self, position: int) -> dict:
    position = int(position)
    shape = (self.host.image_size, self.host.image_size, self.host.channels)
    empty = {
      "images": np.zeros(shape, np.uint8),
      "labels": np.int32(0),
      "mask": np.float32(0),
      "skipped": np.int32(0),
    }
    if position >= self.count:  # padding: same batch count on every process
      return empty
    try:
      label, image = self.records.decoded(self.first + position, self.host.channels)
    except crops.BadImageError as error:
      _skipping(error, self.host)
      return {**empty, "skipped": np.int32(1)}
    return {
      "images": crops.eval_crop(image, self.host.image_size, crop_fraction=self.host.crop_fraction),
      "labels": np.int32(label),
      "mask": np.float32(1),
      "skipped": np.int32(0),
    }


def _iterate(dataset: grain.MapDataset, batch: int, workers: int) -> Iterator[dict]:
  if workers > 0 and not flags.FLAGS.is_parsed():
    # grain's workers read its absl flags; outside an absl app (a notebook,
    # a test) they would refuse to start.
    flags.FLAGS.mark_as_parsed()
  batched = dataset.batch(batch).to_iter_dataset(
    grain.ReadOptions(num_threads=max(1, min(16, batch)), prefetch_buffer_size=2 * batch)
  )
  if workers > 0:
    batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(batched)


def train_batches(
  split: records.StreamSplit,
  host: HostCrops,
  layout: Layout,
  *,
  seed: int,
  start_step: int,
  total_steps: int,
  workers: int = 0,
) -> Iterator[dict]:
  """{'images': uint8 [local_batch, S, S, C], 'labels': int32, 'skipped':
  int32 (bad records passed over for each example)} for steps start_step +
  1 ... total_steps (the batch of step s is the s-th from 0)."""
  if not 0 <= start_step <= total_steps:
    raise ValueError(f"start_step={start_step} must be in [0, total_steps={total_steps}].")
  local = layout.local_batch
  positions = grain.MapDataset.range(start_step * local, total_steps * local)
  return _iterate(positions.map(_TrainExample(split, host, layout, seed)), local, workers)


def num_eval_batches(split: records.StreamSplit, layout: Layout) -> int:
  largest = -(-split.num_examples // layout.process_count)
  return -(-largest // layout.local_batch)


def eval_batches(
  split: records.StreamSplit,
  host: HostCrops,
  layout: Layout,
  *,
  workers: int = 0,
) -> Iterator[dict]:
  """{'images', 'labels', 'mask', 'skipped'}: every record of this process's
  part once."""
  bounds = np.linspace(0, split.num_examples, layout.process_count + 1).astype(int)
  first, count = (
    bounds[layout.process_index],
    (bounds[layout.process_index + 1] - bounds[layout.process_index]),
  )
  padded = num_eval_batches(split, layout) * layout.local_batch
  example = _EvalExample(split, host, int(first), int(count))
  return _iterate(grain.MapDataset.range(padded).map(example), layout.local_batch, workers)
