"""DiT / PiT diffusion training (the paper's third case study), sampling and evaluation.

Training: epsilon-prediction with learned sigma (the improved-DDPM hybrid
loss), classifier-free guidance by label dropout, an EMA of the parameters
that sampling uses and checkpoints hold; resume is exact (model, EMA,
optimizer, RNG and data position all follow from the checkpoint's step).

Data is pixels (uint8 sources, scaled to [-1, 1]) or VAE latents (`npz:`
files written by `python -m pixel_vit.data.encode_latents`, already scaled);
latent samples are decoded to pixels with `config.vae.weights` when given.

Each evaluation reports the diffusion loss on the eval split (fixed
timesteps and noise, so comparable across steps), writes a class-conditional
sample grid from fixed noise and labels (PNG + TensorBoard), and, when
`config.fid.num_samples > 0`, generates that many samples over all devices
and reports FID / IS / precision / recall / accuracy-on-samples from
`config.fid.features` (see `pixel_vit.evaluation`). `python -m
pixel_vit.sample` runs the same generation on a trained workdir.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from pixel_vit import configuration, parallel
from pixel_vit.data import augment, locality, pipeline, sources
from pixel_vit.diffusion import gaussian, sampling
from pixel_vit.evaluation import pictures, splits
from pixel_vit.models import dit
from pixel_vit.trainers import loop, pretrained
from pixel_vit.trainers import state as state_lib

FEATURE_KINDS = ("classifier", "inception")


def validate(config) -> None:
  configuration.validate_common(config, jax.device_count(), jax.process_count())
  configuration.validate_diffusion(config, jax.device_count())


def diffusion_process(config) -> gaussian.GaussianDiffusion:
  return gaussian.GaussianDiffusion.create(config.diffusion.schedule,
                                           config.diffusion.num_timesteps)


def sampling_process(config) -> gaussian.GaussianDiffusion:
  """The training diffusion respaced to `config.sample.steps` (e.g. 250 or 'ddim50')."""
  full = diffusion_process(config)
  return full.respace(gaussian.space_timesteps(full.num_timesteps, str(config.sample.steps)))


def make_model_fn(config, split: sources.ImageSplit):
  height, _, channels = split.images.shape[1:]
  return lambda: dit.build_dit(config.model, image_size=height, channels=channels,
                               num_classes=split.num_classes, rngs=nnx.Rngs(config.seed))


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
  return process.training_losses(output, x0, x_t, t, noise,
                                 learn_sigma=config.model.learn_sigma)


def make_train_step(config, graphdef, tx, schedule, permutation=None):
  process = diffusion_process(config)

  def train_step(state: state_lib.TrainState, batch: dict):
    flip_key, loss_key, drop_key = jax.random.split(
        jax.random.fold_in(state.rng, state.step), 3)
    x0 = to_model_space(config, batch["images"], flip_key, permutation)

    def loss_fn(params):
      model = state_lib.merge_model(graphdef, params)
      losses = diffusion_losses(config, process, model, x0, batch["labels"], loss_key,
                                drop_key=drop_key)
      return jnp.mean(losses["loss"]), {k: jnp.mean(v) for k, v in losses.items()}

    (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {f"train/{k}": v for k, v in losses.items()}
    metrics.update({"train/grad_norm": optax.tree.norm(grads), "train/lr": schedule(state.step)})
    return state_lib.apply_gradients(state, grads, tx, config.optimizer.ema_decay), metrics

  return train_step


def make_eval_sums(config, graphdef, permutation=None):
  """Summed losses of one eval batch; timesteps and noise fixed per batch index."""
  process = diffusion_process(config)

  def eval_sums(params, batch_index, batch):
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), batch_index)
    losses = diffusion_losses(config, process, state_lib.merge_model(graphdef, params),
                              to_model_space(config, batch["images"], permutation=permutation),
                              batch["labels"], key)
    sums = {k: jnp.sum(v * batch["mask"]) for k, v in losses.items()}
    return {**sums, "count": jnp.sum(batch["mask"])}

  return eval_sums


# ------------------------------------------------------------------ sampling


@dataclasses.dataclass(frozen=True)
class Generator:
  """Turns (params, labels, batch index) into images in [0, 1] on the mesh."""
  sample_shape: tuple[int, int, int]  # H, W, C of what the model generates
  num_classes: int
  run: loop.Run
  decode: object  # latents -> [0, 1] images (a VAE), or None for pixels
  _sample: object  # jitted

  def images(self, params, labels: np.ndarray, batch_index: int, seed: int) -> jax.Array:
    """Samples for `labels` (a global batch) from noise fixed by (seed, batch_index)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), batch_index)
    labels = np.asarray(labels, np.int32)  # the same whole batch on every process
    labels = jax.make_array_from_callback(
        labels.shape, parallel.batch_sharding(self.run.mesh, self.run.rules, 1),
        lambda index: labels[index])
    samples = self._sample(params, labels, key)
    return samples if self.decode is None else self.decode(samples)


def make_generator(config, run: loop.Run, graphdef, train_split: sources.ImageSplit,
                   *, cfg_scale: float) -> Generator:
  """A jitted sampler (config.sample.*) with guidance `cfg_scale`, sharded over the
  batch. With a pixel permutation the model generates scrambled images; they
  are put back in image order before decoding, pictures and metrics."""
  process = sampling_process(config)
  shape = tuple(train_split.images.shape[1:])
  permutation = locality.permutation_for(config.data, *shape[:2])
  channels = shape[-1]
  decode = latent_decoder(config, train_split)
  sample_fn = sampling.sampler(config.sample.sampler)
  options = dict(learn_sigma=config.model.learn_sigma,
                 clip_denoised=not train_split.is_latent)
  if config.sample.sampler == "ddim":
    options["eta"] = config.sample.eta

  def sample(params, labels, key):
    model = state_lib.merge_model(graphdef, params)
    model_fn = sampling.guided(lambda x, t, y: model(x, t, y), cfg_scale=cfg_scale,
                               null_label=model.null_label, channels=channels)
    noise_key, step_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, (labels.shape[0], *shape), jnp.float32)
    noise = parallel.constrain(noise, ("batch", None, None, None))
    x0 = sample_fn(model_fn, process, noise, labels, step_key, **options)
    return samples_as_images(x0, permutation=permutation, latent=train_split.is_latent)

  labels_sharding = parallel.batch_sharding(run.mesh, run.rules, 1)
  jitted = run.jit(sample, in_shardings=(run.described.param_shardings, labels_sharding,
                                         parallel.replicated(run.mesh)),
                   out_shardings=parallel.batch_sharding(run.mesh, run.rules, 4))
  return Generator(shape, train_split.num_classes, run, decode, jitted)


def samples_as_images(x0: jax.Array, *, permutation, latent: bool) -> jax.Array:
  """Generated x0 -> pixels in image order: un-permuted (data/locality.py) and,
  for pixel data, [-1, 1] -> [0, 1]; latents stay latents (decoded later)."""
  if permutation is not None:
    x0 = permutation.unpermute(x0)
  return x0 if latent else jnp.clip((x0 + 1.0) / 2.0, 0.0, 1.0)


def latent_decoder(config, train_split: sources.ImageSplit):
  """For latent data: scaled latents -> images in [0, 1] (None for pixel data).

  With `config.vae.weights` the VAE decodes them; its weights are a jit
  argument, not constants baked into the program. Without, a preview of the
  first three latent channels is shown.
  """
  if not train_split.is_latent:
    return None
  if not config.vae.weights:
    return jax.jit(lambda z: jnp.clip((z[..., :3] / 4.0 + 1.0) / 2.0, 0.0, 1.0))
  from pixel_vit.models import vae
  graphdef, weights = nnx.split(vae.load_vae(config.vae.weights))
  decode = jax.jit(lambda w, z: nnx.merge(graphdef, w).decode_latents(z))
  return lambda z: decode(weights, z)


def grid_labels(config, num_classes: int) -> np.ndarray:
  labels = np.asarray(config.sample.grid_labels or range(min(num_classes, 10)), np.int32)
  if labels.max() >= num_classes:
    raise ValueError(f"config.sample.grid_labels={tuple(config.sample.grid_labels)} has a "
                     f"label >= the data's {num_classes} classes.")
  return labels


def sample_grid(config, generator: Generator, params) -> np.ndarray:
  """Rows = config.sample.grid_labels, columns = fixed noise: comparable across steps."""
  labels = grid_labels(config, generator.num_classes)
  columns = config.sample.grid_columns
  flat = np.repeat(labels, columns)
  mesh = generator.run.mesh.shape
  batch = padded_size(len(flat), mesh["data"] * mesh["fsdp"])
  images = gather(generator.images(params, np.resize(flat, batch), 0, config.sample.seed))
  images = images[:len(flat)].reshape(len(labels), columns, *images.shape[1:])
  return pictures.grid([pictures.to_uint8(images[:, j]) for j in range(columns)])


def padded_size(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def gather(x: jax.Array) -> np.ndarray:
  """A global array, whole, on every process."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate(config, generator: Generator, params, num_samples: int, *,
             reporter=None) -> tuple[np.ndarray, np.ndarray]:
  """`num_samples` images in [0, 1] (on every process) with balanced labels
  (sample i has label i mod num_classes), in batches of config.fid.batch_size
  over all devices."""
  batch = config.fid.batch_size
  labels = np.arange(num_samples) % generator.num_classes
  images, start = [], time.time()
  for index, first in enumerate(range(0, num_samples, batch)):
    chunk = np.resize(labels[first:first + batch], batch)  # the last batch is padded
    images.append(gather(generator.images(params, chunk, index, config.sample.seed + 1)))
    done = min(first + batch, num_samples)
    if reporter is not None:
      rate = done / (time.time() - start)
      reporter.log(f"sampled {done}/{num_samples} ({rate:.2f} samples/s, "
                   f"ETA {(num_samples - done) / rate:.0f} s)")
  return np.concatenate(images)[:num_samples], labels


def feature_extractor(config):
  """`classifier:WORKDIR` or `inception:WEIGHTS` -> an extractor (or None if off)."""
  spec = config.fid.features
  if not spec:
    return None
  from pixel_vit.evaluation import features
  kind, _, where = spec.partition(":")
  if kind == "classifier":
    return features.classifier_extractor(where)
  return features.inception_extractor(where)


def reference_for(config, extractor, train_split: sources.ImageSplit, decode):
  """The real-data statistics samples are compared with: a stats file
  (`config.fid.reference`, ADM's npz format) or features of the train split."""
  from pixel_vit.evaluation import fid
  if config.fid.reference:
    return fid.load_reference(config.fid.reference)
  count = min(len(train_split.images), config.fid.reference_examples)
  real = train_split.images[:count]
  if train_split.is_latent:
    if not config.vae.weights:  # the preview decoder's images are not comparable
      raise ValueError("config.fid.features scores images, and these data are latents: set "
                       "config.vae.weights to decode them.")
    batch = config.fid.batch_size
    real = np.concatenate([np.asarray(decode(jnp.asarray(real[i:i + batch])))
                           for i in range(0, count, batch)])
  else:
    real = real.astype(np.float32) / 255.0
  return fid.reference_from_images(extractor, real, batch_size=config.fid.batch_size)


def sample_metrics(config, generator: Generator, params, extractor, reference, *,
                   num_samples: int, reporter=None) -> tuple[dict, np.ndarray, np.ndarray]:
  from pixel_vit.evaluation import fid
  images, labels = generate(config, generator, params, num_samples, reporter=reporter)
  metrics = fid.sample_metrics(extractor, images, labels, reference,
                               batch_size=config.fid.batch_size)
  return metrics, images, labels


# ------------------------------------------------------------------ training


def identity_of(config, split: sources.ImageSplit) -> dict:
  return {"task": "diffusion", "variant": config.model.variant, "posemb": config.model.posemb,
          "learn_sigma": config.model.learn_sigma, "num_classes": split.num_classes,
          "image_shape": list(split.images.shape[1:]), "latent": split.is_latent}


def train_and_evaluate(config, workdir: str, *, devices=None
                       ) -> tuple[state_lib.TrainState, dict]:
  """Trains to the configured length on `devices` (default: all); returns the
  final state and the last evaluation's metrics."""
  plan = loop.plan(config, make_model_fn)
  run = loop.start(config, workdir, plan, identity=identity_of(config, plan.train_split),
                   devices=devices)
  length = configuration.describe_length(config, run.start_step, plan.total_steps,
                                        plan.steps_per_epoch)
  run.announce(
      f"diffusion {length} on {'latents' if plan.train_split.is_latent else 'pixels'} "
      f"{plan.train_split.images.shape[1:]}, lr {config.optimizer.lr:.3g}")
  graphdef, shardings = run.described.graphdef, run.described.shardings
  replicated = parallel.replicated(run.mesh)
  permutation = locality.permutation_for(config.data, *plan.train_split.images.shape[1:3])
  train_step = run.jit(make_train_step(config, graphdef, plan.tx, plan.schedule, permutation),
                       in_shardings=(shardings, run.batch_shardings()),
                       out_shardings=(shardings, replicated), donate_argnums=0)
  eval_sums = run.jit(make_eval_sums(config, graphdef, permutation),
                      in_shardings=(run.described.param_shardings, replicated,
                                    run.batch_shardings(with_mask=True)),
                      out_shardings=replicated)
  grid_generator = make_generator(config, run, graphdef, plan.train_split,
                                  cfg_scale=config.sample.grid_cfg_scale)
  fid_generator = (make_generator(config, run, graphdef, plan.train_split,
                                  cfg_scale=config.sample.cfg_scale)
                   if config.fid.num_samples else None)
  extractor = feature_extractor(config) if config.fid.num_samples else None
  reference = (reference_for(config, extractor, plan.train_split, fid_generator.decode)
               if extractor is not None else None)

  def evaluate(step: int, state: state_lib.TrainState) -> dict:
    params = state.ema_params if state.ema_params is not None else state.params
    batches = [run.to_global(b) for b in
               pipeline.eval_batches(plan.eval_split, local_batch_size=plan.local_eval_batch)]
    totals = splits.sum_over_batches(
        lambda index, batch: eval_sums(state.params, jnp.int32(index), batch), batches)
    results = {f"eval/{k}": totals[k] / totals["count"] for k in ("loss", "mse", "vb")}
    image = sample_grid(config, grid_generator, params)
    if run.reporter.is_main:
      path = os.path.join(workdir, "pictures", f"samples_{step:07d}.png")
      pictures.save_png(path, image)
      rows = grid_labels(config, plan.train_split.num_classes).tolist()
      run.reporter.log(f"wrote {path} (rows: classes {rows}, guidance "
                       f"{config.sample.grid_cfg_scale})")
    run.reporter.images(step, {"diffusion/samples": image[None]})
    if extractor is not None:
      metrics, _, _ = sample_metrics(config, fid_generator, params, extractor, reference,
                                     num_samples=config.fid.num_samples)
      results.update({f"samples/{k}": v for k, v in metrics.items()})
    return loop.report_eval(run, step, results)

  batches = pipeline.train_batches(plan.train_split, local_batch_size=plan.local_batch,
                                   seed=config.seed, start_step=run.start_step)
  return loop.train(run, config, train_step=train_step, batches=batches, evaluate=evaluate)


def sample_grid_by_class(images: np.ndarray, labels: np.ndarray, per_row: int = 8) -> np.ndarray:
  """One row per class (the first 10 classes, up to `per_row` samples each);
  rows a class has too few samples for are padded black, so any number of
  samples makes a picture."""
  rows = [images[labels == c][:per_row] for c in np.unique(labels)[:10]]
  columns = max(len(r) for r in rows)
  blank = np.zeros_like(images[:1])
  rows = [np.concatenate([r] + [blank] * (columns - len(r))) for r in rows]
  return pictures.grid([pictures.to_uint8(np.stack([r[j] for r in rows]))
                        for j in range(columns)])


def sample_and_evaluate(config, workdir: str, *, num_samples: int, out: str = "") -> dict:
  """Restores a trained workdir's EMA parameters, generates `num_samples`
  (ADM's npz: `arr_0` uint8 images, `arr_1` labels), a grid PNG, and the
  metrics of config.fid.features; writes them under `<workdir>/samples/`."""
  if not pretrained.workdir_has_checkpoint(workdir):
    raise ValueError(f"{workdir} holds no checkpoint to sample from; train first with "
                     f"python -m pixel_vit.main --config=<the same config> --workdir={workdir}")
  plan = loop.plan(config, make_model_fn)
  run = loop.start(config, workdir, plan, identity=identity_of(config, plan.train_split),
                   read_only=True)
  state = run.state
  params = state.ema_params if state.ema_params is not None else state.params
  step = run.start_step
  generator = make_generator(config, run, run.described.graphdef, plan.train_split,
                             cfg_scale=config.sample.cfg_scale)
  name = (f"{config.sample.sampler}{config.sample.steps}_cfg{config.sample.cfg_scale:g}"
          f"_step{step}_n{num_samples}")
  out = out or os.path.join(workdir, "samples", name)
  extractor = feature_extractor(config)
  if extractor is not None:
    reference = reference_for(config, extractor, plan.train_split, generator.decode)
    metrics, images, labels = sample_metrics(config, generator, params, extractor, reference,
                                             num_samples=num_samples, reporter=run.reporter)
  else:
    metrics = {}
    images, labels = generate(config, generator, params, num_samples, reporter=run.reporter)
  if run.reporter.is_main:
    epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
    with epath.Path(out + ".npz").open("wb") as f:
      np.savez(f, arr_0=pictures.to_uint8(images), arr_1=labels.astype(np.int32))
    pictures.save_png(out + ".png", sample_grid_by_class(images, labels))
    epath.Path(out + ".config.json").write_text(  # the sampling config, beside its output
        config.to_json_best_effort(indent=2, sort_keys=True))
    epath.Path(out + ".json").write_text(json.dumps(
        {"step": step, "num_samples": num_samples, "sampler": config.sample.sampler,
         "steps": str(config.sample.steps), "cfg_scale": config.sample.cfg_scale,
         "features": config.fid.features, **{k: float(v) for k, v in metrics.items()}},
        indent=2))
    run.reporter.log(f"wrote {out}.npz / .png / .json / .config.json: " +
                     ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
  run.checkpointer.close()
  run.reporter.close()
  return metrics
