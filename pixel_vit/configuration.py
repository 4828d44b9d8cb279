"""What a config is made of, for every `configs/*.py`: argument parsing and
the shared sections (data, mesh, augmentation, sharding rules).

`get_config(arg)` receives the text after the colon in
`--config=configs/cls_pixel.py:variant=S/1,dataset=digits,quick`; `parse_arg`
turns it into typed values. This module imports only ml_collections, so
loading a config file imports no JAX, TensorFlow or orbax.

Checking a resolved config is each subsystem's job, beside its code (see
`pixel_vit/config_checks.py` for the list); a trainer's `validate` calls them
in turn before anything touches data or compiles.
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`'variant=Ti/1,quick'` -> ConfigDict(variant='Ti/1', quick=True, ...).

  Only keys present in `defaults` are accepted; values are cast to the
  default's type (a bare key sets a bool to True).
  """
  result = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, bool):
      if sep and value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} must be true or false.")
      result[key] = not sep or value.lower() in ("true", "1")
    elif default is None or isinstance(default, str):
      result[key] = value
    else:
      try:
        result[key] = type(default)(value)
      except ValueError:
        raise ValueError(
          f"config argument {key}={value!r} is not a {type(default).__name__}."
        ) from None
  return ml_collections.ConfigDict(result)


# The locality ablations as config arguments, one flag per run
# (`cls_pixel.py:variant=Ti/1,posemb=none`, `...,swaps=1000,swap_distance=2`,
# `...,tokenizer=vocab`); '' / 0 leave the config's own setting.
LOCALITY_ARGS = dict(posemb="", tokenizer="", swaps=0, swap_distance=1)


def apply_locality_args(config: ml_collections.ConfigDict, args) -> None:
  """Sets config.model.posemb / .tokenizer and config.data.permute_pixels from
  the arguments in LOCALITY_ARGS (checked later by validate)."""
  if args.posemb:
    config.model.posemb = args.posemb
  if args.tokenizer:
    if "tokenizer" not in config.model:
      raise ValueError(
        f"config argument tokenizer={args.tokenizer!r}: this task's model has "
        "no pixel tokenizer choice (a DiT's input is a noisy image, not 8-bit "
        "values); drop the argument."
      )
    config.model.tokenizer = args.tokenizer
  config.data.permute_pixels.swaps = args.swaps
  config.data.permute_pixels.max_distance = args.swap_distance


# Named datasets (the `dataset=` config argument) and their paper settings.
# ImageNet is resized to 28x28 as in
# the paper's low-resolution study (784 pixel tokens).
DATASETS = {
  "cifar100": dict(source="tfds:cifar100", image_size=None, eval_split="test"),
  "imagenet28": dict(source="tfds:imagenet2012", image_size=28, eval_split="validation"),
  # Full-resolution ImageNet for the paper's locality ablations on ViT-B/16.
  "imagenet224": dict(source="tfds:imagenet2012", image_size=224, eval_split="validation"),
  "digits": dict(source="digits", image_size=None, eval_split="test"),
  "cifar10": dict(source="tfds:cifar10", image_size=None, eval_split="test"),
  # ImageNet 256x256 as Stable-Diffusion VAE latents (32x32x4), written once by
  # python -m pixel_vit.encode_latents (see README, diffusion).
  "imagenet256_latents": dict(
    source="npz:data/imagenet256_latents_{split}.npz", image_size=None, eval_split="validation"
  ),
}

# Logical axes -> mesh axes (see parallel.py). With the default mesh (all
# devices on `data`) this is pure data parallelism; set config.mesh.fsdp /
# tensor / seq to shard parameters and activations.
SHARDING_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", "seq"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("layers", None),
)


def permute_pixels_config() -> ml_collections.ConfigDict:
  """`config.data.permute_pixels`: off (T = 0) by default (data/locality.py)."""
  return ml_collections.ConfigDict(dict(swaps=0, max_distance=1, seed=0))


def default_augment_config() -> ml_collections.ConfigDict:
  """DeiT-style augmentation defaults for CIFAR-sized (32x32) images."""
  c = ml_collections.ConfigDict()
  # Length-1 mean/std broadcast over channels: (0.5,) == (0.5,)*3 for RGB and
  # also works unchanged for 1-channel sources (digits, MNIST).
  c.mean = (0.5,)
  c.std = (0.5,)
  c.crop = True
  # DeiT uses (0.08, 1) at 224px. At 32x32 an 8% crop is ~9x9 pixels blown up
  # 3.5x, which destroys most of the object; a 25% floor (>= 16x16 source
  # pixels) keeps strong scale jitter while the label stays recognisable.
  c.crop_scale = (0.25, 1.0)
  c.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  # > 0: the CIFAR recipe's crop instead (pad each side by this many black
  # pixels, cut a random window of the image's size: translation, no zoom).
  c.crop_padding = 0
  c.flip = True
  # RandAugment as timm's rand-m9-mstd0.5-inc1 when randaugment_ops = 2 (DeiT,
  # MAE fine-tuning); 0 ops keeps it off, so configs opt in.
  c.randaugment_ops = 0
  c.randaugment_magnitude = 9.0
  c.randaugment_magnitude_std = 0.5
  # Random erasing of one box per example (DeiT / MAE fine-tuning use 0.25).
  c.erase_prob = 0.0
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.mix_switch_prob = 0.5
  return c


def dataset_config(dataset: str) -> ml_collections.ConfigDict:
  """`config.data` for a named dataset, `tfds:NAME` or `npz:PATH`."""
  if dataset in DATASETS:
    settings = DATASETS[dataset]
  else:  # checked by sources.validate_config
    settings = dict(source=dataset, image_size=None, eval_split="test")
  return ml_collections.ConfigDict(
    dict(
      source=settings["source"],
      data_dir=None,
      download=True,
      train_split="train",
      eval_split=settings["eval_split"],
      image_size=ml_collections.FieldReference(settings["image_size"], field_type=int),
      # memory: the split decoded into host RAM (digits, npz, TFDS); stream:
      # ArrayRecord through grain (records:DIR, data/stream.py); auto: the one
      # the source allows.
      loader="auto",
      workers=0,  # grain worker processes that decode and crop (stream)
      crop_fraction=0.875,  # eval: shorter side to image_size / this, centre crop (stream)
      # A streamed image that does not decode: 'fail' (the run stops, naming
      # it) or 'skip' (train takes the next record; eval masks it; counted).
      on_bad_example="fail",
      # The locality ablation: T swaps of pixel pairs within delta (data/locality.py).
      permute_pixels=permute_pixels_config(),
    )
  )


def mesh_config() -> ml_collections.ConfigDict:
  """All devices on the `data` axis; `-1` = the remaining devices.

  `dcn`: of each axis, how many ways go across granules (TPU slices, or
  processes with granule='process') over the data-centre network; by
  default all granules are on `data`. One granule: no effect.
  """
  return ml_collections.ConfigDict(
    dict(
      data=-1, fsdp=1, seq=1, tensor=1, dcn=dict(data=-1, fsdp=1, seq=1, tensor=1), granule="slice"
    )
  )


def base_config(task: str, dataset: str, *, quick: bool) -> ml_collections.ConfigDict:
  """What every experiment config starts from: task, seed, data, mesh and
  rules. `quick` swaps the default CIFAR-100 for the offline `digits`."""
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  config.data = dataset_config("digits" if quick and dataset == "cifar100" else dataset)
  config.mesh = mesh_config()
  config.sharding_rules = SHARDING_RULES
  config.keep_checkpoints = 3  # >= 1: the newest N, the final one included
  # A workdir lock left by a run on another host is refused (on a shared
  # filesystem that run may still be alive); True takes it over (workdir.py).
  config.take_over_lock = False
  # A resume that changes the seed, the global batch or the data (source,
  # split, size, permutation) is refused unless True (trainers/config_history.py).
  config.resume_with_changes = False
  # A non-finite loss or gradient norm: 'stop' the run (no NaN checkpoint is
  # ever written), or 'skip' that update and stop after more than
  # max_nonfinite_skips in a row (trainers/divergence.py).
  config.on_nonfinite = "stop"
  config.max_nonfinite_skips = 10
  # A jax.profiler trace of `steps` train steps from `first_step` on, written
  # to <workdir>/plugins/profile/ (TensorBoard's profile tab); 0 = off.
  config.profile = ml_collections.ConfigDict(dict(steps=0, first_step=10))
  return config
