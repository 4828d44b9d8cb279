"""DiT / PiT diffusion training (the paper's third case study) and its evaluation.

Training: epsilon-prediction with learned sigma (the improved-DDPM hybrid
loss), classifier-free guidance by label dropout, an EMA of the parameters
that sampling uses and checkpoints hold; resume is exact (model, EMA,
optimizer, RNG and data position all follow from the checkpoint's step).

Data is pixels (uint8 sources, scaled to [-1, 1]) or VAE latents (`npz:`
files written by `python -m pixel_vit.encode_latents`, already scaled);
latent samples are decoded to pixels with `config.vae.weights` when given
(generation: `pixel_vit.diffusion.generation`).

Each evaluation reports the diffusion loss on the eval split (fixed
timesteps and noise, so comparable across steps), writes a class-conditional
sample grid from fixed noise and labels (PNG + TensorBoard), and, when
`config.fid.num_samples > 0`, generates that many samples over all devices
and reports FID / IS / precision / recall / accuracy-on-samples from
`config.fid.features` (see `pixel_vit.evaluation.sample_quality`). `python -m
pixel_vit.sample` runs the same generation on a trained workdir.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pixel_vit import hardware, parallel
from pixel_vit.data import augment, locality, sources
from pixel_vit.diffusion import generation, sampling
from pixel_vit.evaluation import pictures, sample_quality, splits
from pixel_vit.models import dit
from pixel_vit.trainers import loop
from pixel_vit.trainers import state as state_lib


def validate(config, target=None, *, files: bool = True) -> None:
  """Before anything loads or compiles (arguments: `classification.validate`)."""
  target = target or hardware.Target.of(jax.devices())
  loop.validate_common(config, target, files=files)
  dit.validate_model_config(config.model)
  sampling.validate_config(config)
  sample_quality.validate_config(config, target.device_count, files=files)


def make_model_fn(config, split: sources.ImageSplit):
  height, _, channels = split.images.shape[1:]
  return lambda: dit.build_dit(
    config.model,
    image_size=height,
    channels=channels,
    num_classes=split.num_classes,
    rngs=nnx.Rngs(config.seed),
  )


def to_model_space(config, images: jax.Array, key=None, permutation=None) -> jax.Array:
  """A batch as the model sees it: uint8 pixels -> [-1, 1] (flipped at random in
  training when config.augment.flip); latents pass through unchanged. Then
  the pixel `permutation` (data/locality.py), if any."""
  if images.dtype != jnp.uint8:
    return locality.permute(permutation, images.astype(jnp.float32))
  x = augment.normalize(images, config.augment.mean, config.augment.std)
  x = augment.random_flip(key, x) if key is not None and config.augment.flip else x
  return locality.permute(permutation, x)


def diffusion_losses(config, process, model, x0, labels, key, *, drop_key=None) -> dict:
  """Per-example losses at random timesteps and noise drawn from `key`."""
  t_key, noise_key = jax.random.split(key)
  t = process.sample_timesteps(t_key, x0.shape[0])
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_t = process.q_sample(x0, t, noise)
  output = model(x_t, t, labels, key=drop_key)
  return process.training_losses(output, x0, x_t, t, noise, learn_sigma=config.model.learn_sigma)


def make_train_step(config, graphdef, tx, schedule, permutation=None):
  process = generation.diffusion_process(config)

  def train_step(state: state_lib.TrainState, batch: dict):
    flip_key, loss_key, drop_key = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
    x0 = to_model_space(config, batch["images"], flip_key, permutation)

    def loss_fn(params):
      model = state_lib.merge_model(graphdef, params)
      losses = diffusion_losses(
        config, process, model, x0, batch["labels"], loss_key, drop_key=drop_key
      )
      return jnp.mean(losses["loss"]), {k: jnp.mean(v) for k, v in losses.items()}

    (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {f"train/{k}": v for k, v in losses.items()}
    metrics.update({"train/grad_norm": optax.tree.norm(grads), "train/lr": schedule(state.step)})
    return state_lib.apply_gradients(state, grads, tx, config.optimizer.ema_decay), metrics

  return train_step


def make_eval_sums(config, graphdef, permutation=None):
  """Summed losses of one eval batch; timesteps and noise fixed per batch index."""
  process = generation.diffusion_process(config)

  def eval_sums(params, batch_index, batch):
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), batch_index)
    losses = diffusion_losses(
      config,
      process,
      state_lib.merge_model(graphdef, params),
      to_model_space(config, batch["images"], permutation=permutation),
      batch["labels"],
      key,
    )
    sums = {k: jnp.sum(v * batch["mask"]) for k, v in losses.items()}
    return {**sums, "count": jnp.sum(batch["mask"])}

  return eval_sums


# ------------------------------------------------------------------ sampling


def run_generator(run: loop.Run, *, cfg_scale: float) -> generation.Generator:
  """`generation.make_generator` for `run`'s model and data, on its mesh and rules."""
  return generation.make_generator(
    run.config,
    run.described.graphdef,
    run.plan.train_split,
    permutation=run.plan.permutation,
    mesh=run.mesh,
    rules=run.rules,
    abstract_params=run.described.abstract.params,
    cfg_scale=cfg_scale,
  )


def programs(layout: loop.Layout) -> dict[str, parallel.Program]:
  """The jitted programs a run executes: the train step, the evaluation step,
  and the sampler (`pixel_vit.sample`'s, for config.fid.batch_size labels at
  guidance config.sample.cfg_scale; the grid's runs the same at its own
  scale and a smaller batch)."""
  config, plan = layout.config, layout.plan
  graphdef, described = layout.described.graphdef, layout.described
  batch_index = jax.ShapeDtypeStruct((), jnp.int32, sharding=layout.replicated)
  return {
    "train_step": layout.train_program(
      make_train_step(config, graphdef, plan.tx, plan.schedule, plan.permutation)
    ),
    "eval_step": parallel.Program(
      "eval_step",
      make_eval_sums(config, graphdef, plan.permutation),
      args=(
        described.abstract.params,
        batch_index,
        layout.abstract_batch(config.eval_batch_size, with_mask=True),
      ),
      out_shardings=layout.replicated,
    ),
    "sample": generation.sampling_program(
      config,
      graphdef,
      plan.train_split,
      permutation=plan.permutation,
      mesh=layout.mesh,
      rules=layout.rules,
      abstract_params=described.abstract.params,
      cfg_scale=config.sample.cfg_scale,
      batch_size=config.fid.batch_size,
    ),
  }


# ------------------------------------------------------------------ training


def train_and_evaluate(config, workdir: str, *, devices=None) -> tuple[state_lib.TrainState, dict]:
  """Trains to the configured length on `devices` (default: all); returns the
  final state and the last evaluation's metrics."""
  plan = loop.plan(config, make_model_fn)
  run = loop.start(config, workdir, plan, devices=devices)
  run.announce(
    f"diffusion {run.length} on {'latents' if plan.train_split.is_latent else 'pixels'} "
    f"{plan.train_split.images.shape[1:]}, lr {config.optimizer.lr:.3g}"
  )
  built = programs(run)
  train_step, eval_sums = run.jit(built["train_step"]), run.jit(built["eval_step"])
  grid_generator = run_generator(run, cfg_scale=config.sample.grid_cfg_scale)
  fid_generator = (
    run_generator(run, cfg_scale=config.sample.cfg_scale) if config.fid.num_samples else None
  )
  extractor = sample_quality.feature_extractor(config) if config.fid.num_samples else None
  reference = (
    sample_quality.reference_for(config, extractor, plan.train_split, fid_generator.decode)
    if extractor is not None
    else None
  )

  def evaluate(step: int, state: state_lib.TrainState) -> dict:
    params = state.ema_params if state.ema_params is not None else state.params
    batches = list(run.eval_batches())
    totals = splits.sum_over_batches(
      lambda index, batch: eval_sums(state.params, jnp.int32(index), batch), batches
    )
    results = {f"eval/{k}": totals[k] / totals["count"] for k in ("loss", "mse", "vb")}
    image = sample_quality.sample_grid(config, grid_generator, params)
    if run.reporter.is_main:
      path = os.path.join(workdir, "pictures", f"samples_{step:07d}.png")
      pictures.save_png(path, image)
      rows = generation.grid_labels(config, plan.train_split.num_classes).tolist()
      run.reporter.log(
        f"wrote {path} (rows: classes {rows}, guidance {config.sample.grid_cfg_scale})"
      )
    run.reporter.images(step, {"diffusion/samples": image[None]})
    if extractor is not None:
      metrics, _, _ = sample_quality.sample_metrics(
        config, fid_generator, params, extractor, reference, num_samples=config.fid.num_samples
      )
      results.update({f"samples/{k}": v for k, v in metrics.items()})
    return loop.report_eval(run, step, results)

  return loop.train(run, train_step=train_step, evaluate=evaluate)
