r"""Encodes an image dataset into VAE latents once, for the latent diffusion study.

  python -m pixel_vit.encode_latents \
      --vae=/models/sd-vae-ft-ema --source=tfds:imagenet2012 --image_size=256 \
      --splits=train,validation --load_chunks=64 \
      --out=/data/imagenet256_latents_{split}.npz

Every split becomes one .npz with exactly these arrays (`sources.write_latents`,
read back by the `npz:` source):
  latents       float32 [N, H/8, W/8, latent_channels], already multiplied by
                the VAE's scaling factor (what the diffusion model trains on)
  labels        int32 [N], in the source's order
  latent_scale  float32 scalar, the scaling factor used (divide by it to decode)
  vae_weights   str, the basename of the weights file

Latents are the posterior mean unless `--sample`, which draws one posterior
sample per image from `--seed` (each image's noise depends only on the seed
and its index in the split). Images come from any pixel_vit source, resized
by it to `--image_size`; grey images are repeated to RGB. The encoder is
jitted once and runs over all local devices with the batch sharded.
"""

from __future__ import annotations

import datetime
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixel_vit import command_line
from pixel_vit.data import sources
from pixel_vit.models import vae as vae_lib

# SD's KL-f8 VAE: latents are 1/8 of the image side.
LATENT_STRIDE = 8
PROGRESS_EVERY_SECONDS = 10.0

_VAE = flags.DEFINE_string(
  "vae",
  None,
  "diffusers AutoencoderKL weights: a diffusion_pytorch_model.safetensors file or its directory.",
)
_SOURCE = flags.DEFINE_string(
  "source", None, "Image source: 'digits', 'npz:PATH' (PATH may contain {split}) or 'tfds:NAME'."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (tfds: sources only).")
_SPLITS = flags.DEFINE_list("splits", ["train", "test"], "Splits to encode.")
_IMAGE_SIZE = flags.DEFINE_integer(
  "image_size", 256, "Images are resized to this square side before encoding; a multiple of 8."
)
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size",
  64,
  "Images per encoder call, over all local devices; a multiple of the local device count.",
)
_OUT = flags.DEFINE_string(
  "out",
  None,
  "Output .npz path; '{split}' is replaced by the "
  "split name (required when encoding several splits).",
)
_SAMPLE = flags.DEFINE_bool(
  "sample", False, "Store a posterior sample instead of the posterior mean."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the posterior samples (with --sample).")
_LOAD_CHUNKS = flags.DEFINE_integer(
  "load_chunks",
  1,
  "Read each split in this many consecutive pieces to bound host memory (ImageNet at 256: ~64).",
)


def output_paths(out: str, splits: list[str]) -> dict[str, str]:
  """{split: path}; '{split}' in `out` is replaced by each split's name."""
  if "{split}" not in out and len(splits) > 1:
    raise ValueError(
      f"--out={out!r} has no '{{split}}' but {len(splits)} splits "
      f"{splits} are encoded, so they would overwrite each other; write e.g. "
      "--out=/data/latents_{split}.npz."
    )
  return {split: out.replace("{split}", split) for split in splits}


def check_arguments(
  *, vae_path: str, splits: list[str], image_size: int, batch_size: int, out: str, load_chunks: int
) -> dict[str, str]:
  """Rejects bad flags before anything is read or compiled; returns {split: output path}."""
  if not vae_path or not os.path.exists(vae_path):
    raise ValueError(
      f"--vae={vae_path!r} does not exist; point it at a diffusers "
      f"{vae_lib.WEIGHTS_FILENAME} file or the directory holding it "
      "(e.g. a local copy of stabilityai/sd-vae-ft-ema)."
    )
  if not splits or any(not s for s in splits) or len(set(splits)) != len(splits):
    raise ValueError(
      f"--splits={','.join(splits)!r} must name distinct, non-empty splits, "
      "e.g. --splits=train,test."
    )
  if image_size <= 0 or image_size % LATENT_STRIDE:
    raise ValueError(
      f"--image_size={image_size} must be a positive multiple of "
      f"{LATENT_STRIDE} (the VAE downsamples by {LATENT_STRIDE}), e.g. 256."
    )
  devices = jax.local_device_count()
  if batch_size <= 0 or batch_size % devices:
    raise ValueError(
      f"--batch_size={batch_size} must be a positive multiple of the "
      f"{devices} local devices (the batch is split over them), e.g. "
      f"{devices * max(1, 64 // devices)}."
    )
  if load_chunks < 1:
    raise ValueError(f"--load_chunks={load_chunks} must be >= 1.")
  paths = output_paths(out, splits)
  for path in paths.values():
    if os.path.isdir(path):
      raise ValueError(
        f"--out path {path} is a directory; give a file name, e.g. "
        f"{os.path.join(path, 'latents_{split}.npz')}."
      )
  return paths


def make_encoder(
  vae: vae_lib.AutoencoderKL, mesh: Mesh, *, sample: bool, seed: int, grey_to_rgb: bool
):
  """A jitted `(params, uint8 images, example indices) -> scaled latents`, batch-sharded."""
  graphdef, params = nnx.split(vae)
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
  base_key = jax.random.key(seed)

  @functools.partial(jax.jit, out_shardings=batch_sharding)
  def encode(params, images, indices):
    model = nnx.merge(graphdef, params)
    x = images.astype(jnp.float32) / 127.5 - 1.0
    if grey_to_rgb:
      x = jnp.repeat(x, 3, axis=-1)
    keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices) if sample else None
    return model.encode_to_latents(x, key=keys)

  return functools.partial(encode, params), batch_sharding


def _needs_grey_to_rgb(channels: int, vae_channels: int, source: str) -> bool:
  """Whether grey images must be repeated to RGB; ValueError when the channels cannot fit."""
  if channels == vae_channels:
    return False
  if channels == 1 and vae_channels == 3:
    return True
  raise ValueError(
    f"{source} images have {channels} channels but the VAE takes "
    f"{vae_channels}; convert them (e.g. drop alpha) before encoding."
  )


def _progress(split: str, done: int, total: int, start: float) -> None:
  elapsed = time.monotonic() - start
  rate = done / elapsed if elapsed > 0 else 0.0
  eta = (total - done) / rate if rate > 0 else float("nan")
  eta_text = str(datetime.timedelta(seconds=round(eta))) if np.isfinite(eta) else "?"
  print(
    f"[encode_latents] {split}: {done}/{total} examples, {rate:.1f} examples/s, ETA {eta_text}",
    flush=True,
  )


def encode_split(
  encoder_for,
  source: sources.Source,
  split: str,
  *,
  image_size: int,
  batch_size: int,
  load_chunks: int,
  latent_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
  """(scaled latents [N, h, w, c] float32, labels [N] int32) of one split, in source order.

  `encoder_for(channels)` gives the (jitted encode, batch sharding) for images
  with that many channels.
  """
  latents = labels = None
  start = last_report = time.monotonic()
  done = 0
  pending = None  # (device latents, destination offset, count): fetched after the next dispatch

  def collect(item):
    array, offset, count = item
    latents[offset : offset + count] = np.asarray(array)[:count]

  for chunk in range(load_chunks):
    data = source.load(split, process_index=chunk, process_count=load_chunks, image_size=image_size)
    if latents is None:
      if data.images.dtype != np.uint8:
        raise ValueError(
          f"{source.name} split {split!r} holds {data.images.dtype} arrays, "
          "not uint8 pixels (already VAE latents?); encode a pixel source."
        )
      encode, batch_sharding = encoder_for(data.images.shape[-1])
      latents = np.empty((data.total_examples, *latent_shape), np.float32)
      labels = np.empty((data.total_examples,), np.int32)
    labels[done : done + len(data.labels)] = data.labels
    for begin in range(0, len(data.images), batch_size):
      images = data.images[begin : begin + batch_size]
      count = len(images)
      if count < batch_size:  # pad the last batch to the compiled shape
        images = np.concatenate(
          [images, np.zeros((batch_size - count, *images.shape[1:]), images.dtype)]
        )
      indices = np.arange(done, done + batch_size, dtype=np.int32)
      result = encode(
        jax.device_put(images, batch_sharding), jax.device_put(indices, batch_sharding)
      )
      if pending is not None:
        collect(pending)  # the host copy overlaps the batch just dispatched
      pending = (result, done, count)
      done += count
      if time.monotonic() - last_report > PROGRESS_EVERY_SECONDS:
        _progress(split, done, len(latents), start)
        last_report = time.monotonic()
  if pending is not None:
    collect(pending)
  if latents is None or done != len(latents):
    raise ValueError(
      f"{source.name} split {split!r} yielded {done} examples, expected "
      f"{0 if latents is None else len(latents)}."
    )
  _progress(split, done, len(latents), start)
  return latents, labels


def encode_dataset(
  *,
  vae_path: str,
  source: str,
  splits: list[str],
  out: str,
  image_size: int = 256,
  batch_size: int = 64,
  sample: bool = False,
  seed: int = 0,
  data_dir: str | None = None,
  load_chunks: int = 1,
) -> dict[str, str]:
  """Encodes every split and writes its .npz; returns {split: written path}."""
  paths = check_arguments(
    vae_path=vae_path,
    splits=splits,
    image_size=image_size,
    batch_size=batch_size,
    out=out,
    load_chunks=load_chunks,
  )
  image_source = sources.parse_source(source, data_dir=data_dir)
  weights_path, _ = vae_lib.resolve_vae_paths(vae_path)
  vae = vae_lib.load_vae(vae_path)
  config = vae.config
  if image_size % config.downsampling_factor:
    raise ValueError(
      f"--image_size={image_size} is not a multiple of this VAE's "
      f"downsampling factor {config.downsampling_factor}."
    )
  side = image_size // config.downsampling_factor
  mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))

  @functools.cache  # the splits of one source share one compiled encoder
  def encoder_for(channels: int):
    grey_to_rgb = _needs_grey_to_rgb(channels, config.in_channels, source)
    return make_encoder(vae, mesh, sample=sample, seed=seed, grey_to_rgb=grey_to_rgb)

  for split, path in paths.items():
    print(f"[encode_latents] {source} {split} -> {path}", flush=True)
    latents, labels = encode_split(
      encoder_for,
      image_source,
      split,
      image_size=image_size,
      batch_size=batch_size,
      load_chunks=load_chunks,
      latent_shape=(side, side, config.latent_channels),
    )
    sources.write_latents(
      path,
      latents,
      labels,
      latent_scale=config.scaling_factor,
      vae_weights=os.path.basename(weights_path),
    )
    print(f"[encode_latents] wrote {path}: latents {latents.shape}", flush=True)
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a --flag.")
  with command_line.stops_with_one_message():  # --traceback shows where, as in main
    encode_dataset(
      vae_path=_VAE.value,
      source=_SOURCE.value,
      splits=_SPLITS.value,
      out=_OUT.value,
      image_size=_IMAGE_SIZE.value,
      batch_size=_BATCH_SIZE.value,
      sample=_SAMPLE.value,
      seed=_SEED.value,
      data_dir=_DATA_DIR.value,
      load_chunks=_LOAD_CHUNKS.value,
    )


if __name__ == "__main__":
  # Required only when run as a command, so that importing this module (tests,
  # other tools) does not make every later absl flag parse demand them.
  flags.mark_flags_as_required(["vae", "source", "out"])
  app.run(main)
