"""The parts of a training run every task shares.

`start` builds the mesh, the sharded train state (resumed from the workdir's
newest checkpoint when there is one) and the reporter; `train` runs the loop:
step, progress, periodic metrics, evaluation, checkpoints, preemption. A
trainer supplies its jitted step, its batches and its evaluation.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax
from flax import nnx

from pixel_vit import checkpoint as checkpoint_lib
from pixel_vit import configuration, parallel
from pixel_vit import optimizer as optimizer_lib
from pixel_vit.data import pipeline, sources
from pixel_vit.trainers import reporting
from pixel_vit.trainers import state as state_lib


@dataclasses.dataclass
class Run:
  mesh: jax.sharding.Mesh
  rules: Any
  described: state_lib.ShardedState
  state: state_lib.TrainState
  checkpointer: checkpoint_lib.Checkpointer
  reporter: reporting.Reporter
  identity: dict
  total_steps: int

  @property
  def start_step(self) -> int:
    return int(jax.device_get(self.state.step))

  def batch_shardings(self, *, with_mask: bool = False) -> dict:
    """Shardings of a global image batch (`mask`: eval padding)."""
    names = {"images": 4, "labels": 1, **({"mask": 1} if with_mask else {})}
    return {name: parallel.batch_sharding(self.mesh, self.rules, ndim)
            for name, ndim in names.items()}

  def to_global(self, local_batch: dict) -> dict:
    return parallel.host_to_global(local_batch, self.mesh, self.rules)

  def jit(self, fn, *, in_shardings, out_shardings, donate_argnums=()):
    """`jax.jit` traced under this run's mesh and logical-axis rules."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=donate_argnums)

    def call(*args):
      with parallel.activate(self.mesh, self.rules):
        return jitted(*args)

    return call


def load_splits(config) -> tuple[sources.ImageSplit, sources.ImageSplit]:
  source = sources.parse_source(config.data.source, data_dir=config.data.get("data_dir"),
                                download=config.data.get("download", True))
  load = functools.partial(source.load, process_index=jax.process_index(),
                           process_count=jax.process_count(),
                           image_size=config.data.get("image_size"))
  train, test = load(config.data.train_split), load(config.data.eval_split)
  if train.is_latent and config.model.get("tokenizer") == "vocab":
    raise ValueError(f"config.model.tokenizer='vocab' embeds 8-bit pixel values, but "
                     f"{config.data.source} holds VAE latents (float); use "
                     "config.model.tokenizer='linear'.")
  if train.is_latent and config.task != "diffusion":
    raise ValueError(f"{config.data.source} holds VAE latents, which only the diffusion task "
                     f"trains on; config.task={config.task!r} needs images.")
  height, width = train.images.shape[1:3]
  if height != width:
    raise ValueError(f"images from {config.data.source} are {height}x{width}; the encoder "
                     "needs square images: set config.data.image_size.")
  configuration.validate_image_size(config.model, height)
  return train, test


def schedule_steps(config, steps_per_epoch: int) -> tuple[int, int]:
  total = config.total_steps or max(1, round(config.total_epochs * steps_per_epoch))
  warmup = (config.optimizer.warmup_steps
            or round(config.optimizer.get("warmup_epochs", 0.0) * steps_per_epoch))
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


def plan(config, make_model_fn: Callable[[Any, sources.ImageSplit], Callable[[], nnx.Module]]
         ) -> Plan:
  """Reads the data, sizes the schedule and traces the model's shapes once."""
  train_split, eval_split = load_splits(config)
  local_batch = config.batch_size // jax.process_count()
  steps_per_epoch = pipeline.steps_per_epoch(train_split, local_batch)
  total_steps, warmup_steps = schedule_steps(config, steps_per_epoch)
  make_model = make_model_fn(config, train_split)
  shapes = state_lib.model_shapes(make_model)
  schedule = optimizer_lib.make_schedule(config.optimizer, total_steps, warmup_steps)
  tx = optimizer_lib.make_optimizer(config.optimizer, schedule, shapes.params)
  return Plan(train_split, eval_split, local_batch,
              config.eval_batch_size // jax.process_count(), steps_per_epoch, total_steps,
              schedule, tx, make_model, shapes)


def start(config, workdir: str, plan: Plan, *, identity: dict,
          initial_params: Callable[[Any], Any] | None = None, devices=None) -> Run:
  """Mesh, sharded state (resumed or new), checkpointer and reporter.

  `initial_params(params) -> params` adjusts a *new* run's parameters (e.g.
  loading a pre-trained encoder); a resumed run takes its checkpoint instead.
  `devices` (default: all) are laid out on the mesh `config.mesh` describes.
  """
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  rules = config.sharding_rules
  described, create_state = state_lib.sharded_state(
      plan.make_model, plan.tx, mesh=mesh, rules=rules, seed=config.seed,
      ema=config.optimizer.ema_decay > 0, shapes=plan.shapes)
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(described.abstract, identity)
  else:
    state = create_state()
    if initial_params is not None:
      params = jax.device_put(initial_params(state.params), described.param_shardings)
      state = state.replace(params=params,
                            ema_params=None if state.ema_params is None else params)
  reporter = reporting.Reporter(workdir, config, total_steps=plan.total_steps,
                                log_every=config.log_every)
  return Run(mesh, rules, described, state, checkpointer, reporter, identity,
             plan.total_steps)


def train(run: Run, config, *, train_step: Callable, batches: Iterator[dict],
          evaluate: Callable[[int, state_lib.TrainState], dict]) -> tuple[state_lib.TrainState, dict]:
  """Runs `train_step` from the state's step to `run.total_steps`.

  `batches` yields per-process numpy batches starting at the state's step;
  `evaluate(step, state)` reports and returns its metrics. Returns the final
  state and the last evaluation's metrics.
  """
  state, start_step = run.state, run.start_step
  pending: list[dict] = []
  results: dict = {}
  for step in range(start_step + 1, run.total_steps + 1):
    state, metrics = train_step(state, run.to_global(next(batches)))
    pending.append(metrics)
    run.reporter.tick(step)
    if step % config.log_every == 0 or step == run.total_steps:
      means = {k: np.mean([m[k] for m in jax.device_get(pending)]) for k in pending[0]}
      run.reporter.scalars(step, means)
      pending = []
    if step % config.eval_every == 0 or step == run.total_steps:
      results = evaluate(step, state)
    run.checkpointer.save(step, state, run.identity, force=step == run.total_steps)
    if run.checkpointer.reached_preemption(step):  # orbax saved this step already
      run.reporter.log(f"preempted at step {step}; checkpoint saved, exiting.")
      break
  if not results and start_step >= run.total_steps:
    results = evaluate(start_step, state)
  run.checkpointer.wait()
  run.checkpointer.close()
  run.reporter.close()
  return state, results


def report_eval(run: Run, step: int, results: dict) -> dict:
  run.reporter.scalars(step, results)
  run.reporter.log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
  return results
