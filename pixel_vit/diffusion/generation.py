"""Generation from a DiT: the diffusion processes a run trains and samples
with, the sampler jitted over the mesh (`make_generator`), and class-balanced
generation of any number of samples on every process (`generate`).

Latent samples are decoded to pixels with `config.vae.weights` when given
(`latent_decoder`). The diffusion trainer uses this for its periodic grids
and sample metrics, `python -m pixel_vit.sample` on a trained workdir;
nothing here knows about runs, checkpoints or workdirs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from pixel_vit import parallel
from pixel_vit.data import locality, sources
from pixel_vit.diffusion import gaussian, sampling
from pixel_vit.models import vae


def diffusion_process(config) -> gaussian.GaussianDiffusion:
  return gaussian.GaussianDiffusion.create(
    config.diffusion.schedule, config.diffusion.num_timesteps
  )


def sampling_process(config) -> gaussian.GaussianDiffusion:
  """The training diffusion respaced to `config.sample.steps` (e.g. 250 or 'ddim50')."""
  full = diffusion_process(config)
  return full.respace(gaussian.space_timesteps(full.num_timesteps, str(config.sample.steps)))


@dataclasses.dataclass(frozen=True)
class Generator:
  """Turns (params, labels, batch index) into images in [0, 1] on the mesh."""

  sample_shape: tuple[int, int, int]  # H, W, C of what the model generates
  num_classes: int
  mesh: jax.sharding.Mesh
  rules: Any  # the logical-axis rules (parallel.py) the batch is sharded by
  decode: object  # latents -> [0, 1] images (a VAE), or None for pixels
  _sample: object  # jitted

  def images(self, params, labels: np.ndarray, batch_index: int, seed: int) -> jax.Array:
    """Samples for `labels` (a global batch) from noise fixed by (seed, batch_index)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), batch_index)
    labels = np.asarray(labels, np.int32)  # the same whole batch on every process
    labels = jax.make_array_from_callback(
      labels.shape, parallel.batch_sharding(self.mesh, self.rules, 1), lambda index: labels[index]
    )
    samples = self._sample(params, labels, key)
    return samples if self.decode is None else self.decode(samples)


def sampling_program(
  config,
  graphdef: nnx.GraphDef,
  train_split: sources.ImageSplit,
  *,
  permutation: locality.PixelPermutation | None,
  mesh: jax.sharding.Mesh,
  rules,
  abstract_params,
  cfg_scale: float,
  batch_size: int,
) -> parallel.Program:
  """The sampler (config.sample.*) with guidance `cfg_scale` as a program
  sharded over the batch: (params, labels, key) -> images in [0, 1] (or
  latents). Compiled ahead of time for `batch_size` labels; called on any.
  With a pixel `permutation` (the run's, data/locality.py) the model
  generates scrambled images; they are put back in image order.

  The model is `graphdef` with parameters like `abstract_params` (their
  ShapeDtypeStructs, carrying their shardings).
  """
  process = sampling_process(config)
  shape = tuple(train_split.images.shape[1:])
  channels = shape[-1]
  sample_fn = sampling.sampler(config.sample.sampler)
  options = dict(learn_sigma=config.model.learn_sigma, clip_denoised=not train_split.is_latent)
  if config.sample.sampler == "ddim":
    options["eta"] = config.sample.eta

  def sample(params, labels, key):
    model = nnx.merge(graphdef, nnx.State(params))
    model_fn = sampling.guided(
      lambda x, t, y: model(x, t, y),
      cfg_scale=cfg_scale,
      null_label=model.null_label,
      channels=channels,
    )
    noise_key, step_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, (labels.shape[0], *shape), jnp.float32)
    noise = parallel.constrain(noise, ("batch", None, None, None))
    x0 = sample_fn(model_fn, process, noise, labels, step_key, **options)
    return samples_as_images(x0, permutation=permutation, latent=train_split.is_latent)

  labels = jax.ShapeDtypeStruct(
    (batch_size,), jnp.int32, sharding=parallel.batch_sharding(mesh, rules, 1)
  )
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(mesh))
  return parallel.Program(
    "sample",
    sample,
    args=(abstract_params, labels, key),
    out_shardings=parallel.batch_sharding(mesh, rules, 4),
  )


def make_generator(
  config,
  graphdef: nnx.GraphDef,
  train_split: sources.ImageSplit,
  *,
  permutation: locality.PixelPermutation | None,
  mesh: jax.sharding.Mesh,
  rules,
  abstract_params,
  cfg_scale: float,
) -> Generator:
  """`sampling_program`, jitted on `mesh` and `rules`, with the VAE decoder
  for latent data (`latent_decoder`): a Generator of images in [0, 1].
  `abstract_params`: the parameters' ShapeDtypeStructs carrying their shardings."""
  program = sampling_program(
    config,
    graphdef,
    train_split,
    permutation=permutation,
    mesh=mesh,
    rules=rules,
    abstract_params=abstract_params,
    cfg_scale=cfg_scale,
    batch_size=config.fid.batch_size,
  )
  return Generator(
    tuple(train_split.images.shape[1:]),
    train_split.num_classes,
    mesh,
    rules,
    latent_decoder(config, train_split),
    program.jit(mesh, rules),
  )


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
  graphdef, weights = nnx.split(vae.load_vae(config.vae.weights))
  decode = jax.jit(lambda w, z: nnx.merge(graphdef, w).decode_latents(z))
  return lambda z: decode(weights, z)


def grid_labels(config, num_classes: int) -> np.ndarray:
  labels = np.asarray(config.sample.grid_labels or range(min(num_classes, 10)), np.int32)
  if labels.max() >= num_classes:
    raise ValueError(
      f"config.sample.grid_labels={tuple(config.sample.grid_labels)} has a "
      f"label >= the data's {num_classes} classes."
    )
  return labels


def grid_samples(config, generator: Generator, params) -> np.ndarray:
  """[rows, columns, H, W, C] images in [0, 1]: rows = config.sample.grid_labels,
  columns = fixed noise, so the same parameters always give the same samples."""
  labels = grid_labels(config, generator.num_classes)
  columns = config.sample.grid_columns
  flat = np.repeat(labels, columns)
  mesh = generator.mesh.shape
  batch = padded_size(len(flat), mesh["data"] * mesh["fsdp"])
  images = gather(generator.images(params, np.resize(flat, batch), 0, config.sample.seed))
  return images[: len(flat)].reshape(len(labels), columns, *images.shape[1:])


def padded_size(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def gather(x: jax.Array) -> np.ndarray:
  """A global array, whole, on every process."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate(
  config, generator: Generator, params, num_samples: int, *, reporter=None
) -> tuple[np.ndarray, np.ndarray]:
  """`num_samples` images in [0, 1] (on every process) with balanced labels
  (sample i has label i mod num_classes), in batches of config.fid.batch_size
  over all devices."""
  batch = config.fid.batch_size
  labels = np.arange(num_samples) % generator.num_classes
  images, start = [], time.time()
  for index, first in enumerate(range(0, num_samples, batch)):
    chunk = np.resize(labels[first : first + batch], batch)  # the last batch is padded
    images.append(gather(generator.images(params, chunk, index, config.sample.seed + 1)))
    done = min(first + batch, num_samples)
    if reporter is not None:
      rate = done / (time.time() - start)
      reporter.log(
        f"sampled {done}/{num_samples} ({rate:.2f} samples/s, "
        f"ETA {(num_samples - done) / rate:.0f} s)"
      )
  return np.concatenate(images)[:num_samples], labels
