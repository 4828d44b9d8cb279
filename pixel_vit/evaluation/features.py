"""Feature extractors for sample-quality metrics (`pixel_vit.evaluation.fid`).

An `Extractor` maps float images [B, H, W, C] in [0, 1] to a dict of numpy
arrays: `pool` [B, D] (the features FID compares), `logits` [B, K] (Inception
Score; accuracy when the classes are the dataset's) and optionally `spatial`
(sFID). Two kinds:

  * `inception_extractor(weights)`: the FID Inception-v3
    (`pixel_vit.models.inception`), for real-sized RGB or grey images; the
    numbers papers report (FID, sFID, IS on 1008 ImageNet-2012 TF classes).
  * `classifier_extractor(workdir)`: a classifier trained by this project
    (`python -m pixel_vit.main --config=configs/cls_pixel.py:quick
    --workdir=DIR`). For small data (8x8 digits, MNIST) Inception's features
    say little; the classifier's pooled pre-logit features give a FID, its
    logits an Inception Score and, since it knows the dataset's classes, the
    accuracy of class-conditional samples.

Both run jitted on this process's local devices: parameters replicated, the
batch split over the devices (padded to a multiple of their count).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixel_vit import checkpoint as checkpoint_lib
from pixel_vit.data import augment
from pixel_vit.models import inception as inception_lib
from pixel_vit.models import vit

TRAIN_CLASSIFIER = (
  "train one with python -m pixel_vit.main --config=configs/cls_pixel.py:quick --workdir=DIR"
)


@dataclasses.dataclass(frozen=True)
class Extractor:
  """A named feature extractor.

  `forward(images) -> {name: array}` does the work; calling the extractor
  checks the images first. `dimension` is the size of `pool`; `num_classes`
  is the dataset's number of classes when `logits` classify them (a
  classifier of this project), else None (Inception's 1008 TF classes).
  `image_shape` is the (H, W, C) the extractor needs, or None for any size.
  """

  name: str
  forward: Callable[[np.ndarray], dict]
  dimension: int
  num_classes: int | None
  image_shape: tuple[int, int, int] | None = None
  channels: tuple[int, ...] = (1, 3)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"{self.name}: images must be [B, H, W, C], got shape {images.shape}.")
    if self.image_shape is not None and tuple(images.shape[1:]) != tuple(self.image_shape):
      height, width, channels = self.image_shape
      raise ValueError(
        f"{self.name}: images are {images.shape[1]}x{images.shape[2]}x{images.shape[3]} "
        f"but this classifier was trained on {height}x{width}x{channels}. Generate "
        f"samples at {height}x{width} with {channels} channel(s), or train a classifier "
        "on data of the samples' shape."
      )
    if images.shape[-1] not in self.channels:
      raise ValueError(
        f"{self.name}: images have {images.shape[-1]} channels; it takes {list(self.channels)}."
      )
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(
        f"{self.name}: images must be float in [0, 1], got dtype "
        f"{images.dtype} (uint8 pixels: divide by 255)."
      )
    if images.size and not (
      np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    ):
      raise ValueError(
        f"{self.name}: images must be finite floats in [0, 1], got range "
        f"[{np.nanmin(images)}, {np.nanmax(images)}]. Clip samples with np.clip(x, 0, 1); "
        "images in [-1, 1] need (x + 1) / 2 first."
      )
    return self.forward(images.astype(np.float32, copy=False))


def local_forward(apply: Callable, params) -> Callable[[np.ndarray], dict]:
  """`apply(params, images)` jitted over this process's devices: parameters
  replicated, the batch split (padded to a multiple of the device count)."""
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ("batch",))
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec("batch"))
  params = jax.device_put(params, replicated)
  jitted = jax.jit(apply, in_shardings=(replicated, split), out_shardings=split)

  def forward(images: np.ndarray) -> dict:
    n = images.shape[0]
    padding = -n % len(devices)
    if padding:
      images = np.concatenate([images, np.zeros((padding,) + images.shape[1:], images.dtype)])
    outputs = jitted(params, jax.device_put(images, split))
    return {name: np.asarray(value)[:n] for name, value in jax.device_get(outputs).items()}

  return forward


# ---------------------------------------------------------------- Inception


def inception_extractor(weights_path: str) -> Extractor:
  """The FID Inception-v3 with pytorch-fid's weights (.pth, or its .npz)."""
  graphdef, state = nnx.split(inception_lib.load_inception(weights_path))

  def apply(state, images):
    return nnx.merge(graphdef, state)(images)

  return Extractor(
    name=f"inception ({os.path.basename(weights_path)})",
    forward=local_forward(apply, state),
    dimension=inception_lib.POOL_DIM,
    num_classes=None,
  )


# ---------------------------------------------------------------- a project classifier


def _read_run(workdir: str) -> tuple[ml_collections.ConfigDict, object, int]:
  """(resolved config, checkpoints directory, newest step) of a run, or a
  ValueError saying what is missing."""
  directory = epath.Path(workdir)
  if not directory.is_dir():
    raise ValueError(f"classifier workdir {workdir!r} does not exist; {TRAIN_CLASSIFIER}.")
  config_path = directory / "config.json"
  if not config_path.exists():
    raise ValueError(
      f"{workdir!r} has no config.json, so it is not a pixel_vit run directory; {TRAIN_CLASSIFIER}."
    )
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  if not checkpoint_lib.workdir_has_checkpoint(workdir):
    raise ValueError(
      f"classifier workdir {workdir!r} holds no finished checkpoint (is the "
      f"run still at step 0?); {TRAIN_CLASSIFIER}, or wait for its first "
      "checkpoint."
    )
  directory, step = checkpoint_lib.locate(workdir)
  return config, directory, step


def classifier_extractor(workdir: str) -> Extractor:
  """The newest checkpoint of a classification run as a feature extractor.

  `pool` = `Classifier.features` (pooled pre-logits), `logits` = its logits
  over the dataset's classes, after the run's eval preprocessing: images in
  [0, 1] are quantised to uint8 (what the classifier saw in training) and
  normalised by `augment.preprocess_eval` with the run's mean / std. The
  EMA parameters are used when the run kept them, else the parameters.
  """
  config, directory, step = _read_run(workdir)
  where = f"classifier checkpoint {directory / str(step)}"
  saved = checkpoint_lib.open_saved(directory, step)
  metadata = saved.metadata
  if metadata.get("task") != "classification":
    raise ValueError(
      f"{where} is of task {metadata.get('task')!r}, not 'classification': features and "
      f"logits come from a classifier; {TRAIN_CLASSIFIER}."
    )
  if "model" not in config or "augment" not in config:
    raise ValueError(
      f"{workdir}/config.json has no 'model' or 'augment' section: it is not "
      f"the resolved config of a classification run; {TRAIN_CLASSIFIER}."
    )
  missing = [
    k for k in ("variant", "posemb", "pool", "num_classes", "image_shape") if k not in metadata
  ]
  if missing:
    raise ValueError(
      f"{where}: its metadata lacks {missing}; it was not written by "
      "pixel_vit's classification trainer."
    )
  identity = saved.identity()
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  for key in ("variant", "posemb", "pool"):  # what the checkpoint says it is wins
    model_config[key] = getattr(identity, key)
  height, width, channels = (int(x) for x in identity.image_shape)
  num_classes = int(identity.num_classes)

  def make_model():
    return vit.build_classifier(
      model_config,
      image_size=height,
      channels=channels,
      num_classes=num_classes,
      rngs=nnx.Rngs(0),
      pixel_stats=(config.augment.mean, config.augment.std),
    )

  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
  abstract_params = nnx.to_pure_dict(abstract)
  item_name = "ema_params" if isinstance(saved.state_tree.get("ema_params"), dict) else "params"
  mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
  replicated = NamedSharding(mesh, PartitionSpec())
  target = {
    item_name: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_params
    )
  }
  try:
    params = saved.restore(target)[item_name]
  except (ValueError, KeyError) as e:
    raise ValueError(
      f"{where}: its {item_name} do not fit the classifier its metadata "
      f"describes ({identity.variant}, {height}x{width}x{channels}, "
      f"{num_classes} classes): {e}"
    ) from e
  augment_config = config.augment

  def apply(params, images):
    pixels = jnp.clip(jnp.round(images * 255.0), 0, 255).astype(jnp.uint8)
    dummy_labels = jnp.zeros(images.shape[:1], jnp.int32)  # preprocess_eval's one-hot
    normalised, _ = augment.preprocess_eval(
      pixels, dummy_labels, num_classes=num_classes, config=augment_config
    )
    model = nnx.merge(graphdef, nnx.State(params))
    pooled = model.features(normalised).astype(jnp.float32)
    return {"pool": pooled, "logits": model(normalised)}

  return Extractor(
    name=f"classifier {identity.variant} step {step} ({item_name}) of {workdir}",
    forward=local_forward(apply, params),
    dimension=vit.parse_variant(identity.variant)[0].width,
    num_classes=num_classes,
    image_shape=(height, width, channels),
    channels=(channels,),
  )
