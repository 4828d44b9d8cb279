"""The parts of a training run every task shares.

`start` builds the mesh, the sharded train state (resumed from the workdir's
newest checkpoint when there is one) and the reporter; `train` runs the loop:
step, progress, periodic metrics, evaluation, checkpoints, preemption. A
trainer supplies its jitted step, its batches and its evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax
from absl import logging
from flax import nnx

from pixel_vit import checkpoint as checkpoint_lib
from pixel_vit import hardware, parallel
from pixel_vit import optimizer as optimizer_lib
from pixel_vit import workdir as workdir_lib
from pixel_vit.config_checks import check_choice, check_positive, require
from pixel_vit.data import augment, locality, pipeline, sources, stream
from pixel_vit.models import attention, vit
from pixel_vit.trainers import config_history, divergence, interrupts, reporting
from pixel_vit.trainers import state as state_lib


def validate_run(config, device_count: int, process_count: int) -> None:
  """The loop's own keys: batch, run length, periods, checkpoints, the
  non-finite policy and profiling (and the batch against the mesh)."""
  check_positive("batch_size", config.batch_size)
  check_positive("eval_batch_size", config.eval_batch_size)
  check_positive("total_steps", config.total_steps, allow_zero=True)  # 0: use total_epochs
  for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    check_positive(key, config[key])
  check_choice("on_nonfinite", config.get("on_nonfinite", "stop"), ("stop", "skip"))
  check_choice("take_over_lock", config.get("take_over_lock", False), (False, True))
  check_choice("resume_with_changes", config.get("resume_with_changes", False), (False, True))
  check_positive("max_nonfinite_skips", config.get("max_nonfinite_skips", 0), allow_zero=True)
  if "profile" in config:
    check_positive("profile.steps", config.profile.steps, allow_zero=True)
    check_positive("profile.first_step", config.profile.first_step)
  parallel.validate_batch_sizes(config, device_count, process_count)


def validate_common(config, target: hardware.Target | None = None, *, files: bool = True) -> None:
  """What every trainer's config has, each subsystem checking its own keys:
  model, optimizer, data, augmentation, batch / mesh, attention, run length,
  for the devices the run is compiled for (`target`; default: all of this
  run's). `files=False`: not whether the data files exist (a compile ahead
  of time reads none). Before anything loads or compiles."""
  target = target or hardware.Target.of(jax.devices())
  device_count, process_count = target.device_count, target.process_count
  vit.validate_model_config(config.model)
  optimizer_lib.validate_config(config.optimizer)
  sources.validate_config(config.data, files=files)
  require(
    not (config.task == "diffusion" and sources.loader_for(config.data) == "stream"),
    f"config.data.source={config.data.source!r} streams images; the diffusion task "
    "trains on VAE latents in memory (npz: files from `python -m "
    "pixel_vit.encode_latents`).",
  )
  if "permute_pixels" in config.data:
    locality.validate_permute_config(config.data.permute_pixels)
  augment.validate_augment_config(config.augment)
  validate_run(config, device_count, process_count)
  attention.validate(config, device_count, target.platform)
  check_positive("total_epochs", config.total_epochs, allow_zero=True)
  require(
    config.total_steps > 0 or config.total_epochs > 0,
    f"config.total_steps={config.total_steps} and config.total_epochs="
    f'{config.total_epochs:g} leave the run without a length: 0 steps means "use '
    'total_epochs", and the quick configs pin total_epochs=0. Set '
    "--config.total_steps=N (> 0), or --config.total_epochs=E (> 0) with "
    "--config.total_steps=0.",
  )


def describe_length(config, start_step: int, total_steps: int, steps_per_epoch: int) -> str:
  """'steps 0 -> 400 (...)': the run's length and what decided it, for the first log line."""
  if config.total_steps:
    how = (
      f"config.total_steps; {steps_per_epoch} steps/epoch, so "
      f"{total_steps / steps_per_epoch:.3g} epochs"
    )
  else:
    how = (
      f"from config.total_epochs={config.total_epochs:g} x {steps_per_epoch} "
      "steps/epoch, since config.total_steps=0"
    )
  return f"steps {start_step} -> {total_steps} ({how})"


@dataclasses.dataclass
class Layout:
  """A run's config and plan laid over devices: the mesh, the logical-axis
  rules and the state's shardings. What a task's programs are built from
  (each trainer's `programs(layout)`), with or without data and state: a
  `Run` is a Layout with its state; `pixel_vit.compile` builds one over
  compile-only TPU devices."""

  config: Any
  plan: Plan
  mesh: jax.sharding.Mesh
  rules: Any
  described: state_lib.ShardedState

  def batch_shardings(self, *, with_mask: bool = False) -> dict:
    """Shardings of a global image batch (`mask`: eval padding)."""
    names = {"images": 4, "labels": 1, **({"mask": 1} if with_mask else {})}
    return {
      name: parallel.batch_sharding(self.mesh, self.rules, ndim) for name, ndim in names.items()
    }

  def abstract_batch(self, batch_size: int, *, with_mask: bool = False) -> dict:
    """A global batch of `batch_size` as the pipeline hands it over, abstract:
    images (uint8 pixels or float32 latents), labels and the eval `mask`."""
    images = self.plan.train_split.images
    shapes = {
      "images": ((batch_size, *images.shape[1:]), images.dtype),
      "labels": ((batch_size,), np.int32),
      "mask": ((batch_size,), np.float32),
    }
    return {
      name: jax.ShapeDtypeStruct(*shapes[name], sharding=sharding)
      for name, sharding in self.batch_shardings(with_mask=with_mask).items()
    }

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return parallel.replicated(self.mesh)

  def train_program(self, train_step: Callable) -> parallel.Program:
    """`train_step(state, batch) -> (state, metrics)` on the state's
    shardings and a global `config.batch_size` batch, the state donated, the
    metrics replicated."""
    return parallel.Program(
      "train_step",
      train_step,
      args=(self.described.abstract, self.abstract_batch(self.config.batch_size)),
      out_shardings=(self.described.shardings, self.replicated),
      donate_argnums=(0,),
    )

  def jit(self, program: parallel.Program) -> Callable:
    """`program` as a function on this layout's mesh and rules."""
    return program.jit(self.mesh, self.rules)


@dataclasses.dataclass
class Run(Layout):
  """A started run: a Layout with its state, checkpointer, reporter and
  workdir lock, and the scaffolding every trainer's loop shares."""

  state: state_lib.TrainState
  checkpointer: checkpoint_lib.Checkpointer
  reporter: reporting.Reporter
  identity: checkpoint_lib.RunIdentity
  lock: workdir_lib.WorkdirLock
  stopped_by: str | None = None  # the signal that stopped the run early

  @property
  def start_step(self) -> int:
    return int(jax.device_get(self.state.step))

  @property
  def total_steps(self) -> int:
    return self.plan.total_steps

  @property
  def length(self) -> str:
    """'steps 0 -> 400 (...)' (`describe_length`), for the first log line."""
    return describe_length(
      self.config, self.start_step, self.plan.total_steps, self.plan.steps_per_epoch
    )

  def announce(self, first_line: str) -> None:
    """Logs the run's first line (its `length` and what the trainer adds),
    then what the data check warned about, so the length always leads."""
    self.reporter.log(f"{first_line}; input {self.plan.train_split.reading}")
    for warning in self.plan.data_warnings if self.reporter.is_main else ():
      logging.warning("%s", warning)

  def to_global(self, local_batch: dict) -> dict:
    return parallel.host_to_global(local_batch, self.mesh, self.rules)

  def eval_batches(self) -> Iterator[dict]:
    """The whole eval split once, as global batches (padded, with `mask`)."""
    split = self.plan.eval_split
    if split.stream is None:
      local = pipeline.eval_batches(split, local_batch_size=self.plan.local_eval_batch)
    else:
      local = BadRecords("eval").passed_over(
        stream.eval_batches(
          split.stream,
          host_crops(self.config),
          stream.Layout(self.config.eval_batch_size, jax.process_index(), jax.process_count()),
          workers=self.config.data.workers,
        )
      )
    return map(self.to_global, local)


def load_splits(config) -> tuple[sources.ImageSplit, sources.ImageSplit]:
  source = sources.parse_source(
    config.data.source,
    data_dir=config.data.get("data_dir"),
    download=config.data.get("download", True),
    loader=config.data.get("loader", "auto"),
    crop_fraction=config.data.get("crop_fraction", 0.875),
  )
  load = functools.partial(
    source.load,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    image_size=config.data.get("image_size"),
  )
  train, test = load(config.data.train_split), load(config.data.eval_split)
  if config.task == "diffusion" and train.stream is not None:
    raise ValueError(
      f"{train.origin} would be {train.reading}; the diffusion task trains on "
      "images or VAE latents in memory: set config.data.loader='memory', or "
      "encode latents with `python -m pixel_vit.encode_latents`."
    )
  if train.is_latent and config.model.get("tokenizer") == "vocab":
    raise ValueError(
      f"config.model.tokenizer='vocab' embeds 8-bit pixel values, but "
      f"{config.data.source} holds VAE latents (float); use "
      "config.model.tokenizer='linear'."
    )
  if train.is_latent and config.task != "diffusion":
    raise ValueError(
      f"{config.data.source} holds VAE latents, which only the diffusion task "
      f"trains on; config.task={config.task!r} needs images."
    )
  height, width = train.images.shape[1:3]
  if height != width:
    raise ValueError(
      f"images from {config.data.source} are {height}x{width}; the encoder "
      "needs square images: set config.data.image_size."
    )
  vit.validate_image_size(config.model, height)
  return train, test


def schedule_steps(config, steps_per_epoch: int) -> tuple[int, int]:
  total = config.total_steps or max(1, round(config.total_epochs * steps_per_epoch))
  warmup = config.optimizer.warmup_steps or round(
    config.optimizer.get("warmup_epochs", 0.0) * steps_per_epoch
  )
  return total, min(warmup, total)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run reads and optimises, decided before anything compiles."""

  train_split: sources.ImageSplit
  eval_split: sources.ImageSplit
  local_batch: int  # this process's share of config.batch_size
  local_eval_batch: int
  steps_per_epoch: int
  total_steps: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  make_model: Callable[[], nnx.Module]
  shapes: state_lib.ModelShapes
  # The locality ablation's fixed pixel permutation (None: off), data/locality.py.
  permutation: locality.PixelPermutation | None
  # What the run can live with in its data (classes only eval has, unused
  # class ids), one paragraph each; `Run.announce` logs them.
  data_warnings: tuple[str, ...] = ()
  # The augmentation the train step runs on the device: config.augment, less
  # the crop and flip a streamed split's host does (data/stream.py).
  device_augment: Any = None


def plan(
  config,
  make_model_fn: Callable[[Any, sources.ImageSplit], Callable[[], nnx.Module]],
  *,
  splits: tuple[sources.ImageSplit, sources.ImageSplit] | None = None,
) -> Plan:
  """Reads the data (or takes `splits`, e.g. `sources.stand_in_split`s that
  hold no examples), sizes the schedule and traces the model's shapes once."""
  train_split, eval_split = splits or load_splits(config)
  # Before anything compiles: a model built for the train split can evaluate
  # the eval split (sizes, kinds, labels vs classes); MAE ignores labels.
  data_warnings = sources.check_splits(train_split, eval_split, labelled=config.task != "mae")
  local_batch = config.batch_size // jax.process_count()
  steps_per_epoch = pipeline.steps_per_epoch(train_split, local_batch)
  total_steps, warmup_steps = schedule_steps(config, steps_per_epoch)
  make_model = make_model_fn(config, train_split)
  shapes = state_lib.model_shapes(make_model)
  schedule = optimizer_lib.make_schedule(config.optimizer, total_steps, warmup_steps)
  tx = divergence.wrap_optimizer(
    config, optimizer_lib.make_optimizer(config.optimizer, schedule, shapes.params)
  )
  return Plan(
    train_split,
    eval_split,
    local_batch,
    config.eval_batch_size // jax.process_count(),
    steps_per_epoch,
    total_steps,
    schedule,
    tx,
    make_model,
    shapes,
    locality.permutation_for(config.data, *train_split.images.shape[1:3]),
    tuple(data_warnings),
    device_augment(config, train_split),
  )


def device_augment(config, train_split: sources.ImageSplit):
  """config.augment, or for a streamed split a copy without the crop and flip
  that its host already did to the original image."""
  if train_split.stream is None:
    return config.augment
  on_device = copy.deepcopy(config.augment)
  on_device.crop, on_device.crop_padding, on_device.flip = False, 0, False
  return on_device


def host_crops(config) -> stream.HostCrops:
  """What a streamed split's host does per example, from config.augment
  (crop, crop_scale, crop_ratio, flip) and config.data."""
  augment_config = config.augment
  return stream.HostCrops(
    image_size=config.data.image_size,
    random_crop=bool(augment_config.crop),
    scale=tuple(augment_config.crop_scale),
    ratio=tuple(augment_config.crop_ratio),
    flip=bool(augment_config.flip),
    crop_fraction=config.data.crop_fraction,
    on_bad_example=config.data.get("on_bad_example", "fail"),  # configs from before the key
  )


def data_position(config, plan: Plan, step: int) -> dict | None:
  """A streamed split's position at `step` (saved with the checkpoint); None in memory."""
  split = plan.train_split.stream
  if split is None:
    return None
  return stream.data_position(split, seed=config.seed, global_batch=config.batch_size, step=step)


def check_data_position(config, plan: Plan, checkpointer, step: int) -> None:
  """A resumed streamed run continues the order its checkpoint was saved in:
  the same records (count, shards), seed and global batch. The process
  count may differ: the order does not depend on it (data/stream.py)."""
  expected = data_position(config, plan, step)
  saved = None if expected is None else checkpointer.read_data_position(step)
  if saved is None:  # in memory, or a checkpoint from before the item existed
    return
  differs = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
  if differs:
    listed = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differs.items())
    raise ValueError(
      f"checkpoint step {step} in {checkpointer.directory} was saved streaming other data "
      f"or in another order ({listed}), so the resumed steps would not continue its run. "
      "Point config.data.source at the records it trained on, or use a fresh --workdir."
    )


def train_batches(run: "Run", start_step: int) -> Iterator[dict]:
  """This process's host batches for steps start_step + 1, ...: in memory
  (data/pipeline.py) or streamed (data/stream.py)."""
  config, split = run.config, run.plan.train_split
  if split.stream is None:
    return pipeline.train_batches(
      split, local_batch_size=run.plan.local_batch, seed=config.seed, start_step=start_step
    )
  return stream.train_batches(
    split.stream,
    host_crops(config),
    stream.Layout(config.batch_size, jax.process_index(), jax.process_count()),
    seed=config.seed,
    start_step=start_step,
    total_steps=run.total_steps,
    workers=config.data.workers,
  )


class BadRecords:
  """Streamed records that did not decode and were passed over
  (config.data.on_bad_example='skip'): `passed_over` takes each batch's
  'skipped' counts out (before the batch goes to the devices) and adds
  them up, and logs the total when the batches end (an evaluation's)."""

  def __init__(self, what: str):
    self.what, self.total = what, 0

  def passed_over(self, batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
      skipped = batch.pop("skipped", None)
      if skipped is not None:
        self.total += int(np.sum(skipped))
      yield batch
    if self.total:
      logging.warning(
        "%s passed over %d records of this process that do not decode "
        "(config.data.on_bad_example='skip').",
        self.what,
        self.total,
      )


def start(
  config,
  workdir: str,
  plan: Plan,
  *,
  initial_params: Callable[[Any], Any] | None = None,
  devices=None,
  read_only: bool = False,
) -> Run:
  """Workdir lock, mesh, sharded state (resumed or new), checkpointer and reporter.

  `initial_params(params) -> params` adjusts a *new* run's parameters (e.g.
  loading a pre-trained encoder); a resumed run takes its checkpoint instead.
  `devices` (default: all) are laid out on the mesh `config.mesh` describes.
  `read_only=True` (sampling a trained run, possibly while it trains on)
  takes no lock and leaves the workdir's `config.json`, the record of how it
  was trained, as it is.
  """
  lock = (
    workdir_lib.WorkdirLock(None)
    if read_only
    else workdir_lib.claim(workdir, take_over=config.get("take_over_lock", False))
  )
  try:
    return _start(config, workdir, plan, initial_params, devices, read_only, lock)
  except BaseException:
    lock.release()  # e.g. a checkpoint of another model: the workdir is left as it was
    raise


def lay_out(config, plan: Plan, devices=None) -> tuple[Layout, Callable[[], state_lib.TrainState]]:
  """`plan` over `devices` (default: all): the mesh `config.mesh` describes,
  the rules and the state's description (nothing allocated), and the jitted
  function that creates a new state on them."""
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  described, create_state = state_lib.sharded_state(
    plan.make_model,
    plan.tx,
    mesh=mesh,
    rules=config.sharding_rules,
    seed=config.seed,
    ema=config.optimizer.ema_decay > 0,
    shapes=plan.shapes,
  )
  return Layout(config, plan, mesh, config.sharding_rules, described), create_state


def _start(config, workdir, plan, initial_params, devices, read_only, lock) -> Run:
  # What makes a checkpoint this model, the same rule for every task.
  identity = checkpoint_lib.RunIdentity.of_run(config, plan.train_split)
  layout, create_state = lay_out(config, plan, devices)
  described = layout.described
  checkpointer = checkpoint_lib.Checkpointer(
    workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints, read_only=read_only
  )
  latest = checkpointer.latest_step()
  # A refused resume stops here, before the restore reads the state.
  changed = {} if read_only else config_history.check_resume(workdir, config, latest or 0)
  if latest is not None:
    state = checkpointer.restore(described.abstract, identity)
    check_data_position(config, plan, checkpointer, int(jax.device_get(state.step)))
  else:
    state = create_state()
    if initial_params is not None:
      params = jax.device_put(initial_params(state.params), described.param_shardings)
      state = state.replace(params=params, ema_params=None if state.ema_params is None else params)
  if not read_only:  # a sampler leaves the run's record of how it was trained alone
    config_history.record(
      workdir, config, int(jax.device_get(state.step)), changed, log=logging.warning
    )
  reporter = reporting.Reporter(
    workdir, config, total_steps=plan.total_steps, log_every=config.log_every
  )
  return Run(
    config,
    plan,
    layout.mesh,
    layout.rules,
    described,
    state,
    checkpointer,
    reporter,
    identity,
    lock,
  )


# Device batches made ahead of the step that runs (one being copied while one
# waits): the host's reading and copying overlap the device's step.
PREFETCH_DEPTH = 2


def train(
  run: Run, *, train_step: Callable, evaluate: Callable[[int, state_lib.TrainState], dict]
) -> tuple[state_lib.TrainState, dict]:
  """Runs `train_step` (jitted: `run.jit_train_step`) from the state's step
  to `run.total_steps`.

  The train batches (a function of seed and step, see data/pipeline.py) are
  copied to the devices PREFETCH_DEPTH steps ahead (`pipeline.ahead_on_device`);
  `evaluate(step, state)` reports and returns its metrics. Returns the final
  state and the last evaluation's metrics. SIGTERM / SIGINT end it early
  with a checkpoint of the current step (`run.stopped_by` names the signal;
  multi-process, a notice during a resumed run's startup ends it before the
  first step, its checkpoint being the current state);
  a non-finite loss raises divergence.TrainingDivergedError (see there).
  """
  config, state, start_step = run.config, run.state, run.start_step
  bad_records = BadRecords("train")
  batches = bad_records.passed_over(train_batches(run, start_step))
  guard = divergence.Guard(config)
  input_clock = InputClock()
  fetched: list[dict] = []  # host metrics of the steps since the last log point
  results: dict = {}
  try:
    with (
      interrupts.StopRequests() as stops,
      contextlib.closing(
        pipeline.ahead_on_device(batches, run.to_global, depth=PREFETCH_DEPTH)
      ) as ahead,
    ):
      if _preempted_before_the_first_step(run, start_step):
        run.stopped_by = "preemption notice"
        run.reporter.log(
          f"preemption notice during startup: the checkpoint at step "
          f"{start_step} in {run.checkpointer.directory} already holds this "
          "state; exiting. Rerun the same command to resume from it."
        )
        return state, results
      for step in range(start_step + 1, run.total_steps + 1):
        state, metrics = train_step(state, input_clock.next(ahead))
        if jax.process_count() == 1 or step % config.log_every == 0:  # multi-process: agreed
          run.checkpointer.check_last_save(step)  # a failed async save stops the run now
        guard.observe(step, metrics)
        run.reporter.tick(step)
        last = step == run.total_steps
        if step % config.log_every == 0 or last:
          try:
            guard.check(lambda: _last_checkpoint(run), fetched=fetched)
          finally:  # also when it stops the run: these metrics show the divergence
            _log_train_means(run, guard, step, fetched, input_clock, bad_records)
        if step % config.eval_every == 0 or last:
          results = evaluate(step, state)
        stopping = stops.requested is not None and jax.process_count() == 1
        if run.checkpointer.should_save(step, force=last or stopping):
          try:
            guard.check(lambda: _last_checkpoint(run), fetched=fetched)
            guard.check_params(step, state.params, lambda: _last_checkpoint(run))
          except divergence.TrainingDivergedError:  # not a log step: log what shows it
            _log_train_means(run, guard, step, fetched)
            raise
          run.checkpointer.save(
            step,
            state,
            run.identity,
            force=last or stopping,
            data_position=data_position(run.config, run.plan, step),
          )
        if stopping or run.checkpointer.reached_preemption(step):  # orbax saved this step
          run.checkpointer.wait()
          run.stopped_by = stops.requested or "preemption notice"
          run.reporter.log(
            f"{run.stopped_by}: saved a checkpoint at step {step} in "
            f"{run.checkpointer.directory}; exiting. Rerun the same command "
            "to resume from it."
          )
          break
      if not results and start_step >= run.total_steps:
        results = evaluate(start_step, state)
      run.checkpointer.wait()
  finally:
    run.checkpointer.close()
    run.reporter.close()
    run.lock.release()
  return state, results


class InputClock:
  """How long the loop waited for its next batch: `fraction()` is the share
  of the time since the last call spent waiting (reported as
  train/input_wait_fraction; near 0 unless the input is the bottleneck)."""

  def __init__(self):
    self.waited, self.since = 0.0, time.perf_counter()

  def next(self, batches: Iterator[dict]) -> dict:
    start = time.perf_counter()
    batch = next(batches)
    self.waited += time.perf_counter() - start
    return batch

  def fraction(self) -> float:
    now = time.perf_counter()
    fraction = self.waited / max(now - self.since, 1e-9)
    self.waited, self.since = 0.0, now
    return fraction


def _log_train_means(
  run: Run,
  guard: divergence.Guard,
  step: int,
  fetched: list[dict],
  input_clock: InputClock | None = None,
  bad_records: BadRecords | None = None,
) -> None:
  """Writes the mean of the train metrics fetched since the last log point
  (and empties `fetched`)."""
  if not fetched:
    return
  means = {k: np.mean([m[k] for m in fetched]) for k in fetched[0]}
  if guard.skipped_total:
    means["train/nonfinite_skipped"] = guard.skipped_total
  if input_clock is not None:
    means["train/input_wait_fraction"] = input_clock.fraction()
  if bad_records is not None and bad_records.total:
    # This process's count, from the start of this invocation.
    means["train/bad_records_skipped"] = bad_records.total
  run.reporter.scalars(step, means)
  fetched.clear()


def _preempted_before_the_first_step(run: Run, start_step: int) -> bool:
  """Multi-process, resumed: whether a preemption notice that came during
  startup (after jax.distributed joined: restoring, building the state)
  already fixed the stop at or before `start_step`; JAX's sync drops it
  otherwise.

  The sync stops every process at (the largest step any process last passed
  to `reached_preemption`) + 1, and a process counts as at step 0 until its
  first call. A notice during a resumed run's startup therefore fixed step 1,
  which the run never reaches: the notice was ignored and the run trained on
  until the scheduler killed it. Passing every step up to `start_step`, as if
  this run had trained them (no communication, ~2 us each), hits that stop
  step on every process alike (each one's counter went into it, so it lies
  above that counter and every process passes it), and leaves the counter at
  `start_step`: a later notice (e.g. while the first step compiles) stops at
  a step still ahead, with a checkpoint.
  """
  if jax.process_count() == 1 or start_step == 0:
    return False
  return any(run.checkpointer.reached_preemption(step) for step in range(1, start_step + 1))


def _last_checkpoint(run: Run) -> str:
  run.checkpointer.wait()  # an async save in flight counts once committed
  step = run.checkpointer.latest_step()
  if step is None:
    return f"no checkpoint was written yet in {run.checkpointer.directory}"
  return f"the last checkpoint, step {step} in {run.checkpointer.directory}, is finite"


def report_eval(run: Run, step: int, results: dict) -> dict:
  run.reporter.scalars(step, results)
  run.reporter.log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
  return results
