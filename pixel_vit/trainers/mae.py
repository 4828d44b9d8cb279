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

from pixel_vit import parallel
from pixel_vit.data import augment, locality, sources
from pixel_vit.evaluation import pictures, splits
from pixel_vit.models import mae, vit
from pixel_vit.trainers import loop
from pixel_vit.trainers import state as state_lib

# Examples shown in the reconstruction grid (the first ones of the eval split).
GRID_EXAMPLES = 8


def validate(config, target=None, *, files: bool = True) -> None:
  """Before anything loads or compiles (arguments: `classification.validate`)."""
  loop.validate_common(config, target, files=files)
  mae.validate_decoder_config(config.model)
  if not 0.0 < config.mask_ratio < 1.0:
    raise ValueError(f"config.mask_ratio={config.mask_ratio!r} must be in (0, 1).")
  if config.data.get("image_size"):  # else checked once the data says (check_data)
    mae.validate_mask_ratio(config.mask_ratio, config.model, config.data.image_size)


def check_data(config, plan: loop.Plan) -> None:
  """What needs the data: the mask ratio masks and keeps tokens at this image
  size. Before anything compiles."""
  mae.validate_mask_ratio(config.mask_ratio, config.model, plan.train_split.images.shape[1])


def make_model_fn(config, split: sources.ImageSplit):
  height, _, channels = split.images.shape[1:]
  return lambda: mae.build_mae(
    config.model,
    image_size=height,
    channels=channels,
    rngs=nnx.Rngs(config.seed),
    pixel_stats=(config.augment.mean, config.augment.std),
  )


def _targets(config, images):
  _, patch = vit.parse_variant(config.model.variant)
  return mae.pixel_targets(
    images,
    patch,
    norm_pix_loss=config.model.norm_pix_loss,
    norm_pix_window=config.model.norm_pix_window,
  )


def make_train_step(
  config, graphdef, tx, schedule, num_classes: int, permutation=None, *, augment_config=None
):
  """`permutation` (data/locality.py) scrambles the augmented images' pixels;
  the targets are the scrambled pixels. `augment_config` (default
  config.augment) is what runs on the device."""
  augment_config = augment_config or config.augment

  def train_step(state: state_lib.TrainState, batch: dict):
    step_key = jax.random.fold_in(state.rng, state.step)
    augment_key, mask_key, drop_key = jax.random.split(step_key, 3)
    images, _ = augment.augment_batch(
      augment_key, batch["images"], batch["labels"], num_classes=num_classes, config=augment_config
    )
    images = locality.permute(permutation, images)
    targets = _targets(config, images)

    def loss_fn(params):
      model = state_lib.merge_model(graphdef, params)
      pred, mask = model(images, mask_key=mask_key, mask_ratio=config.mask_ratio, key=drop_key)
      return mae.masked_mse(pred, targets, mask)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    metrics = {
      "train/loss": loss,
      "train/grad_norm": optax.tree.norm(grads),
      "train/lr": schedule(state.step),
    }
    return state_lib.apply_gradients(state, grads, tx, config.optimizer.ema_decay), metrics

  return train_step


def _eval_mask_key(config, batch_index):
  """Fixed masks for evaluation: the same examples get the same masks every time."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), batch_index)


def make_eval_sums(config, graphdef, num_classes: int, permutation=None):

  def eval_sums(params, batch_index, batch):
    images, _ = augment.preprocess_eval(
      batch["images"], batch["labels"], num_classes=num_classes, config=config.augment
    )
    images = locality.permute(permutation, images)
    pred, mask = state_lib.merge_model(graphdef, params)(
      images, mask_key=_eval_mask_key(config, batch_index), mask_ratio=config.mask_ratio
    )
    per_example = mae.masked_mse_per_example(pred, _targets(config, images), mask)
    return {"loss": jnp.sum(per_example * batch["mask"]), "count": jnp.sum(batch["mask"])}

  return eval_sums


def make_reconstruct(config, graphdef, num_classes: int, permutation=None):
  """Params, batch -> the four grid columns as float images in [0, 1]; with a
  pixel permutation the model works on scrambled pixels and the columns are
  put back in image order."""
  _, patch = vit.parse_variant(config.model.variant)
  mean = jnp.asarray(config.augment.mean, jnp.float32)
  std = jnp.asarray(config.augment.std, jnp.float32)

  def reconstruct(params, batch):
    images, _ = augment.preprocess_eval(
      batch["images"], batch["labels"], num_classes=num_classes, config=config.augment
    )
    images = locality.permute(permutation, images)
    pred, mask = state_lib.merge_model(graphdef, params)(
      images, mask_key=_eval_mask_key(config, 0), mask_ratio=config.mask_ratio
    )
    recon = mae.predictions_as_images(
      pred,
      images,
      patch,
      norm_pix_loss=config.model.norm_pix_loss,
      norm_pix_window=config.model.norm_pix_window,
    )
    pixel_mask = mae.mask_as_image(mask, patch, *images.shape[1:3])
    show = lambda x: jnp.clip(x * std + mean, 0.0, 1.0)
    original = show(images)
    masked = jnp.where(pixel_mask > 0, 0.5, original)  # grey where masked
    pasted = jnp.where(pixel_mask > 0, show(recon), original)
    columns = (original, masked, show(recon), pasted)
    return columns if permutation is None else tuple(map(permutation.unpermute, columns))

  return reconstruct


def programs(layout: loop.Layout) -> dict[str, parallel.Program]:
  """The jitted programs a run executes: the train step, the masked-loss
  evaluation step and the reconstruction grid's."""
  config, plan = layout.config, layout.plan
  graphdef, permutation = layout.described.graphdef, plan.permutation
  num_classes = plan.train_split.num_classes
  params = layout.described.abstract.params
  eval_batch = layout.abstract_batch(config.eval_batch_size, with_mask=True)
  batch_index = jax.ShapeDtypeStruct((), jnp.int32, sharding=layout.replicated)
  return {
    "train_step": layout.train_program(
      make_train_step(
        config,
        graphdef,
        plan.tx,
        plan.schedule,
        num_classes,
        permutation,
        augment_config=plan.device_augment,
      )
    ),
    "eval_step": parallel.Program(
      "eval_step",
      make_eval_sums(config, graphdef, num_classes, permutation),
      args=(params, batch_index, eval_batch),
      out_shardings=layout.replicated,
    ),
    "reconstruct": parallel.Program(
      "reconstruct",
      make_reconstruct(config, graphdef, num_classes, permutation),
      args=(params, eval_batch),
      out_shardings=layout.replicated,
    ),
  }


def train_and_evaluate(config, workdir: str, *, devices=None) -> tuple[state_lib.TrainState, dict]:
  """Pre-trains to the configured length on `devices` (default: all); returns
  the final state and the last evaluation's metrics."""
  plan = loop.plan(config, make_model_fn)
  check_data(config, plan)
  run = loop.start(config, workdir, plan, devices=devices)
  run.announce(f"MAE {run.length}, mask ratio {config.mask_ratio}, lr {config.optimizer.lr:.3g}")

  jitted = {name: run.jit(program) for name, program in programs(run).items()}
  train_step, eval_sums, reconstruct = (
    jitted[name] for name in ("train_step", "eval_step", "reconstruct")
  )

  def evaluate(step: int, state: state_lib.TrainState) -> dict:
    batches = list(run.eval_batches())
    totals = splits.sum_over_batches(
      lambda index, batch: eval_sums(state.params, jnp.int32(index), batch), batches
    )
    results = {"eval/loss": totals["loss"] / totals["count"], "eval/count": totals["count"]}
    columns = [
      np.asarray(c)[:GRID_EXAMPLES] for c in jax.device_get(reconstruct(state.params, batches[0]))
    ]
    image = pictures.grid([pictures.to_uint8(c) for c in columns])
    if run.reporter.is_main:
      path = os.path.join(workdir, "pictures", f"reconstructions_{step:07d}.png")
      pictures.save_png(path, image)
      run.reporter.log(f"wrote {path} (original | masked | reconstruction | visible pasted)")
    run.reporter.images(step, {"mae/reconstructions": image[None]})
    return loop.report_eval(run, step, results)

  return loop.train(run, train_step=train_step, evaluate=evaluate)
