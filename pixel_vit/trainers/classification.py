"""Supervised classification (the paper's first case study): one train loop.

`validate(config)` runs before anything loads or compiles;
`train_and_evaluate(config, workdir)` trains, evaluates periodically on the
eval split, checkpoints and resumes automatically from the workdir.

Fine-tuning and linear probing (configs/mae_finetune.py): `config.init_from`
names a pre-trained checkpoint whose encoder a *new* run starts from
(`trainers/pretrained.py`; a resumed run takes its own checkpoint);
`config.optimizer.layer_decay` and `config.optimizer.freeze` are in
`pixel_vit/optimizer.py`. A frozen parameter is also cut out of the backward
pass (`stop_gradient`), so a linear probe costs a forward pass plus the head.
"""
from __future__ import annotations

import functools

import jax
import optax
from flax import nnx

from pixel_vit import configuration, parallel
from pixel_vit import optimizer as optimizer_lib
from pixel_vit.data import augment, pipeline, sources
from pixel_vit.evaluation import accuracy
from pixel_vit.models import vit
from pixel_vit.trainers import loop, pretrained
from pixel_vit.trainers import state as state_lib


def validate(config) -> None:
  configuration.validate_model(config.model)
  configuration.validate_optimizer(config.optimizer)
  configuration.validate_data(config.data)
  augment.validate_augment_config(config.augment)
  configuration.validate_run(config, jax.device_count(), jax.process_count())
  if config.total_steps == 0 and config.total_epochs <= 0:
    raise ValueError("config.total_steps is 0 and config.total_epochs is not > 0: "
                     "set one of them.")
  pretrained.check_config(config)  # init_from vs config.model, when the path exists


def make_model_fn(config, split: sources.ImageSplit):
  height, _, channels = split.images.shape[1:]
  return lambda: vit.build_classifier(config.model, image_size=height, channels=channels,
                                      num_classes=split.num_classes,
                                      rngs=nnx.Rngs(config.seed))


def make_train_step(config, graphdef, tx, schedule, num_classes: int):
  frozen = tuple(config.optimizer.get("freeze", ()) or ())

  def train_step(state: state_lib.TrainState, batch: dict):
    step_key = jax.random.fold_in(state.rng, state.step)
    augment_key, drop_key = jax.random.split(step_key)
    images, targets = augment.augment_batch(augment_key, batch["images"], batch["labels"],
                                            num_classes=num_classes, config=config.augment)

    def loss_fn(params):
      params = {name: jax.lax.stop_gradient(value) if name in frozen else value
                for name, value in params.items()}
      logits = state_lib.merge_model(graphdef, params)(images, key=drop_key)
      return optax.softmax_cross_entropy(logits, targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = (None if state.ema_params is None
           else state_lib.ema_update(state.ema_params, params, config.optimizer.ema_decay))
    metrics = {
        "train/loss": loss,
        "train/accuracy": (logits.argmax(-1) == targets.argmax(-1)).mean(),
        "train/grad_norm": optax.tree.norm(grads),
        "train/lr": schedule(state.step),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  return train_step


def make_eval_sums(config, graphdef, num_classes: int):

  def eval_sums(params, batch):
    images, _ = augment.preprocess_eval(batch["images"], batch["labels"],
                                        num_classes=num_classes, config=config.augment)
    logits = state_lib.merge_model(graphdef, params)(images)
    return accuracy.masked_sums(logits, batch["labels"], batch["mask"])

  return eval_sums


def train_and_evaluate(config, workdir: str) -> tuple[state_lib.TrainState, dict]:
  """Trains to the configured length; returns the final state and the last
  evaluation's metrics."""
  # Read before the data, so a bad init_from fails fast; None when resuming.
  source = pretrained.for_new_run(config, workdir)
  train_split, eval_split = loop.load_splits(config)
  local_batch = config.batch_size // jax.process_count()
  local_eval_batch = config.eval_batch_size // jax.process_count()
  steps_per_epoch = pipeline.steps_per_epoch(train_split, local_batch)
  total_steps, warmup_steps = loop.schedule_steps(config, steps_per_epoch)

  make_model = make_model_fn(config, train_split)
  abstract_params = nnx.to_pure_dict(nnx.split(nnx.eval_shape(make_model))[1])
  if source is not None:  # every check before anything compiles
    dropped = source.check(config, train_split.images.shape[1:], abstract_params)
  schedule = optimizer_lib.make_schedule(config.optimizer, total_steps, warmup_steps)
  tx = optimizer_lib.make_optimizer(config.optimizer, schedule, abstract_params)
  # What makes a checkpoint this model; dtype, attention backend, scan and
  # remat may change between runs (e.g. resuming on another machine).
  identity = {"task": "classification", "variant": config.model.variant,
              "posemb": config.model.posemb, "pool": config.model.pool,
              "num_classes": int(train_split.num_classes),
              "image_shape": list(train_split.images.shape[1:])}
  run = loop.start(config, workdir, make_model=make_model, tx=tx, identity=identity,
                   total_steps=total_steps,
                   initial_params=None if source is None else source.load_encoder)
  if source is not None:
    run.reporter.log(pretrained.describe(source, dropped))
  elif config.get("init_from"):
    run.reporter.log(f"resumed from {workdir}: config.init_from is not loaded again")
  run.reporter.log(f"steps {run.start_step} -> {total_steps} ({steps_per_epoch} steps/epoch), "
                   f"{train_split.total_examples} train / {eval_split.total_examples} eval examples")

  shardings = run.described.shardings
  replicated = parallel.replicated(run.mesh)
  train_step = run.jit(
      make_train_step(config, run.described.graphdef, tx, schedule, train_split.num_classes),
      in_shardings=(shardings, {"images": run.batch_sharding(4), "labels": run.batch_sharding(1)}),
      out_shardings=(shardings, replicated), donate_argnums=0)
  eval_sums = run.jit(
      make_eval_sums(config, run.described.graphdef, train_split.num_classes),
      in_shardings=(run.described.param_shardings,
                    {"images": run.batch_sharding(4), "labels": run.batch_sharding(1),
                     "mask": run.batch_sharding(1)}),
      out_shardings=replicated)

  def evaluate(step: int, state: state_lib.TrainState) -> dict:
    results = {}
    candidates = [("eval", state.params)]
    if state.ema_params is not None:
      candidates.append(("eval_ema", state.ema_params))
    for prefix, params in candidates:
      batches = map(run.to_global,
                    pipeline.eval_batches(eval_split, local_batch_size=local_eval_batch))
      metrics = accuracy.evaluate(functools.partial(eval_sums, params), batches)
      results.update({f"{prefix}/{k}": v for k, v in metrics.items()})
    return loop.report_eval(run, step, results)

  batches = pipeline.train_batches(train_split, local_batch_size=local_batch,
                                   seed=config.seed, start_step=run.start_step)
  return loop.train(run, config, train_step=train_step, batches=batches, evaluate=evaluate)
