"""MAE pre-training (the paper's second case study): one train loop.

Evaluation reports the masked reconstruction loss over the whole eval split
(fixed masks, so numbers are comparable across steps) and writes a PNG grid —
original | masked input | reconstruction | reconstruction with the visible
pixels pasted back — to `<workdir>/pictures/` and TensorBoard.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixel_vit import configuration, parallel
from pixel_vit import optimizer as optimizer_lib
from pixel_vit.data import augment, pipeline, sources
from pixel_vit.evaluation import pictures
from pixel_vit.models import mae, vit
from pixel_vit.trainers import loop
from pixel_vit.trainers import state as state_lib

# Examples shown in the reconstruction grid (the first ones of the eval split).
GRID_EXAMPLES = 8


def validate(config) -> None:
  configuration.validate_model(config.model)
  configuration.validate_decoder(config.model)
  configuration.validate_optimizer(config.optimizer)
  configuration.validate_data(config.data)
  augment.validate_augment_config(config.augment)
  configuration.validate_run(config, jax.device_count(), jax.process_count())
  if not 0.0 < config.mask_ratio < 1.0:
    raise ValueError(f"config.mask_ratio={config.mask_ratio!r} must be in (0, 1).")
  if config.total_steps == 0 and config.total_epochs <= 0:
    raise ValueError("config.total_steps is 0 and config.total_epochs is not > 0: "
                     "set one of them.")


def make_model_fn(config, split: sources.ImageSplit):
  height, _, channels = split.images.shape[1:]
  return lambda: mae.build_mae(config.model, image_size=height, channels=channels,
                               rngs=nnx.Rngs(config.seed))


def _targets(config, images):
  _, patch = vit.parse_variant(config.model.variant)
  return mae.pixel_targets(images, patch, norm_pix_loss=config.model.norm_pix_loss,
                           norm_pix_window=config.model.norm_pix_window)


def make_train_step(config, graphdef, tx, schedule, num_classes: int):

  def train_step(state: state_lib.TrainState, batch: dict):
    step_key = jax.random.fold_in(state.rng, state.step)
    augment_key, mask_key, drop_key = jax.random.split(step_key, 3)
    images, _ = augment.augment_batch(augment_key, batch["images"], batch["labels"],
                                      num_classes=num_classes, config=config.augment)
    targets = _targets(config, images)

    def loss_fn(params):
      model = state_lib.merge_model(graphdef, params)
      pred, mask = model(images, mask_key=mask_key, mask_ratio=config.mask_ratio,
                         key=drop_key)
      return mae.masked_mse(pred, targets, mask)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = (None if state.ema_params is None
           else state_lib.ema_update(state.ema_params, params, config.optimizer.ema_decay))
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
               "train/lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics

  return train_step


def _eval_mask_key(config, batch_index):
  """Fixed masks for evaluation: the same examples get the same masks every time."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), batch_index)


def make_eval_sums(config, graphdef, num_classes: int):

  def eval_sums(params, batch, batch_index):
    images, _ = augment.preprocess_eval(batch["images"], batch["labels"],
                                        num_classes=num_classes, config=config.augment)
    pred, mask = state_lib.merge_model(graphdef, params)(
        images, mask_key=_eval_mask_key(config, batch_index), mask_ratio=config.mask_ratio)
    per_token = jnp.mean(jnp.square(pred - _targets(config, images)), axis=-1)
    per_example = jnp.sum(per_token * mask, axis=1) / jnp.sum(mask, axis=1)
    return {"loss": jnp.sum(per_example * batch["mask"]), "count": jnp.sum(batch["mask"])}

  return eval_sums


def make_reconstruct(config, graphdef, num_classes: int):
  """Params, batch -> the four grid columns as float images in [0, 1]."""
  _, patch = vit.parse_variant(config.model.variant)
  mean = jnp.asarray(config.augment.mean, jnp.float32)
  std = jnp.asarray(config.augment.std, jnp.float32)

  def reconstruct(params, batch):
    images, _ = augment.preprocess_eval(batch["images"], batch["labels"],
                                        num_classes=num_classes, config=config.augment)
    pred, mask = state_lib.merge_model(graphdef, params)(
        images, mask_key=_eval_mask_key(config, 0), mask_ratio=config.mask_ratio)
    recon = mae.predictions_as_images(pred, images, patch,
                                      norm_pix_loss=config.model.norm_pix_loss,
                                      norm_pix_window=config.model.norm_pix_window)
    pixel_mask = mae.mask_as_image(mask, patch, *images.shape[1:3])
    show = lambda x: jnp.clip(x * std + mean, 0.0, 1.0)
    original = show(images)
    masked = jnp.where(pixel_mask > 0, 0.5, original)  # grey where masked
    pasted = jnp.where(pixel_mask > 0, show(recon), original)
    return original, masked, show(recon), pasted

  return reconstruct


def train_and_evaluate(config, workdir: str) -> tuple[state_lib.TrainState, dict]:
  """Pre-trains to the configured length; returns the final state and the
  last evaluation's metrics."""
  train_split, eval_split = loop.load_splits(config)
  local_batch = config.batch_size // jax.process_count()
  local_eval_batch = config.eval_batch_size // jax.process_count()
  steps_per_epoch = pipeline.steps_per_epoch(train_split, local_batch)
  total_steps, warmup_steps = loop.schedule_steps(config, steps_per_epoch)
  num_classes = train_split.num_classes

  make_model = make_model_fn(config, train_split)
  abstract_params = nnx.to_pure_dict(nnx.split(nnx.eval_shape(make_model))[1])
  schedule = optimizer_lib.make_schedule(config.optimizer, total_steps, warmup_steps)
  tx = optimizer_lib.make_optimizer(config.optimizer, schedule, abstract_params)
  decoder = config.model.decoder
  identity = {"task": "mae", "variant": config.model.variant, "posemb": config.model.posemb,
              "decoder": [decoder.width, decoder.depth, decoder.heads, decoder.mlp_dim,
                          decoder.posemb],
              "image_shape": list(train_split.images.shape[1:])}
  run = loop.start(config, workdir, make_model=make_model, tx=tx, identity=identity,
                   total_steps=total_steps)
  run.reporter.log(f"MAE steps {run.start_step} -> {total_steps} ({steps_per_epoch} "
                   f"steps/epoch), mask ratio {config.mask_ratio}, lr {config.optimizer.lr:.3g}")

  graphdef, shardings = run.described.graphdef, run.described.shardings
  replicated = parallel.replicated(run.mesh)
  image_batch = {"images": run.batch_sharding(4), "labels": run.batch_sharding(1)}
  eval_batch = {**image_batch, "mask": run.batch_sharding(1)}
  train_step = run.jit(make_train_step(config, graphdef, tx, schedule, num_classes),
                       in_shardings=(shardings, image_batch),
                       out_shardings=(shardings, replicated), donate_argnums=0)
  eval_sums = run.jit(make_eval_sums(config, graphdef, num_classes),
                      in_shardings=(run.described.param_shardings, eval_batch, replicated),
                      out_shardings=replicated)
  reconstruct = run.jit(make_reconstruct(config, graphdef, num_classes),
                        in_shardings=(run.described.param_shardings, eval_batch),
                        out_shardings=replicated)

  def evaluate(step: int, state: state_lib.TrainState) -> dict:
    totals = {"loss": 0.0, "count": 0.0}
    grid_batch = None
    for index, local in enumerate(
        pipeline.eval_batches(eval_split, local_batch_size=local_eval_batch)):
      batch = run.to_global(local)
      grid_batch = grid_batch or batch
      sums = jax.device_get(eval_sums(state.params, batch, jnp.int32(index)))
      for k in totals:
        totals[k] += float(sums[k])
    results = {"eval/loss": totals["loss"] / totals["count"], "eval/count": totals["count"]}
    columns = [np.asarray(c)[:GRID_EXAMPLES]
               for c in jax.device_get(reconstruct(state.params, grid_batch))]
    image = pictures.grid([pictures.to_uint8(c) for c in columns])
    if run.reporter.is_main:
      path = os.path.join(workdir, "pictures", f"reconstructions_{step:07d}.png")
      pictures.save_png(path, image)
      run.reporter.log(f"wrote {path} (original | masked | reconstruction | visible pasted)")
    run.reporter.images(step, {"mae/reconstructions": image[None]})
    return loop.report_eval(run, step, results)

  batches = pipeline.train_batches(train_split, local_batch_size=local_batch,
                                   seed=config.seed, start_step=run.start_step)
  return loop.train(run, config, train_step=train_step, batches=batches, evaluate=evaluate)
