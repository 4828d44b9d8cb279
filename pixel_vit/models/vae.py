"""The latent codec of the diffusion study: Stable Diffusion's KL-f8 AutoencoderKL in Flax NNX.

PiT's DiT experiments train on 32x32x4 latents of 256x256 ImageNet images
made by the Stable Diffusion VAE (`stabilityai/sd-vae-ft-ema` / `-mse`). This
module is that VAE, layer for layer as diffusers' `AutoencoderKL` (so its
published weights load unchanged), in NHWC float32:

  encoder: conv_in, down blocks (ResNet blocks, then an asymmetrically padded
           stride-2 conv), mid block (ResNet, single-head self-attention over
           all positions, ResNet), GroupNorm + SiLU, conv_out to 2 x latent
  quant_conv (1x1) -> (mean, logvar);  post_quant_conv (1x1) -> decoder:
           conv_in, mid block, up blocks (layers_per_block + 1 ResNet blocks,
           then nearest 2x upsampling + conv), GroupNorm + SiLU, conv_out.

Images are NHWC in [-1, 1]. The diffusion model sees *scaled* latents,
`(z - shift_factor) * scaling_factor` (SD: shift 0, scale 0.18215, which makes
them roughly unit variance): `encode_to_latents` / `decode_latents`.

`load_vae` reads a diffusers-format `diffusion_pytorch_model.safetensors`
(or the directory holding it and its `config.json`); nothing downloads.
Module and attribute names follow diffusers' state-dict keys, so the weight
mapping is a rename of a few path segments plus the layout change
(PyTorch OIHW convs -> HWIO, [out, in] linears -> [in, out]).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_vit.models import attention as attention_lib

WEIGHTS_FILENAME = "diffusion_pytorch_model.safetensors"
CONFIG_FILENAME = "config.json"
EXPECTED_FORMAT = (
  "Expected a diffusers AutoencoderKL checkpoint: a `diffusion_pytorch_model.safetensors` "
  "file (e.g. from stabilityai/sd-vae-ft-ema or sd-vae-ft-mse, vae/ folder of a Stable "
  "Diffusion repo) or the directory holding it and its config.json; original "
  "CompVis/LDM `.ckpt` files need converting with diffusers first."
)

_NORM_EPS = 1e-6
# diffusers clamps the posterior's log-variance to this range.
_LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VaeConfig:
  """The AutoencoderKL hyper-parameters that shape the network; defaults are SD KL-f8."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    counts = dict(
      in_channels=self.in_channels,
      out_channels=self.out_channels,
      latent_channels=self.latent_channels,
      layers_per_block=self.layers_per_block,
      norm_num_groups=self.norm_num_groups,
    )
    for name, value in counts.items():
      if not (isinstance(value, (int, np.integer)) and value >= 1):
        raise ValueError(f"VaeConfig.{name}={value!r} must be a positive int.")
    if not self.block_out_channels or not all(
      isinstance(c, (int, np.integer)) and c >= 1 for c in self.block_out_channels
    ):
      raise ValueError(
        f"VaeConfig.block_out_channels={self.block_out_channels!r} must be "
        "a non-empty tuple of positive ints, e.g. (128, 256, 512, 512)."
      )
    indivisible = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if indivisible:
      raise ValueError(
        f"VaeConfig.norm_num_groups={self.norm_num_groups} does not divide "
        f"block_out_channels {indivisible}; GroupNorm needs whole groups."
      )
    if not self.scaling_factor > 0:
      raise ValueError(f"VaeConfig.scaling_factor={self.scaling_factor!r} must be > 0.")

  @property
  def downsampling_factor(self) -> int:
    """Image side / latent side (8 for KL-f8)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any]) -> VaeConfig:
    """From the dict of a diffusers AutoencoderKL `config.json`.

    Keys it does not list take this class's (SD KL-f8) defaults; variants this
    module does not implement are a ValueError rather than a silently wrong net.
    """
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
      raise ValueError(
        f"config.json describes a {class_name!r}, not an AutoencoderKL. " + EXPECTED_FORMAT
      )
    unsupported = {
      "act_fn": (config.get("act_fn", "silu"), "silu"),
      "mid_block_add_attention": (config.get("mid_block_add_attention", True), True),
      "latents_mean": (config.get("latents_mean"), None),
      "latents_std": (config.get("latents_std"), None),
    }
    for kind, wanted in (
      ("down_block_types", "DownEncoderBlock2D"),
      ("up_block_types", "UpDecoderBlock2D"),
    ):
      types = tuple(config.get(kind, ()))
      unsupported[kind] = (types, tuple(t for t in types if t == wanted))
    wrong = {key: got for key, (got, wanted) in unsupported.items() if got != wanted}
    if wrong:
      raise ValueError(
        f"config.json has AutoencoderKL options this VAE does not implement: "
        f"{wrong}; only the Stable Diffusion layout (silu, "
        "DownEncoderBlock2D / UpDecoderBlock2D, mid-block attention, no "
        "latents_mean/std) is supported."
      )
    defaults = cls()
    fields = {}
    for field in dataclasses.fields(cls):
      value = config.get(field.name)
      fields[field.name] = getattr(defaults, field.name) if value is None else value
    return cls(**fields)


# ------------------------------------------------------------------ layers


def _conv(
  in_channels: int,
  out_channels: int,
  kernel: int,
  *,
  rngs: nnx.Rngs,
  stride: int = 1,
  padding="SAME",
) -> nnx.Conv:
  return nnx.Conv(
    in_channels, out_channels, (kernel, kernel), strides=stride, padding=padding, rngs=rngs
  )


def _group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Two-pass variance, as PyTorch: the fast E[x^2] - E[x]^2 form loses digits.
  return nnx.GroupNorm(
    channels, num_groups=groups, epsilon=_NORM_EPS, use_fast_variance=False, rngs=rngs
  )


class ResnetBlock(nnx.Module):
  """GroupNorm-SiLU-conv twice plus a (1x1-projected when widths differ) shortcut."""

  def __init__(self, in_channels: int, out_channels: int, groups: int, *, rngs: nnx.Rngs):
    self.norm1 = _group_norm(in_channels, groups, rngs)
    self.conv1 = _conv(in_channels, out_channels, 3, rngs=rngs)
    self.norm2 = _group_norm(out_channels, groups, rngs)
    self.conv2 = _conv(out_channels, out_channels, 3, rngs=rngs)
    self.conv_shortcut = (
      _conv(in_channels, out_channels, 1, rngs=rngs) if in_channels != out_channels else None
    )

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return shortcut + h


class SpatialSelfAttention(nnx.Module):
  """Single-head self-attention over all H*W positions, with a residual connection."""

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
    self.group_norm = _group_norm(channels, groups, rngs)
    self.to_q = nnx.Linear(channels, channels, rngs=rngs)
    self.to_k = nnx.Linear(channels, channels, rngs=rngs)
    self.to_v = nnx.Linear(channels, channels, rngs=rngs)
    self.to_out = nnx.Linear(channels, channels, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, 1, c)  # one head of width c
    y = attention_lib.xla_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))
    return x + self.to_out(y).reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """ResNet, attention, ResNet at the lowest resolution."""

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([SpatialSelfAttention(channels, groups, rngs=rngs)])

  def __call__(self, x):
    x = self.resnets[0](x)
    x = self.attentions[0](x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after padding only bottom/right by one, as SD's encoder."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs)

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour 2x, then a 3x3 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, rngs=rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nnx.Module):
  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    num_layers: int,
    groups: int,
    *,
    downsample: bool,
    rngs: nnx.Rngs,
  ):
    self.resnets = nnx.List(
      [
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, rngs=rngs)
        for i in range(num_layers)
      ]
    )
    self.downsampler = Downsample(out_channels, rngs=rngs) if downsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsampler is None else self.downsampler(x)


class UpBlock(nnx.Module):
  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    num_layers: int,
    groups: int,
    *,
    upsample: bool,
    rngs: nnx.Rngs,
  ):
    self.resnets = nnx.List(
      [
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, rngs=rngs)
        for i in range(num_layers)
      ]
    )
    self.upsampler = Upsample(out_channels, rngs=rngs) if upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.upsampler is None else self.upsampler(x)


class Encoder(nnx.Module):
  """Image [B, H, W, in] -> [B, H/f, W/f, 2 * latent] (mean and logvar, before quant_conv)."""

  def __init__(self, config: VaeConfig, *, rngs: nnx.Rngs):
    widths, groups = config.block_out_channels, config.norm_num_groups
    self.conv_in = _conv(config.in_channels, widths[0], 3, rngs=rngs)
    self.down_blocks = nnx.List(
      [
        DownBlock(
          widths[max(i - 1, 0)],
          width,
          config.layers_per_block,
          groups,
          downsample=i < len(widths) - 1,
          rngs=rngs,
        )
        for i, width in enumerate(widths)
      ]
    )
    self.mid_block = MidBlock(widths[-1], groups, rngs=rngs)
    self.conv_norm_out = _group_norm(widths[-1], groups, rngs)
    self.conv_out = _conv(widths[-1], 2 * config.latent_channels, 3, rngs=rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent [B, h, w, latent] -> image [B, h*f, w*f, out]."""

  def __init__(self, config: VaeConfig, *, rngs: nnx.Rngs):
    widths, groups = config.block_out_channels[::-1], config.norm_num_groups
    self.conv_in = _conv(config.latent_channels, widths[0], 3, rngs=rngs)
    self.mid_block = MidBlock(widths[0], groups, rngs=rngs)
    self.up_blocks = nnx.List(
      [
        UpBlock(
          widths[max(i - 1, 0)],
          width,
          config.layers_per_block + 1,
          groups,
          upsample=i < len(widths) - 1,
          rngs=rngs,
        )
        for i, width in enumerate(widths)
      ]
    )
    self.conv_norm_out = _group_norm(widths[-1], groups, rngs)
    self.conv_out = _conv(widths[-1], config.out_channels, 3, rngs=rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The KL-regularised autoencoder; NHWC, float32, images in [-1, 1]."""

  def __init__(self, config: VaeConfig = VaeConfig(), *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)
    latent = config.latent_channels
    self.quant_conv = _conv(2 * latent, 2 * latent, 1, rngs=rngs) if config.use_quant_conv else None
    self.post_quant_conv = (
      _conv(latent, latent, 1, rngs=rngs) if config.use_post_quant_conv else None
    )

  def _check_spatial(self, x: jax.Array, what: str, channels: int, factor: int) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f"{what} must be NHWC with {channels} channels, got shape {x.shape}.")
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
        f"{what} of size {x.shape[1]}x{x.shape[2]} must be a multiple of "
        f"{factor} on each side (the VAE downsamples by {factor})."
      )

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, C] in [-1, 1] -> posterior (mean, logvar), each [B, H/f, W/f, latent]."""
    self._check_spatial(images, "images", self.config.in_channels, self.config.downsampling_factor)
    moments = self.encoder(images.astype(jnp.float32))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents [B, h, w, latent] -> images [B, h*f, w*f, C], roughly in [-1, 1]."""
    self._check_spatial(latents, "latents", self.config.latent_channels, 1)
    z = latents.astype(jnp.float32)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def encode_to_latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Images in [-1, 1] -> the diffusion model's scaled latents.

    The posterior mean by default; a posterior sample when `key` is given:
    either one key for the batch, or a batch of keys (one per image, so an
    image's sample does not depend on what it is batched with).
    """
    mean, logvar = self.encode(images)
    z = mean
    if key is not None:
      z = mean + jnp.exp(0.5 * logvar) * _standard_normal(key, mean.shape)
    return (z - self.config.shift_factor) * self.config.scaling_factor

  def decode_latents(self, scaled_latents: jax.Array) -> jax.Array:
    """Scaled latents (as `encode_to_latents` makes them) -> images in [0, 1]."""
    z = scaled_latents / self.config.scaling_factor + self.config.shift_factor
    return jnp.clip((self.decode(z) + 1.0) / 2.0, 0.0, 1.0)


def _standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """N(0, 1) noise of `shape` from one key, or from one key per leading row."""
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  single_key_ndim = 0 if typed else 1  # raw uint32 keys carry a trailing [2]
  if key.ndim == single_key_ndim:
    return jax.random.normal(key, shape, jnp.float32)
  if key.ndim == single_key_ndim + 1 and key.shape[0] == shape[0]:
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(key)
  raise ValueError(
    f"key of shape {key.shape} is neither one PRNG key nor one per image for a batch of {shape[0]}."
  )


# ------------------------------------------------------------------ weights

# NNX attribute names that stand for a differently spelled diffusers key segment.
_SEGMENT_TO_DIFFUSERS = {
  "downsampler": "downsamplers.0",
  "upsampler": "upsamplers.0",
  "to_out": "to_out.0",
}
_LEAF_TO_DIFFUSERS = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Older diffusers checkpoints (sd-vae-ft-* as first published) name the
# mid-block attention projections differently; diffusers renames them on load too.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_MAX_LISTED = 5


def diffusers_key(path: tuple) -> str:
  """An NNX parameter path -> its diffusers state-dict key.

  ('encoder', 'down_blocks', 0, 'downsampler', 'conv', 'kernel')
    -> 'encoder.down_blocks.0.downsamplers.0.conv.weight'
  """
  *modules, leaf = path
  segments = [_SEGMENT_TO_DIFFUSERS.get(str(m), str(m)) for m in modules]
  return ".".join(segments + [_LEAF_TO_DIFFUSERS[leaf]])


def _to_flax_layout(array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray | None:
  """A PyTorch-layout tensor in the layout of a Flax parameter, or None if shapes disagree."""
  if len(flax_shape) == 4:  # conv: OIHW -> HWIO
    converted = array.transpose(2, 3, 1, 0) if array.ndim == 4 else None
  elif len(flax_shape) == 2:  # linear: [out, in] -> [in, out]; legacy 1x1 convs too
    if array.ndim == 4 and array.shape[2:] == (1, 1):
      array = array[:, :, 0, 0]
    converted = array.T if array.ndim == 2 else None
  else:
    converted = array
  if converted is None or converted.shape != tuple(flax_shape):
    return None
  return converted


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if len(flax_shape) == 2:
    return tuple(flax_shape[::-1])
  return tuple(flax_shape)


def diffusers_state_dict(model: AutoencoderKL) -> dict[str, np.ndarray]:
  """The model's parameters as a diffusers AutoencoderKL state dict (PyTorch layouts).

  The inverse of `load_vae`'s mapping: `safetensors.numpy.save_file` of it is
  a checkpoint that `load_vae` and diffusers both read.
  """
  tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(variable.get_value(), np.float32)
    if value.ndim == 4:  # HWIO -> OIHW
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
      value = value.T
    tensors[diffusers_key(path)] = np.ascontiguousarray(value)
  return tensors


def _rename_legacy_attention(
  tensors: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors under current diffusers names, {current name: name in the file} of renamed ones)."""
  renamed, file_names = {}, {}
  for key, value in tensors.items():
    parts = key.split(".")
    if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in _LEGACY_ATTENTION_NAMES:
      new_key = ".".join(parts[:-2] + [_LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
      file_names[new_key] = key
      key = new_key
    if key in renamed:
      raise ValueError(
        f"weights hold the attention parameter {key} under both its current "
        "and its legacy name; keep one. " + EXPECTED_FORMAT
      )
    renamed[key] = value
  return renamed, file_names


def _listed(names) -> str:
  names = sorted(names)
  more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def infer_config(tensors: Mapping[str, np.ndarray]) -> VaeConfig:
  """The architecture a diffusers AutoencoderKL state dict implies.

  Channel counts and depth come from the shapes; GroupNorm's group count and
  the latent scale cannot be read from shapes and take the SD defaults (32,
  0.18215): pass a config.json (or a `VaeConfig`) for other VAEs.
  """
  required = (
    "encoder.conv_in.weight",
    "encoder.down_blocks.0.resnets.0.conv1.weight",
    "decoder.conv_in.weight",
    "decoder.conv_out.weight",
  )
  missing = [key for key in required if key not in tensors]
  if missing:
    raise ValueError(
      f"weights have none of the keys {missing}, so they are not an "
      f"AutoencoderKL state dict (first keys: {_listed(tensors)}). " + EXPECTED_FORMAT
    )
  widths = []
  while f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight" in tensors:
    widths.append(tensors[f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight"].shape[0])
  layers = 0
  while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in tensors:
    layers += 1
  defaults = VaeConfig()
  groups = defaults.norm_num_groups
  if any(w % groups for w in widths):
    raise ValueError(
      f"block widths {widths} are not all divisible by the default "
      f"{groups} GroupNorm groups; put the checkpoint's config.json next to "
      "the weights (or pass a VaeConfig) to say norm_num_groups."
    )
  return VaeConfig(
    in_channels=tensors["encoder.conv_in.weight"].shape[1],
    out_channels=tensors["decoder.conv_out.weight"].shape[0],
    latent_channels=tensors["decoder.conv_in.weight"].shape[1],
    block_out_channels=tuple(widths),
    layers_per_block=layers,
    norm_num_groups=groups,
    use_quant_conv="quant_conv.weight" in tensors,
    use_post_quant_conv="post_quant_conv.weight" in tensors,
  )


def resolve_vae_paths(path: str) -> tuple[str, str | None]:
  """(weights file, config.json or None) for a file or a diffusers model directory."""
  path = os.fspath(path)
  if os.path.isdir(path):
    weights = os.path.join(path, WEIGHTS_FILENAME)
    if not os.path.isfile(weights):
      raise ValueError(f"VAE directory {path} has no {WEIGHTS_FILENAME}. " + EXPECTED_FORMAT)
    config = os.path.join(path, CONFIG_FILENAME)
    return weights, config if os.path.isfile(config) else None
  if not os.path.isfile(path):
    raise ValueError(f"VAE weights {path} do not exist. " + EXPECTED_FORMAT)
  if not path.endswith(".safetensors"):
    raise ValueError(f"VAE weights {path} are not a .safetensors file. " + EXPECTED_FORMAT)
  sibling_config = os.path.join(os.path.dirname(path), CONFIG_FILENAME)
  # Only trust a config.json beside the file when the file has diffusers' own name.
  if os.path.basename(path) == WEIGHTS_FILENAME and os.path.isfile(sibling_config):
    return path, sibling_config
  return path, None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import numpy as safetensors_numpy

  try:
    return safetensors_numpy.load_file(path)
  except Exception as e:  # safetensors raises its own error types for bad headers / dtypes
    raise ValueError(
      f"cannot read {path} as float safetensors ({type(e).__name__}: {e}). " + EXPECTED_FORMAT
    ) from e


def load_vae(path: str, config: VaeConfig | None = None) -> AutoencoderKL:
  """An AutoencoderKL with the weights of a diffusers-format safetensors file.

  `path` is the `.safetensors` file or a directory holding
  `diffusion_pytorch_model.safetensors` and optionally `config.json`. The
  architecture comes from `config`, else the config.json, else the tensor
  shapes. Every parameter must be present with the right shape and no key may
  be left over; otherwise a ValueError lists the offending keys.
  """
  weights_path, config_path = resolve_vae_paths(path)
  tensors, file_names = _rename_legacy_attention(_read_safetensors(weights_path))
  if config is None and config_path is not None:
    with open(config_path) as f:
      config = VaeConfig.from_diffusers_config(json.load(f))
  if config is None:
    config = infer_config(tensors)

  abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  values, missing, wrong_shape = {}, [], []
  for nnx_path, variable in nnx.to_flat_state(state):
    key = diffusers_key(nnx_path)
    flax_shape = tuple(variable.get_value().shape)
    if key not in tensors:
      missing.append(key)
      continue
    converted = _to_flax_layout(np.asarray(tensors[key]), flax_shape)
    if converted is None:
      wrong_shape.append(
        f"{file_names.get(key, key)} {tuple(tensors[key].shape)} (expected "
        f"{_torch_shape(flax_shape)})"
      )
      continue
    values[nnx_path] = converted
  expected_keys = {diffusers_key(p) for p, _ in nnx.to_flat_state(state)}
  unexpected = sorted(file_names.get(k, k) for k in set(tensors) - expected_keys)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: {_listed(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected: {_listed(unexpected)}")
  if wrong_shape:
    problems.append(f"{len(wrong_shape)} with the wrong shape: {_listed(wrong_shape)}")
  if problems:
    raise ValueError(
      f"VAE weights {weights_path} do not fit an AutoencoderKL with {config}: "
      + "; ".join(problems)
      + ". "
      + EXPECTED_FORMAT
    )

  pure = {}
  for nnx_path, value in values.items():
    node = pure
    for segment in nnx_path[:-1]:
      node = node.setdefault(segment, {})
    node[nnx_path[-1]] = jnp.asarray(value, jnp.float32)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)
