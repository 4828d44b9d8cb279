"""Checkpoints with orbax: periodic async saves, keep N, automatic resume.

A checkpoint holds the whole train state (parameters, optimizer state, EMA,
step, base RNG key). The data position needs nothing more: batches are a
function of (seed, step), see `pixel_vit.data.pipeline`. A small JSON item
records what model the state belongs to, so a mismatch is reported by name
instead of as a shape error deep inside orbax.

Reading a run (read-only, possibly while it trains on): `workdir_has_checkpoint`,
`locate` a finished step, `SavedRun` (its identity, parameter shapes, and a
partial restore of any subtree onto given shardings). `RunIdentity` is the
typed record of what model a checkpoint holds; its JSON is the `metadata`
item every checkpoint carries, in the layout earlier versions wrote.

Faults lose nothing already saved: a checkpoint that cannot be read is moved
aside to `<workdir>/checkpoints.damaged/` (never deleted) and the previous
one is restored instead; a save that fails stops the run with one message,
removes its temporary directory and leaves the earlier checkpoints as they
were.
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import os
import re
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

DAMAGED = "checkpoints.damaged"


class CheckpointSaveError(RuntimeError):
  """A save failed (disk full, permissions, ...); earlier checkpoints are intact."""


class DamagedCheckpointError(ValueError):
  """A checkpoint whose own files say it is incomplete (e.g. its identity)."""


class CheckpointMismatchError(ValueError):
  """The checkpoint was written by a different model or train state."""


class NoRestorableCheckpointError(RuntimeError):
  """Every checkpoint in the workdir failed to read."""


@dataclasses.dataclass(frozen=True)
class RunIdentity:
  """What makes a checkpoint this model: restoring it into a config that
  builds another identity is refused by field. dtype, attention backend,
  scan and remat may change between runs (e.g. resuming on another
  machine), so they are not part of it. Fields a task does not have are None
  and are not written."""

  task: str  # 'classification', 'mae' or 'diffusion'
  variant: str  # SIZE/PATCH
  posemb: str
  image_shape: tuple[int, ...]  # [H, W, C] of the train split
  tokenizer: str | None = None  # pixel encoders (classification, MAE)
  pool: str | None = None  # classification
  num_classes: int | None = None  # classification, diffusion
  decoder: tuple | None = None  # MAE: (width, depth, heads, mlp_dim, posemb)
  learn_sigma: bool | None = None  # diffusion
  latent: bool | None = None  # diffusion: trained on VAE latents

  REQUIRED = ("task", "variant", "posemb", "image_shape")

  @classmethod
  def of_run(cls, config, train_split) -> "RunIdentity":
    """The identity of the run `config` trains on `train_split`: one rule
    for every task."""
    model, task = config.model, config.task
    fields = dict(
      task=task,
      variant=model.variant,
      posemb=model.posemb,
      image_shape=tuple(int(x) for x in train_split.images.shape[1:]),
    )
    if task in ("classification", "mae"):
      fields["tokenizer"] = model.get("tokenizer", "linear")
    if task in ("classification", "diffusion"):
      fields["num_classes"] = int(train_split.num_classes)
    if task == "classification":
      fields["pool"] = model.pool
    if task == "mae":
      decoder = model.decoder
      fields["decoder"] = (
        decoder.width,
        decoder.depth,
        decoder.heads,
        decoder.mlp_dim,
        decoder.posemb,
      )
    if task == "diffusion":
      fields["learn_sigma"] = bool(model.learn_sigma)
      fields["latent"] = bool(train_split.is_latent)
    return cls(**fields)

  def to_json(self) -> dict:
    """The checkpoint's `metadata` item (tuples as lists, None left out)."""
    return {
      f.name: list(value) if isinstance(value, tuple) else value
      for f in dataclasses.fields(self)
      if (value := getattr(self, f.name)) is not None
    }

  @classmethod
  def from_json(cls, metadata: dict) -> "RunIdentity":
    """A checkpoint's `metadata` item; unknown keys are ignored, a missing
    required field is a ValueError naming the first one (for the reader to
    prefix with where it looked)."""
    absent = [name for name in cls.REQUIRED if name not in metadata]
    if absent:
      raise ValueError(f"its metadata has no {absent[0]!r} ({sorted(metadata)})")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(
      **{k: tuple(v) if isinstance(v, list) else v for k, v in metadata.items() if k in known}
    )

  def differences(self, saved: dict) -> dict[str, tuple]:
    """{field: (saved value, this value)} for every field of this identity
    that the saved JSON `metadata` gives otherwise."""
    return {k: (saved.get(k), v) for k, v in self.to_json().items() if saved.get(k) != v}


def checkpoint_directory(workdir: str) -> str:
  """`<workdir>/checkpoints`: absolute when local, as given for a URL (gs://...).

  On several hosts every process writes its shards of each array into this
  one directory, so it must be storage they all see: a bucket, or a shared
  filesystem. (abspath would turn `gs://b/run` into a local `./gs:/b/run`.)
  """
  path = os.path.join(workdir, "checkpoints")
  return path if "://" in path else os.path.abspath(path)


def first_line(error: BaseException, limit: int = 300) -> str:
  """`Type: first line`, cut at `limit` characters (tensorstore puts a whole
  JSON spec on its first line)."""
  text = str(error).strip().splitlines()
  line = f"{type(error).__name__}: {text[0] if text else ''}".strip()
  return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_io_error(error: BaseException) -> str:
  """One line for a failed write or read: the operating system's reason and
  the array when tensorstore names them (e.g. "No space left on device
  (errno 28) writing array 'params.w/0'"), else `first_line`."""
  text = str(error)
  reason = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='(\d+)'\]", text)
  if not reason:
    return first_line(error)
  array = re.search(r'Error (writing|reading) "([^"]+)"', text)
  return f"{reason.group(1)} (errno {reason.group(2)})" + (
    f" {array.group(1)} array {array.group(2)!r}" if array else ""
  )


def describe_damage(step_directory: str, error: BaseException) -> str:
  """One line: which file or array of a checkpoint step failed to read, and
  how (missing, truncated, not JSON), from the step's files and the error;
  tensorstore's spec and reprs left out."""
  causes, cause = [], error
  while cause is not None and len(causes) < 5:  # orbax wraps tensorstore's error
    causes.append(str(cause))
    cause = cause.__cause__
  text = "\n".join(causes)
  for part in ("state/_METADATA", "metadata/metadata"):
    if not os.path.exists(os.path.join(step_directory, part)):
      return f"{part} is missing"
  process = re.search(r"(ocdbt\.process_\d+)", text)
  if process and not os.path.exists(os.path.join(step_directory, "state", process.group(1))):
    return f"state/{process.group(1)}/ is missing"
  state = os.path.join(step_directory, "state")
  if os.path.exists(os.path.join(state, "manifest.ocdbt")) and not any(
    n.startswith("ocdbt.process_") for n in os.listdir(state)
  ):
    return "state/ocdbt.process_*/ (the arrays' data) is missing"
  if isinstance(error, DamagedCheckpointError):
    return str(error)
  if isinstance(error, json.JSONDecodeError):
    return f"metadata/metadata is not valid JSON ({error.msg})"
  files = re.findall(r'local file "([^"]+)"', text)
  array = re.search(r'Error reading "([^"/]+)/', text)
  where = ""
  if files:
    path = files[-1]
    where = os.path.relpath(path, step_directory) if path.startswith(step_directory) else path
    where = f"file {where}" + (f" (array {array.group(1)!r})" if array else "")
  size = re.search(r"byte range \[\d+, (\d+)\) is not valid for value of size (\d+)", text)
  if size:
    return f"{where or 'a data file'} is truncated ({size.group(2)} bytes, {size.group(1)} read)"
  line = re.sub(
    r"\s*\[tensorstore_spec=.*", "", text.strip().splitlines()[0] if text.strip() else ""
  )
  line = re.sub(r"\s*See full TensorStore details:.*", "", line)
  line = re.sub(r"<bound method [^>]*>|<[^<>]* object at 0x[0-9a-f]+>", "<...>", line)
  line = f"{type(error).__name__}: {line}" + (f" [{where}]" if where else "")
  return line if len(line) <= 200 else line[:197] + "..."


# asyncio's words for a task or future (any class: Task, Future,
# _GatheringFuture for orbax's gathered reads) whose exception nobody awaited.
_UNAWAITED_TASK_ECHOES = re.compile(
  r"(\w+ exception was never retrieved|Task was destroyed "
  r"but it is pending)(\n|$)"
)


def _is_closed_loop_error(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


# Set once a Checkpointer has reported a failed read or write itself.
_reported_io_failure = False


def _note_reported_failure() -> None:
  global _reported_io_failure
  _reported_io_failure = True


def _is_echo_of_reported_failure(unraisable) -> bool:
  """An orbax read or write coroutine left pending when its event loop closed
  over a failure this module reported: at exit, its garbage collection
  re-raises that failure as `Exception ignored in <coroutine ...>`."""
  code = getattr(unraisable.object, "cr_code", None)
  return _reported_io_failure and code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _drop_io_echo(record: pylogging.LogRecord) -> bool:
  """A logging filter: False for the echoes `quiet_failed_io_echoes` names."""
  error = record.exc_info[1] if record.exc_info else None
  return not (
    _is_closed_loop_error(error) or _UNAWAITED_TASK_ECHOES.match(str(record.msg)) is not None
  )


def _one_line_orbax_errors(record: pylogging.LogRecord) -> bool:
  """A logging filter: an error orbax logs from its save threads keeps its
  first line and loses its traceback (the run's own message follows it)."""
  if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
    record.msg = (
      describe_io_error(record.exc_info[1]) if record.exc_info[1] else record.getMessage()
    )
    record.args, record.exc_info, record.exc_text = None, None, None
  return True


def quiet_failed_io_echoes() -> None:
  """When one write of a save or one read of a restore fails, orbax closes
  its event loop while the other writes or reads are in flight. They then
  echo the failure as dozens of tracebacks: `Task exception was never
  retrieved` with a tensorstore error (the `asyncio` logger), `exception
  calling callback` with `RuntimeError: Event loop is closed` (the
  `concurrent.futures` logger), the same error as unraisable exceptions,
  and orbax's own error logs with a traceback per thread. `Checkpointer`
  reports the failure once itself; this drops exactly the echoes and cuts
  orbax's logs to one line. It is installed when a Checkpointer is made, not
  after a failure, because the echoes come from orbax's threads and can
  arrive first. Idempotent: the filters are one object each (a logger keeps
  it once) and the hook is not wrapped twice."""
  for name in ("asyncio", "concurrent.futures"):
    pylogging.getLogger(name).addFilter(_drop_io_echo)
  pylogging.getLogger("absl").addFilter(_one_line_orbax_errors)
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_event_loops", False):
    return

  def hook(unraisable):
    if not (
      _is_closed_loop_error(unraisable.exc_value) or _is_echo_of_reported_failure(unraisable)
    ):
      previous(unraisable)

  hook._drops_closed_event_loops = True
  sys.unraisablehook = hook


# orbax's words when the saved tree differs from the one asked for (another
# optimizer, EMA on/off, ...): a config problem, not damage.
_STRUCTURE_MISMATCH = ("tree structures do not match", "Structure mismatch")


class Checkpointer:
  """Saves to and resumes from `<workdir>/checkpoints`.

  Multi-process: every process constructs it and calls `save` / `restore`
  with the same arguments; orbax writes each process's shards and process 0
  the metadata, with barriers through `jax.distributed`.
  """

  def __init__(
    self,
    workdir: str,
    *,
    save_every: int,
    keep: int,
    async_save: bool = True,
    read_only: bool = False,
  ):
    """`read_only` (a sampler beside a training run): orbax writes and
    creates nothing, and a restore never moves a damaged step aside."""
    if keep < 1:
      raise ValueError(
        f"config.keep_checkpoints={keep} would delete every checkpoint, the "
        "final one included; set it to 1 or more."
      )
    self.directory = checkpoint_directory(workdir)
    self.damaged_directory = os.path.join(os.path.dirname(self.directory), DAMAGED)
    self._saving_step: int | None = None  # an async save not yet known to have committed
    self.read_only = read_only
    quiet_failed_io_echoes()
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int, *, force: bool = False) -> bool:
    return force or self.manager.should_save(step)

  def save(
    self,
    step: int,
    state: Any,
    identity: RunIdentity,
    *,
    force: bool = False,
    data_position: dict | None = None,
  ) -> bool:
    """Starts an (async) save when one is due; a failure, this one's or the
    previous async one's, raises CheckpointSaveError. `data_position` (a
    streamed input's, data/stream.py) is saved as its own JSON item, `data`."""
    items = dict(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(identity.to_json()))
    if data_position is not None:
      items["data"] = ocp.args.JsonSave(data_position)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # orbax raises whatever the filesystem raised
      self._save_failed(self._saving_step or step, e)
    if saved:
      self._saving_step = step
    return saved

  def wait(self, *, stopped_at: int | None = None):
    """Blocks until the last save has committed (raises CheckpointSaveError)."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:
      self._save_failed(self._saving_step, e, stopped_at=stopped_at)
    self._saving_step = None

  def check_last_save(self, step: int) -> None:
    """Without blocking: once the last async save has ended, raises
    CheckpointSaveError if it failed, so the run stops at `step` (the next
    step), not at its next save an interval later. Multi-process, every
    process calls it at the same steps and they agree (one small all-gather)
    that the save has ended everywhere before any of them looks."""
    if self._saving_step is None:
      return
    ended = not self.manager.is_saving_in_progress()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      ended = bool(multihost_utils.process_allgather(np.int32(ended)).all())
    if ended:
      self.wait(stopped_at=step)

  def _save_failed(self, step: int | None, error: BaseException, *, stopped_at: int | None = None):
    _note_reported_failure()
    removed = self._remove_temporaries()
    kept = [s for s in self.all_steps() if s != step]
    stopped = (
      f" The run stopped at step {stopped_at}; steps after {kept[-1] if kept else 0} are not saved."
      if stopped_at is not None
      else ""
    )
    raise CheckpointSaveError(
      f"saving checkpoint step {step} to {self.directory} failed ({describe_io_error(error)})."
      f"{stopped} "
      f"Earlier checkpoints are intact (steps {kept or 'none'})"
      f"{'; removed its partial ' + ', '.join(removed) if removed else ''}. Free disk space "
      "or fix the directory's permissions, then rerun the same command: it resumes from "
      "the newest checkpoint."
    ) from error

  def _remove_temporaries(self) -> list[str]:
    if jax.process_index() != 0:
      return []
    removed = []
    directory = epath.Path(self.directory)
    if directory.exists():
      for name in ocp.path.step.tmp_checkpoints(directory):  # orbax's own test for its temporaries
        path = directory / name
        try:
          path.rmtree() if path.is_dir() else path.unlink()
          removed.append(name)
        except OSError as e:
          logging.warning("could not remove %s: %s", path, e)
    return removed

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def read_data_position(self, step: int) -> dict | None:
    """The `data` item of a step (None: saved by an in-memory run, or before
    the item existed)."""
    if not epath.Path(self.directory, str(step), "data").exists():
      return None
    return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

  def read_metadata(self, step: int) -> dict:
    return self.manager.restore(
      step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
    ).metadata

  def restore(self, abstract_state: Any, identity: RunIdentity, step: int | None = None) -> Any:
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs).

    Without `step`: the newest checkpoint that reads. Newer ones that failed
    to read are then moved aside with a warning, and only then: when none
    reads, nothing is moved (the cause may be the config, not the files).
    A read-only checkpointer moves nothing: the warning says which step it
    used and why.
    Raises CheckpointMismatchError, naming the checkpoint, when it was
    written by a different model or train state.
    """
    steps = [step] if step is not None else self.all_steps()[::-1]
    failures = []
    for candidate in steps:
      try:
        restored = self._restore_step(candidate, abstract_state, identity)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # a damaged checkpoint raises anything tensorstore can
        if step is not None:
          raise
        failures.append(
          (candidate, describe_damage(os.path.join(self.directory, str(candidate)), e))
        )
        _note_reported_failure()  # below: in a warning, or in the error
        continue
      for damaged, error in failures:
        if self.read_only:
          logging.warning(
            "checkpoint step %d in %s could not be read (%s); using step %d, "
            "the newest that reads (read-only: nothing moved).",
            damaged,
            self.directory,
            error,
            candidate,
          )
          continue
        where = self._set_aside(damaged)
        logging.warning(
          "checkpoint step %d in %s could not be read (%s); moved it to %s and "
          "resumed from step %d instead.",
          damaged,
          self.directory,
          error,
          where,
          candidate,
        )
      return restored
    listing = "; ".join(f"step {s}: {error}" for s, error in failures)
    raise NoRestorableCheckpointError(
      f"no checkpoint in {self.directory} could be read ({listing}). Nothing was moved or "
      "deleted. If the files are damaged, move them away (or use a fresh --workdir); if "
      "the config changed, run with the config they were written with."
    )

  def _restore_step(self, step: int, abstract_state: Any, identity: RunIdentity) -> Any:
    saved = self.read_metadata(step)
    missing = [k for k in RunIdentity.REQUIRED if not isinstance(saved, dict) or k not in saved]
    if missing:  # what a crash mid-write leaves: damage, not another model
      raise DamagedCheckpointError(
        f"its identity metadata ({self.directory}/{step}/metadata) is "
        f"{'empty' if not saved else 'incomplete'}: no {', '.join(missing)}"
      )
    mismatched = identity.differences(saved)
    if mismatched:
      details = ", ".join(
        f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in mismatched.items()
      )
      raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} does not match the config ({details}). "
        + self._mismatch_fix()
      )
    try:
      restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
      )
    except ValueError as e:
      if not any(words in str(e) for words in _STRUCTURE_MISMATCH):
        raise
      raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} holds a different train state than the "
        f"config builds ({' '.join(str(e).split()[:40])}), e.g. another optimizer, EMA "
        "setting or config.on_nonfinite mode. " + self._mismatch_fix()
      ) from e
    return restored.state

  def _mismatch_fix(self) -> str:
    if self.read_only:  # reading a trained run: its config is the fix, not a new workdir
      return (
        "Read it with the config it was trained with (the --config and --config.* "
        f"flags of its training command; {os.path.dirname(self.directory)}/config.json "
        "records them)."
      )
    return "Use a fresh --workdir, or set the config back to what the checkpoint was trained with."

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step out of orbax's sight (all processes agree first)."""
    target = os.path.join(self.damaged_directory, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set_aside_{step}")
    if jax.process_index() == 0:
      epath.Path(self.damaged_directory).mkdir(parents=True, exist_ok=True)
      epath.Path(self.directory, str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set_aside_{step}_done")
    self.manager.reload()
    return target

  def close(self):
    try:
      self.manager.close()
    except Exception as e:  # a failed async save, already reported by wait()/save()
      logging.warning("closing the checkpoint manager: %s", first_line(e))

  def read_identity(self, step: int) -> RunIdentity:
    return RunIdentity.from_json(self.read_metadata(step))


# ---------------------------------------------------------------- reading a run


def workdir_has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a finished checkpoint (a run there would resume)."""
  return bool(ocp.utils.checkpoint_steps(checkpoint_directory(workdir)))


def _steps(directory: epath.Path) -> list[int]:
  return sorted(ocp.utils.checkpoint_steps(directory)) if directory.is_dir() else []


def locate(path: str) -> tuple[epath.Path, int]:
  """`config.init_from`-style path -> (the checkpoints directory, the step to
  read): a run's workdir or its `checkpoints` directory (newest step), or one
  `checkpoints/<step>` directory."""
  # orbax wants absolute paths; URLs (gs://...) are left as they are.
  where = epath.Path(path if "://" in path else os.path.abspath(path))
  if not where.exists():
    raise ValueError(
      f"config.init_from={path!r} does not exist. Point it at a pre-training "
      "workdir (e.g. the --workdir of configs/mae_pixel.py), its 'checkpoints' "
      "directory or one 'checkpoints/<step>' directory; set it to '' to train from "
      "random initialisation."
    )
  if _steps(where / "checkpoints"):  # a workdir
    directory = where / "checkpoints"
    return directory, _steps(directory)[-1]
  if _steps(where):  # a checkpoints directory
    return where, _steps(where)[-1]
  if where.name.isdigit() and int(where.name) in _steps(where.parent):  # checkpoints/<step>
    return where.parent, int(where.name)
  raise ValueError(
    f"config.init_from={path!r} holds no finished checkpoint: expected a workdir "
    "with 'checkpoints/<step>/' inside, a 'checkpoints' directory or one "
    "'checkpoints/<step>' directory written by pixel_vit."
  )


def open_read_only(directory) -> ocp.CheckpointManager:
  """A manager that only reads: the `state` item as a plain pytree (so part of
  it can be restored without knowing the rest) and the JSON `metadata`."""
  return ocp.CheckpointManager(
    directory,
    item_handlers={"state": ocp.PyTreeCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()},
    options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
  )


def flat_shapes(tree) -> dict[str, tuple]:
  """{'encoder/blocks/qkv_kernel': shape, ...} of a nested dict of arrays or metadata."""
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """One finished checkpoint, opened read-only: its JSON metadata and the
  structure of its train state (shapes and dtypes from orbax's metadata, no
  arrays read), and `restore` for any subtree of it."""

  directory: epath.Path
  step: int
  metadata: dict  # the JSON item as written (`RunIdentity.to_json` since it exists)
  state_tree: Any  # {'params': {...}, 'opt_state': ..., 'ema_params': ...} of metadata

  @property
  def path(self) -> epath.Path:
    return self.directory / str(self.step)

  def identity(self) -> RunIdentity:
    return RunIdentity.from_json(self.metadata)

  def restore(self, target: dict) -> dict:
    """Reads only the arrays `target` names (a nested dict of
    ShapeDtypeStructs with shardings, a subtree of the train state) straight
    onto their shardings; the rest of the checkpoint is not read."""
    manager = open_read_only(self.directory)
    try:
      restored = manager.restore(
        self.step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
          )
        ),
      )
    finally:
      manager.close()
    return restored.state


def open_saved(directory: epath.Path, step: int) -> SavedRun:
  """Reads a checkpoint's metadata and state structure; a checkpoint that is
  not pixel_vit's (no `state` or `metadata` item) raises what orbax raises
  (FileNotFoundError, KeyError or ValueError) for the caller to word."""
  manager = open_read_only(directory)
  try:
    metadata = manager.restore(
      step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
    ).metadata
    tree = manager.item_metadata(step)["state"]
  finally:
    manager.close()
  return SavedRun(
    directory=directory,
    step=step,
    metadata=dict(metadata or {}),
    state_tree=getattr(tree, "tree", tree),
  )
