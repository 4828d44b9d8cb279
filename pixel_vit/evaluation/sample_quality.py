"""How good a diffusion model's samples are: the feature extractor named by
`config.fid.features`, the real-data reference its samples are compared
with, FID / IS / precision / recall / accuracy-on-samples of generated
samples (`pixel_vit.evaluation.fid`), and the sample grids people look at.

Samples come from `pixel_vit.diffusion.generation`; the diffusion trainer
reports these at each evaluation, `python -m pixel_vit.sample` for a
trained workdir.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from pixel_vit import checkpoint as checkpoint_lib
from pixel_vit import parallel
from pixel_vit.config_checks import check_positive, require
from pixel_vit.data import sources
from pixel_vit.diffusion import generation
from pixel_vit.evaluation import features, fid, pictures


def feature_extractor(config):
  """`classifier:WORKDIR` or `inception:WEIGHTS` -> an extractor (or None if off)."""
  spec = config.fid.features
  if not spec:
    return None
  kind, _, where = spec.partition(":")
  if kind == "classifier":
    return features.classifier_extractor(where)
  return features.inception_extractor(where)


def reference_for(config, extractor, train_split: sources.ImageSplit, decode):
  """The real-data statistics samples are compared with: a stats file
  (`config.fid.reference`, ADM's npz format) or features of the train split."""
  if config.fid.reference:
    return fid.load_reference(config.fid.reference)
  count = min(len(train_split.images), config.fid.reference_examples)
  real = train_split.images[:count]
  if train_split.is_latent:
    if not config.vae.weights:  # the preview decoder's images are not comparable
      raise ValueError(
        "config.fid.features scores images, and these data are latents: set "
        "config.vae.weights to decode them."
      )
    batch = config.fid.batch_size
    real = np.concatenate(
      [np.asarray(decode(jnp.asarray(real[i : i + batch]))) for i in range(0, count, batch)]
    )
  else:
    real = real.astype(np.float32) / 255.0
  return fid.reference_from_images(extractor, real, batch_size=config.fid.batch_size)


def sample_metrics(
  config,
  generator: generation.Generator,
  params,
  extractor,
  reference,
  *,
  num_samples: int,
  reporter=None,
) -> tuple[dict, np.ndarray, np.ndarray]:
  images, labels = generation.generate(config, generator, params, num_samples, reporter=reporter)
  metrics = fid.sample_metrics(
    extractor, images, labels, reference, batch_size=config.fid.batch_size
  )
  return metrics, images, labels


def sample_grid(config, generator: generation.Generator, params) -> np.ndarray:
  """Rows = config.sample.grid_labels, columns = fixed noise: comparable across steps."""
  images = generation.grid_samples(config, generator, params)
  return pictures.grid([pictures.to_uint8(images[:, j]) for j in range(images.shape[1])])


def sample_grid_by_class(images: np.ndarray, labels: np.ndarray, per_row: int = 8) -> np.ndarray:
  """One row per class (the first 10 classes, up to `per_row` samples each);
  rows a class has too few samples for are padded black, so any number of
  samples makes a picture."""
  rows = [images[labels == c][:per_row] for c in np.unique(labels)[:10]]
  columns = max(len(r) for r in rows)
  blank = np.zeros_like(images[:1])
  rows = [np.concatenate([r] + [blank] * (columns - len(r))) for r in rows]
  return pictures.grid([pictures.to_uint8(np.stack([r[j] for r in rows])) for j in range(columns)])


def validate_config(config, device_count: int, *, files: bool = True) -> None:
  """`config.fid` (features, reference, sample counts) and `config.vae.weights`;
  `files=False` leaves out whether the named files exist (compiling ahead of
  time reads none of them)."""
  fid = config.fid
  check_positive("fid.num_samples", fid.num_samples, allow_zero=True)
  check_positive("fid.batch_size", fid.batch_size)
  check_positive("fid.reference_examples", fid.reference_examples)
  shards = parallel.batch_shards(config.mesh, device_count)
  require(
    fid.batch_size % shards == 0,
    f"config.fid.batch_size={fid.batch_size} must be divisible by the {shards} batch "
    "shards of the mesh.",
  )
  kind, _, where = fid.features.partition(":")
  require(
    not fid.features or (kind in ("classifier", "inception") and where),
    f"config.fid.features={fid.features!r} must be '' (off), 'classifier:WORKDIR' "
    "(a run of configs/cls_pixel.py on the same data) or 'inception:WEIGHTS' "
    "(pytorch-fid's pt_inception-2015-12-05 .pth or its .npz conversion).",
  )
  require(
    not fid.num_samples or fid.features,
    f"config.fid.num_samples={fid.num_samples} needs config.fid.features: train a "
    "classifier on the same data (python -m pixel_vit.main --config=configs/"
    "cls_pixel.py:quick --workdir=DIR) and set --config.fid.features=classifier:DIR.",
  )
  if not files:
    return
  if fid.features and kind == "classifier":
    require(
      checkpoint_lib.workdir_has_checkpoint(where),
      f"config.fid.features={fid.features!r}: {where} holds no classifier checkpoint; "
      f"train one with python -m pixel_vit.main --config=configs/cls_pixel.py:quick "
      f"--workdir={where}.",
    )
  if fid.features and kind == "inception":
    require(
      os.path.isfile(where),
      f"config.fid.features={fid.features!r}: no weights file at {where}; give the "
      "local path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its .npz).",
    )
  require(
    not fid.reference or os.path.isfile(fid.reference),
    f"config.fid.reference={fid.reference!r} does not exist; give an npz with `mu` and "
    "`sigma` (e.g. ADM's VIRTUAL_imagenet256_labeled.npz) or '' to use the train split.",
  )
  require(
    not config.vae.weights or os.path.exists(config.vae.weights),
    f"config.vae.weights={config.vae.weights!r} does not exist; give the local "
    "diffusion_pytorch_model.safetensors of stabilityai/sd-vae-ft-ema (or -mse), or '' "
    "to show latent previews instead of decoded images.",
  )
