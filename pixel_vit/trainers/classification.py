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

from pixel_vit import parallel
from pixel_vit.data import augment, locality, sources
from pixel_vit.evaluation import accuracy
from pixel_vit.models import vit
from pixel_vit.trainers import loop, pretrained
from pixel_vit.trainers import state as state_lib


def validate(config, target=None, *, files: bool = True) -> None:
  """Before anything loads or compiles, for `target` (default: this run's
  devices); `files=False` leaves out what checks the run's files (data,
  init_from), which compiling ahead of time does not read."""
  loop.validate_common(config, target, files=files)
  if files:
    pretrained.check_config(config)  # init_from vs config.model, when the path exists


def make_model_fn(config, split: sources.ImageSplit):
  height, _, channels = split.images.shape[1:]
  return lambda: vit.build_classifier(
    config.model,
    image_size=height,
    channels=channels,
    num_classes=split.num_classes,
    rngs=nnx.Rngs(config.seed),
    pixel_stats=(config.augment.mean, config.augment.std),
  )


def make_train_step(
  config, graphdef, tx, schedule, num_classes: int, permutation=None, *, augment_config=None
):
  """`permutation` (data/locality.py) scrambles the augmented images' pixels;
  `augment_config` (default config.augment) is what runs on the device."""
  frozen = tuple(config.optimizer.get("freeze", ()) or ())
  augment_config = augment_config or config.augment

  def train_step(state: state_lib.TrainState, batch: dict):
    step_key = jax.random.fold_in(state.rng, state.step)
    augment_key, drop_key = jax.random.split(step_key)
    images, targets = augment.augment_batch(
      augment_key, batch["images"], batch["labels"], num_classes=num_classes, config=augment_config
    )
    images = locality.permute(permutation, images)

    def loss_fn(params):
      params = {
        name: jax.lax.stop_gradient(value) if name in frozen else value
        for name, value in params.items()
      }
      logits = state_lib.merge_model(graphdef, params)(images, key=drop_key)
      return optax.softmax_cross_entropy(logits, targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {
      "train/loss": loss,
      "train/accuracy": (logits.argmax(-1) == targets.argmax(-1)).mean(),
      "train/grad_norm": optax.tree.norm(grads),
      "train/lr": schedule(state.step),
    }
    return state_lib.apply_gradients(state, grads, tx, config.optimizer.ema_decay), metrics

  return train_step


def make_eval_sums(config, graphdef, num_classes: int, permutation=None):

  def eval_sums(params, batch):
    images, _ = augment.preprocess_eval(
      batch["images"], batch["labels"], num_classes=num_classes, config=config.augment
    )
    images = locality.permute(permutation, images)
    logits = state_lib.merge_model(graphdef, params)(images)
    return accuracy.masked_sums(logits, batch["labels"], batch["mask"])

  return eval_sums


def programs(layout: loop.Layout) -> dict[str, parallel.Program]:
  """The jitted programs a run executes: the train step and the evaluation
  step (run on the parameters and on their EMA)."""
  config, plan = layout.config, layout.plan
  graphdef, num_classes = layout.described.graphdef, plan.train_split.num_classes
  return {
    "train_step": layout.train_program(
      make_train_step(
        config,
        graphdef,
        plan.tx,
        plan.schedule,
        num_classes,
        plan.permutation,
        augment_config=plan.device_augment,
      )
    ),
    "eval_step": parallel.Program(
      "eval_step",
      make_eval_sums(config, graphdef, num_classes, plan.permutation),
      args=(
        layout.described.abstract.params,
        layout.abstract_batch(config.eval_batch_size, with_mask=True),
      ),
      out_shardings=layout.replicated,
    ),
  }


def train_and_evaluate(config, workdir: str, *, devices=None) -> tuple[state_lib.TrainState, dict]:
  """Trains to the configured length on `devices` (default: all); returns the
  final state and the last evaluation's metrics."""
  # Read before the data, so a bad init_from fails fast; None when resuming.
  source = pretrained.for_new_run(config, workdir)
  plan = loop.plan(config, make_model_fn)
  train_split, eval_split = plan.train_split, plan.eval_split
  if source is not None:  # every check before anything compiles
    changes = source.check(config, train_split.images.shape[1:], plan.shapes.params)
  run = loop.start(
    config,
    workdir,
    plan,
    initial_params=None if source is None else source.load_encoder,
    devices=devices,
  )
  run.announce(
    f"{run.length}, {train_split.total_examples} train / {eval_split.total_examples} eval examples"
  )
  if source is not None:
    run.reporter.log(pretrained.describe(source, changes))
  elif config.get("init_from"):
    run.reporter.log(f"resumed from {workdir}: config.init_from is not loaded again")

  jitted = {name: run.jit(program) for name, program in programs(run).items()}
  train_step, eval_sums = jitted["train_step"], jitted["eval_step"]

  def evaluate(step: int, state: state_lib.TrainState) -> dict:
    results = {}
    candidates = [("eval", state.params)]
    if state.ema_params is not None:
      candidates.append(("eval_ema", state.ema_params))
    for prefix, params in candidates:
      metrics = accuracy.evaluate(functools.partial(eval_sums, params), run.eval_batches())
      results.update({f"{prefix}/{k}": v for k, v in metrics.items()})
    return loop.report_eval(run, step, results)

  return loop.train(run, train_step=train_step, evaluate=evaluate)
