"""Checkpoints with orbax: periodic async saves, keep N, automatic resume.

A checkpoint holds the whole train state (parameters, optimizer state, EMA,
step, base RNG key). The data position needs nothing more: batches are a
function of (seed, step), see `pixel_vit.data.pipeline`. A small JSON item
records what model the state belongs to, so a mismatch is reported by name
instead of as a shape error deep inside orbax.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


def checkpoint_directory(workdir: str) -> str:
  """`<workdir>/checkpoints`: absolute when local, as given for a URL (gs://...).

  On several hosts every process writes its shards of each array into this
  one directory, so it must be storage they all see: a bucket, or a shared
  filesystem. (abspath would turn `gs://b/run` into a local `./gs:/b/run`.)
  """
  path = os.path.join(workdir, "checkpoints")
  return path if "://" in path else os.path.abspath(path)


class Checkpointer:
  """Saves to and resumes from `<workdir>/checkpoints`.

  Multi-process: every process constructs it and calls `save` / `restore`
  with the same arguments; orbax writes each process's shards and process 0
  the metadata, with barriers through `jax.distributed`.
  """

  def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = checkpoint_directory(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, metadata: dict, *, force: bool = False) -> bool:
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      metadata=ocp.args.JsonSave(metadata)),
        force=force)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def read_metadata(self, step: int) -> dict:
    return self.manager.restore(
        step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata

  def restore(self, abstract_state: Any, metadata: dict, step: int | None = None) -> Any:
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs).

    Raises ValueError naming the checkpoint when it was written by a
    different model, instead of failing inside orbax.
    """
    step = self.latest_step() if step is None else step
    saved = self.read_metadata(step)
    mismatched = {k: (saved.get(k), v) for k, v in metadata.items() if saved.get(k) != v}
    if mismatched:
      details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in mismatched.items())
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match the config ({details}). "
          "Use a fresh --workdir, or set the config back to what the checkpoint was trained with.")
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} could not be restored into the current "
          f"train state ({e}). Use a fresh --workdir or the config it was written with.") from e
    return restored.state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

