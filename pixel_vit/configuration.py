"""Config arguments and validation, shared by every `configs/*.py`.

`get_config(arg)` receives the text after the colon in
`--config=configs/cls_pixel.py:variant=S/1,dataset=digits,quick`; `parse_arg`
turns it into typed values. `validate` checks a resolved config before
anything touches data or compiles: a wrong value is a ValueError that names
the key, the value and what is allowed.
"""
from __future__ import annotations

import fractions
import os

import jax
import ml_collections

from pixel_vit import parallel
from pixel_vit.data import augment, locality, sources
from pixel_vit.diffusion import gaussian, sampling
from pixel_vit.models import attention, dit, mae, vit
from pixel_vit.trainers import pretrained


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
        raise ValueError(f"config argument {key}={value!r} is not a "
                         f"{type(default).__name__}.") from None
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
      raise ValueError(f"config argument tokenizer={args.tokenizer!r}: this task's model has "
                       "no pixel tokenizer choice (a DiT's input is a noisy image, not 8-bit "
                       "values); drop the argument.")
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
    # python -m pixel_vit.data.encode_latents (see README, diffusion).
    "imagenet256_latents": dict(source="npz:data/imagenet256_latents_{split}.npz",
                                image_size=None, eval_split="validation"),
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


def dataset_config(dataset: str) -> ml_collections.ConfigDict:
  """`config.data` for a named dataset, `tfds:NAME` or `npz:PATH`."""
  if dataset in DATASETS:
    settings = DATASETS[dataset]
  else:  # checked by validate_data
    settings = dict(source=dataset, image_size=None, eval_split="test")
  return ml_collections.ConfigDict(dict(
      source=settings["source"], data_dir=None, download=True,
      train_split="train", eval_split=settings["eval_split"],
      image_size=ml_collections.FieldReference(settings["image_size"], field_type=int),
      # The locality ablation: T swaps of pixel pairs within delta (data/locality.py).
      permute_pixels=locality.permute_pixels_config()))


def mesh_config() -> ml_collections.ConfigDict:
  """All devices on the `data` axis; `-1` = the remaining devices.

  `dcn`: of each axis, how many ways go across granules (TPU slices, or
  processes with granule='process') over the data-centre network; by
  default all granules are on `data`. One granule: no effect.
  """
  return ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, seq=1, tensor=1,
      dcn=dict(data=-1, fsdp=1, seq=1, tensor=1), granule="slice"))


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
  # A non-finite loss or gradient norm: 'stop' the run (no NaN checkpoint is
  # ever written), or 'skip' that update and stop after more than
  # max_nonfinite_skips in a row (trainers/divergence.py).
  config.on_nonfinite = "stop"
  config.max_nonfinite_skips = 10
  # A jax.profiler trace of `steps` train steps from `first_step` on, written
  # to <workdir>/plugins/profile/ (TensorBoard's profile tab); 0 = off.
  config.profile = ml_collections.ConfigDict(dict(steps=0, first_step=10))
  return config


def _require(condition: bool, message: str):
  if not condition:
    raise ValueError(message)


def _check_choice(key: str, value, allowed):
  _require(value in allowed, f"config.{key}={value!r} is not allowed; choose one of {list(allowed)}.")


def _check_positive(key: str, value, *, allow_zero=False):
  ok = value >= 0 if allow_zero else value > 0
  _require(ok, f"config.{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}.")


def _named(key: str, check, *args):
  """Runs `check(*args)`, prefixing its ValueError with the config key."""
  try:
    return check(*args)
  except ValueError as e:
    raise ValueError(f"config.{key}: {e}") from None


def validate_model(model) -> None:
  _named("model.variant", vit.parse_variant, model.variant)
  _check_choice("model.posemb", model.posemb, vit.POSEMBS)
  if "tokenizer" in model:  # classifier and MAE encoders; DiT's input is noisy, not 8-bit
    _check_choice("model.tokenizer", model.tokenizer, vit.TOKENIZERS)
  if "pool" in model:  # classifiers only
    _check_choice("model.pool", model.pool, vit.POOLS)
  _check_choice("model.dtype", model.dtype, list(vit.DTYPES))
  _check_choice("model.remat", model.remat, list(vit.REMAT_CHOICES))
  _check_choice("model.attention", model.attention, list(attention.BACKENDS))
  drop_path = model.get("drop_path", 0.0)  # DiT has none
  _require(0.0 <= drop_path < 1.0, f"config.model.drop_path={drop_path!r} must be in [0, 1).")


def validate_decoder(model) -> None:
  """The MAE decoder and target settings (configs/mae_pixel.py)."""
  decoder = model.decoder
  for key in ("width", "depth", "heads", "mlp_dim"):
    _check_positive(f"model.decoder.{key}", decoder[key])
  _require(decoder.width % decoder.heads == 0,
           f"config.model.decoder.width={decoder.width} must be divisible by "
           f"config.model.decoder.heads={decoder.heads}.")
  _check_choice("model.decoder.posemb", decoder.posemb, vit.POSEMBS)
  _require(decoder.posemb != "sincos2d" or decoder.width % 4 == 0,
           f"config.model.decoder.width={decoder.width} must be a multiple of 4 for "
           "config.model.decoder.posemb='sincos2d'.")
  _check_positive("model.norm_pix_window", model.norm_pix_window, allow_zero=True)
  _, patch = vit.parse_variant(model.variant)
  window = model.norm_pix_window or patch  # 0 = the token itself
  _require(not (model.norm_pix_loss and window < 2),
           f"config.model.norm_pix_loss normalises over {window}x{window} pixels "
           f"(config.model.norm_pix_window={model.norm_pix_window}, patch {patch}): one "
           "pixel's own statistics are degenerate (a grey value has variance 0). Set "
           "config.model.norm_pix_window >= 2; 2 gives the targets of ViT/2.")


def validate_diffusion(config, device_count: int) -> None:
  """The DiT model, diffusion, sampling and FID settings (configs/dit_pixel.py)."""
  model = config.model
  _check_choice("model.posemb", model.posemb, dit.POSEMBS)
  _require(0.0 <= model.class_dropout < 1.0,
           f"config.model.class_dropout={model.class_dropout!r} must be in [0, 1); "
           "classifier-free guidance needs > 0 (DiT: 0.1).")
  _check_choice("diffusion.schedule", config.diffusion.schedule, gaussian.SCHEDULES)
  _check_positive("diffusion.num_timesteps", config.diffusion.num_timesteps)
  sample = config.sample
  _check_choice("sample.sampler", sample.sampler, sampling.SAMPLERS)
  _named("sample.steps", gaussian.space_timesteps, config.diffusion.num_timesteps,
         str(sample.steps))
  _require(0.0 <= sample.eta <= 1.0, f"config.sample.eta={sample.eta!r} must be in [0, 1].")
  for key in ("cfg_scale", "grid_cfg_scale"):
    _require(sample[key] >= 1.0 or sample[key] == 0.0,
             f"config.sample.{key}={sample[key]!r}: use 1.0 for no guidance, > 1 to guide.")
  _require((sample.cfg_scale == 1.0 and sample.grid_cfg_scale == 1.0)
           or model.class_dropout > 0,
           "config.sample guidance scales > 1 need a model trained with "
           "config.model.class_dropout > 0 (its null class is never trained otherwise).")
  _check_positive("sample.grid_columns", sample.grid_columns)
  fid = config.fid
  _check_positive("fid.num_samples", fid.num_samples, allow_zero=True)
  _check_positive("fid.batch_size", fid.batch_size)
  _check_positive("fid.reference_examples", fid.reference_examples)
  shards = parallel.batch_shards(config.mesh, device_count)
  _require(fid.batch_size % shards == 0,
           f"config.fid.batch_size={fid.batch_size} must be divisible by the {shards} batch "
           "shards of the mesh.")
  kind, _, where = fid.features.partition(":")
  _require(not fid.features or (kind in ("classifier", "inception") and where),
           f"config.fid.features={fid.features!r} must be '' (off), 'classifier:WORKDIR' "
           "(a run of configs/cls_pixel.py on the same data) or 'inception:WEIGHTS' "
           "(pytorch-fid's pt_inception-2015-12-05 .pth or its .npz conversion).")
  _require(not fid.num_samples or fid.features,
           f"config.fid.num_samples={fid.num_samples} needs config.fid.features: train a "
           "classifier on the same data (python -m pixel_vit.main --config=configs/"
           "cls_pixel.py:quick --workdir=DIR) and set --config.fid.features=classifier:DIR.")
  if fid.features and kind == "classifier":
    _require(pretrained.workdir_has_checkpoint(where),
             f"config.fid.features={fid.features!r}: {where} holds no classifier checkpoint; "
             f"train one with python -m pixel_vit.main --config=configs/cls_pixel.py:quick "
             f"--workdir={where}.")
  if fid.features and kind == "inception":
    _require(os.path.isfile(where),
             f"config.fid.features={fid.features!r}: no weights file at {where}; give the "
             "local path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its .npz).")
  _require(not fid.reference or os.path.isfile(fid.reference),
           f"config.fid.reference={fid.reference!r} does not exist; give an npz with `mu` and "
           "`sigma` (e.g. ADM's VIRTUAL_imagenet256_labeled.npz) or '' to use the train split.")
  _require(not config.vae.weights or os.path.exists(config.vae.weights),
           f"config.vae.weights={config.vae.weights!r} does not exist; give the local "
           "diffusion_pytorch_model.safetensors of stabilityai/sd-vae-ft-ema (or -mse), or '' "
           "to show latent previews instead of decoded images.")


def validate_image_size(model, image_size: int) -> None:
  """The patch must tile the image (checked once the image size is known)."""
  _, patch = vit.parse_variant(model.variant)
  _require(image_size % patch == 0,
           f"config.model.variant={model.variant!r} has patch {patch}, which does not "
           f"divide the image size {image_size}; pick a patch that divides it or set "
           "config.data.image_size.")
  window = model.get("norm_pix_window", 0) if model.get("norm_pix_loss", False) else 0
  _require(window == 0 or image_size % window == 0,
           f"config.model.norm_pix_window={window} does not divide the image size {image_size}.")


def validate_mask_ratio(mask_ratio: float, model, image_size: int) -> None:
  """MAE masking hides at least one token and keeps at least one, on the real
  token count and with the model's own rounding (models/mae.py, `num_visible`)."""
  _, patch = vit.parse_variant(model.variant)
  tokens = (image_size // patch) ** 2
  kept = round(tokens * (1 - fractions.Fraction(repr(float(mask_ratio)))))
  _require(tokens - mae.num_visible(tokens, mask_ratio) > 0 and kept > 0,
           f"config.mask_ratio={mask_ratio!r} masks {tokens - kept} of the {tokens} tokens "
           f"({image_size}x{image_size} images, config.model.variant={model.variant!r} with "
           f"patch {patch}) and keeps {kept} visible (round({tokens} x (1 - ratio))); MAE "
           "needs at least one masked token (else the loss is 0 and nothing trains) and at "
           f"least one visible. With {tokens} tokens use a ratio in [1/{tokens}, "
           f"{tokens - 1}/{tokens}] = [{1 / tokens:.4g}, {(tokens - 1) / tokens:.4g}] "
           "(MAE: 0.75).")


def describe_length(config, start_step: int, total_steps: int, steps_per_epoch: int) -> str:
  """'steps 0 -> 400 (...)': the run's length and what decided it, for the first log line."""
  if config.total_steps:
    how = (f"config.total_steps; {steps_per_epoch} steps/epoch, so "
           f"{total_steps / steps_per_epoch:.3g} epochs")
  else:
    how = (f"from config.total_epochs={config.total_epochs:g} x {steps_per_epoch} "
           "steps/epoch, since config.total_steps=0")
  return f"steps {start_step} -> {total_steps} ({how})"


def validate_optimizer(opt) -> None:
  _check_positive("optimizer.lr", opt.lr)
  _check_positive("optimizer.weight_decay", opt.weight_decay, allow_zero=True)
  _check_positive("optimizer.grad_clip", opt.grad_clip, allow_zero=True)
  _check_positive("optimizer.warmup_steps", opt.warmup_steps, allow_zero=True)
  _require(0.0 <= opt.b1 < 1.0 and 0.0 <= opt.b2 < 1.0,
           f"config.optimizer b1={opt.b1}, b2={opt.b2} must be in [0, 1).")
  _require(opt.ema_decay == 0.0 or 0.0 < opt.ema_decay < 1.0,
           f"config.optimizer.ema_decay={opt.ema_decay!r} must be 0 (off) or in (0, 1).")
  # Fine-tuning options (configs/mae_finetune.py; absent = off), see optimizer.py.
  layer_decay = opt.get("layer_decay", 0.0)
  _require(isinstance(layer_decay, (int, float)) and 0.0 <= layer_decay <= 1.0,
           f"config.optimizer.layer_decay={layer_decay!r} must be in [0, 1]: 0 or 1 = off, "
           "else layer i of L gets lr x layer_decay**(L+1-i) (MAE: 0.75, 0.65 for L/H).")
  freeze = opt.get("freeze", ())
  _require(isinstance(freeze, (tuple, list)) and all(isinstance(n, str) and n for n in freeze),
           f"config.optimizer.freeze={freeze!r} must be a tuple of top-level parameter "
           "names, e.g. ('encoder',) for a linear probe, or () for none.")


def validate_run(config, device_count: int, process_count: int) -> None:
  """Batch, steps, mesh: checks that need the device count."""
  _check_positive("batch_size", config.batch_size)
  _check_positive("eval_batch_size", config.eval_batch_size)
  _check_positive("total_steps", config.total_steps, allow_zero=True)  # 0: use total_epochs
  for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    _check_positive(key, config[key])
  _check_choice("on_nonfinite", config.get("on_nonfinite", "stop"), ("stop", "skip"))
  _check_positive("max_nonfinite_skips", config.get("max_nonfinite_skips", 0), allow_zero=True)
  if "profile" in config:
    _check_positive("profile.steps", config.profile.steps, allow_zero=True)
    _check_positive("profile.first_step", config.profile.first_step)
  shards = parallel.batch_shards(config.mesh, device_count)
  for key in ("batch_size", "eval_batch_size"):
    _require(config[key] % shards == 0 and config[key] % process_count == 0,
             f"config.{key}={config[key]} must be divisible by the {shards} batch shards "
             f"of the mesh (data x fsdp over {device_count} devices) and by the "
             f"{process_count} processes.")


def validate_attention(config, device_count: int, platform: str) -> None:
  """The attention backend against the platform and the mesh's `seq` axis."""
  name = config.model.attention
  seq = dict(zip(parallel.MESH_AXES, parallel.mesh_shape(config.mesh, device_count)))["seq"]
  _require(name != "splash" or platform == "tpu",
           f"config.model.attention='splash' is the TPU Pallas kernel, but this run's "
           f"platform is {platform!r} (it would run in Pallas interpret mode, orders of "
           "magnitude slower). Use 'auto' (picks the backend for the platform) or 'chunked'.")
  _require(name != "ring" or seq > 1,
           f"config.model.attention='ring' splits the tokens over the mesh's seq axis, "
           f"which has size {seq} here; set config.mesh.seq > 1, or use 'auto'.")
  _require(seq == 1 or name in ("ring", "auto"),
           f"config.mesh.seq={seq} splits the tokens over devices, but attention "
           f"{name!r} needs whole sequences on each device (they would be gathered); "
           "use config.model.attention='ring' or 'auto'.")


def validate_data(data) -> None:
  _named("data.source", lambda: sources.parse_source(
      data.source, data_dir=data.get("data_dir"), download=data.get("download", True)))
  if data.get("image_size") is not None:
    _check_positive("data.image_size", data.image_size)
  if "permute_pixels" in data:
    locality.validate_permute_config(data.permute_pixels)


def validate_common(config, device_count: int, process_count: int) -> None:
  """What every trainer's config has: model, optimizer, data, augmentation,
  batch / mesh, and a run length."""
  validate_model(config.model)
  validate_optimizer(config.optimizer)
  validate_data(config.data)
  augment.validate_augment_config(config.augment)
  validate_run(config, device_count, process_count)
  validate_attention(config, device_count, jax.default_backend())
  _check_positive("total_epochs", config.total_epochs, allow_zero=True)
  _require(config.total_steps > 0 or config.total_epochs > 0,
           f"config.total_steps={config.total_steps} and config.total_epochs="
           f"{config.total_epochs:g} leave the run without a length: 0 steps means \"use "
           "total_epochs\", and the quick configs pin total_epochs=0. Set "
           "--config.total_steps=N (> 0), or --config.total_epochs=E (> 0) with "
           "--config.total_steps=0.")
