"""Deterministic, resumable host-side batching of an `ImageSplit`.

Training order is a pure function of (seed, epoch, process index), so a run
resumed at step s yields exactly the batches an uninterrupted run yields from
step s on. Every process takes the same number of steps per epoch and of
evaluation batches, so collective device ops never wait on a process that
ran out of data. The trainer moves the numpy batches to devices, a few steps
ahead of the one running (`ahead_on_device`).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator

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
      f"{_examples_per_process(split)} each; lower the batch size or use more data."
    )
  return steps


def train_batches(
  split: ImageSplit, *, local_batch_size: int, seed: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
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
      order = rng.permutation(len(split.labels))[: spe * batch]
    index = order[(step % spe) * batch : (step % spe + 1) * batch]
    yield {"images": split.images[index], "labels": split.labels[index]}
    step += 1


def num_eval_batches(split: ImageSplit, local_batch_size: int) -> int:
  """Evaluation batches per process: enough for the largest shard, same on every process."""
  _check_batch_size(local_batch_size)
  largest_shard = -(-split.total_examples // split.process_count)
  return -(-largest_shard // local_batch_size)


def eval_batches(split: ImageSplit, *, local_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example of this shard once, in order, zero-padded; 'mask' is 1.0 on real ones."""
  count = num_eval_batches(split, local_batch_size)
  return _eval_batches(split, local_batch_size, count)


def _eval_batches(split, batch, count):
  # ImageSplit guarantees no shard exceeds the largest one, so `count` covers it.
  for i in range(count):
    images = split.images[i * batch : (i + 1) * batch]
    labels = split.labels[i * batch : (i + 1) * batch]
    pad = batch - len(labels)
    mask = np.ones((batch,), np.float32)
    if pad:
      images = np.concatenate(
        [images, np.zeros((pad, *split.images.shape[1:]), split.images.dtype)]
      )
      labels = np.concatenate([labels, np.zeros((pad,), np.int32)])
      mask[batch - pad :] = 0.0
    yield {"images": images, "labels": labels, "mask": mask}


def ahead_on_device(
  batches: Iterator[Any], put: Callable[[Any], Any], *, depth: int = 2
) -> Iterator[Any]:
  """Yields `put(batch)` for each batch with the next `depth` batches already
  put. `jax.device_put` (and `make_array_from_process_local_data`) copy
  asynchronously, and so does the dispatch of a jitted step: the copies of
  the batches ahead overlap the step that runs, without a thread (as
  flax.jax_utils.prefetch_to_device does). The host work of the next batch
  is a numpy gather in memory; a stream's decoding runs in grain's threads
  or worker processes (data/stream.py).

  An error raised by `batches` comes out after the batches before it, as
  it would without the look-ahead."""
  if depth < 1:
    raise ValueError(f"prefetch depth={depth} must be >= 1.")
  return _ahead_on_device(batches, put, depth)


def _ahead_on_device(batches, put, depth):
  ahead: collections.deque = collections.deque()
  try:
    for batch in batches:
      ahead.append(put(batch))
      if len(ahead) > depth:
        yield ahead.popleft()
  except Exception:
    while ahead:
      yield ahead.popleft()
    raise
  while ahead:
    yield ahead.popleft()
