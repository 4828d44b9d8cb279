"""Deterministic, resumable host-side batching of an `ImageSplit`.

Training order is a pure function of (seed, epoch, process index), so a run
resumed at step s yields exactly the batches an uninterrupted run yields from
step s on. Every process takes the same number of steps per epoch and of
evaluation batches, so collective device ops never wait on a process that
ran out of data. The trainer moves the numpy batches to devices, a few steps
ahead of the one running (`Prefetch`).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import numpy as np

from pixel_vit.data.sources import ImageSplit


def _check_batch_size(local_batch_size: int) -> None:
  if not (isinstance(local_batch_size, (int, np.integer)) and local_batch_size > 0):
    raise ValueError(f"local_batch_size={local_batch_size!r} must be a positive int.")


def _examples_per_process(split: ImageSplit) -> int:
  # The smallest shard's size: with array_split sharding no process has fewer.
  return split.total_examples // split.process_count


def steps_per_epoch(split: ImageSplit, local_batch_size: int) -> int:
  """Full training batches per epoch; identical on every process."""
  _check_batch_size(local_batch_size)
  steps = _examples_per_process(split) // local_batch_size
  if steps == 0:
    raise ValueError(
        f"local batch size {local_batch_size} is larger than the data per process: "
        f"{split.total_examples} examples over {split.process_count} processes leave "
        f"{_examples_per_process(split)} each; lower the batch size or use more data.")
  return steps


def train_batches(split: ImageSplit, *, local_batch_size: int, seed: int,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Infinite {'images': uint8 [b,H,W,C], 'labels': int32 [b]} for steps start_step, ...

  Epoch e visits a permutation from `np.random.default_rng([seed, e,
  process_index])` of this process's shard, dropping what does not fill a
  whole batch (and the extra example some shards hold).
  """
  spe = steps_per_epoch(split, local_batch_size)
  if not (isinstance(seed, (int, np.integer)) and seed >= 0):
    raise ValueError(f"seed={seed!r} must be a non-negative int.")
  if not (isinstance(start_step, (int, np.integer)) and start_step >= 0):
    raise ValueError(f"start_step={start_step!r} must be a non-negative int.")
  return _train_batches(split, local_batch_size, spe, int(seed), int(start_step))


def _train_batches(split, batch, spe, seed, step):
  # A generator of its own so that argument errors raise at the call, not at
  # the first next().
  epoch, order = None, None
  while True:
    if step // spe != epoch:
      epoch = step // spe
      rng = np.random.default_rng([seed, epoch, split.process_index])
      order = rng.permutation(len(split.labels))[:spe * batch]
    index = order[(step % spe) * batch:(step % spe + 1) * batch]
    yield {"images": split.images[index], "labels": split.labels[index]}
    step += 1


def num_eval_batches(split: ImageSplit, local_batch_size: int) -> int:
  """Evaluation batches per process: enough for the largest shard, same on every process."""
  _check_batch_size(local_batch_size)
  largest_shard = -(-split.total_examples // split.process_count)
  return -(-largest_shard // local_batch_size)


def eval_batches(split: ImageSplit, *,
                 local_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example of this shard once, in order, zero-padded; 'mask' is 1.0 on real ones."""
  count = num_eval_batches(split, local_batch_size)
  return _eval_batches(split, local_batch_size, count)


def _eval_batches(split, batch, count):
  # ImageSplit guarantees no shard exceeds the largest one, so `count` covers it.
  for i in range(count):
    images = split.images[i * batch:(i + 1) * batch]
    labels = split.labels[i * batch:(i + 1) * batch]
    pad = batch - len(labels)
    mask = np.ones((batch,), np.float32)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *split.images.shape[1:]), split.images.dtype)])
      labels = np.concatenate([labels, np.zeros((pad,), np.int32)])
      mask[batch - pad:] = 0.0
    yield {"images": images, "labels": labels, "mask": mask}


_END = object()


class Prefetch:
  """Runs `iterator` (e.g. host batches mapped to device arrays) `depth` items
  ahead on a background thread, so reading a batch and copying it to the
  devices overlap the step that runs instead of following it.

  Items come out in the iterator's order; an exception in the iterator is
  raised by the `next` that would have returned its item. Use as a context
  manager (or call `close`): the thread stops and the items made ahead are
  dropped, which is safe because a resumed run rebuilds its batches from its
  step.
  """

  def __init__(self, iterator: Iterator[Any], depth: int = 2):
    if depth < 1:
      raise ValueError(f"prefetch depth={depth} must be >= 1.")
    self._iterator = iterator
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, name="pixel_vit-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self) -> None:
    try:
      for item in self._iterator:
        if not self._put((item, None)):
          return
      self._put((_END, None))
    except BaseException as error:  # noqa: BLE001 - handed to the consumer
      self._put((None, error))

  def __iter__(self):
    return self

  def __next__(self):
    if self._stop.is_set():
      raise StopIteration
    item, error = self._queue.get()
    if error is not None:
      self.close()
      raise error
    if item is _END:
      self.close()
      raise StopIteration
    return item

  def close(self) -> None:
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=10)

  def __enter__(self) -> "Prefetch":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
