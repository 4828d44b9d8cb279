"""DiT: a diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie).

The image (pixels, or VAE latents) is cut into `patch x patch` tokens like the
encoder's: `L/1` makes every latent pixel a token (the PiT paper's DiT
study), `L/2` is the DiT baseline. Sizes come from the encoder's table
(`vit.SIZES`: S, B, L, XL).

Conditioning: a sinusoidal timestep embedding through an MLP plus a class
embedding whose extra last row is the null class of classifier-free guidance
(labels are dropped to it with `class_dropout` in training). Each block
regresses shift / scale / gate of its two LayerNorms from the conditioning
vector; those regressions and the final layer start at zero (adaLN-Zero),
so an untrained DiT's blocks are identity maps and its output is zero.

Blocks reuse the encoder's attention (so every attention backend), MLP and
`BlockStack` (scan or unrolled, remat).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_vit import parallel
from pixel_vit.config_checks import check_choice, require
from pixel_vit.models import vit

# The timestep's sinusoidal features, before the MLP (DiT's frequency size).
TIMESTEP_FREQUENCIES = 256
POSEMBS = ("sincos2d", "learn")
normal_init = jax.nn.initializers.normal(0.02)


def timestep_features(
  t: jax.Array, dim: int = TIMESTEP_FREQUENCIES, max_period: float = 10_000.0
) -> jax.Array:
  """[B] (possibly fractional) timesteps -> [B, dim]: cos then sin of t x frequencies."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def nonaffine_norm(width: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm without scale / bias: adaLN supplies them."""
  return nnx.LayerNorm(
    width,
    epsilon=1e-6,
    use_scale=False,
    use_bias=False,
    dtype=dtype,
    use_fast_variance=False,
    rngs=rngs,
  )


def modulate(x, shift, scale):
  return x * (1.0 + scale[:, None]) + shift[:, None]


class AdaLNModulation(nnx.Module):
  """cond [B, width] -> `count` vectors [B, width] (SiLU then linear, zero-init)."""

  def __init__(self, width: int, count: int, *, dtype, rngs: nnx.Rngs):
    self.kernel = vit.param(vit.zeros, rngs, (width, count, width), ("embed", None, None))
    self.bias = vit.param(vit.zeros, rngs, (count, width), (None, None))
    self.count = count
    self.dtype = dtype

  def __call__(self, cond) -> list[jax.Array]:
    out = jnp.einsum(
      "bd,dke->bke", jax.nn.silu(cond).astype(self.dtype), self.kernel[...].astype(self.dtype)
    ) + self.bias[...].astype(self.dtype)
    return [out[:, i] for i in range(self.count)]


class DiTBlock(nnx.Module):
  """Pre-LN block whose norms are modulated and whose branches are gated by `cond`."""

  def __init__(self, size: vit.EncoderSize, *, dtype, attention: str, rngs: nnx.Rngs):
    self.norm1 = nonaffine_norm(size.width, dtype=dtype, rngs=rngs)
    self.attn = vit.MultiHeadAttention(
      size.width, size.heads, dtype=dtype, attention=attention, rngs=rngs
    )
    self.norm2 = nonaffine_norm(size.width, dtype=dtype, rngs=rngs)
    self.mlp = vit.Mlp(size.width, size.mlp_dim, dtype=dtype, rngs=rngs)
    self.modulation = AdaLNModulation(size.width, 6, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, cond, drop_rate=None, key=None):
    del drop_rate, key  # DiT trains without stochastic depth
    shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.modulation(cond)
    x = x + gate_attn[:, None] * self.attn(modulate(self.norm1(x), shift_attn, scale_attn))
    x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
    return parallel.constrain(x, ("batch", "length", "embed"))


class DiT(nnx.Module):
  """Noisy image x_t, timestep t, class y -> epsilon (and variance values)."""

  def __init__(
    self,
    *,
    size: vit.EncoderSize,
    patch: int,
    image_size: int,
    channels: int,
    num_classes: int,
    learn_sigma: bool = True,
    posemb: str = "sincos2d",
    class_dropout: float = 0.1,
    dtype=jnp.float32,
    attention: str = "xla",
    scan: bool = True,
    remat: str = "none",
    rngs: nnx.Rngs,
  ):
    if image_size % patch:
      raise ValueError(f"patch size {patch} does not divide image size {image_size}.")
    if posemb not in POSEMBS:
      raise ValueError(f"DiT posemb {posemb!r} is not one of {POSEMBS}.")
    width = size.width
    self.patch, self.grid, self.width = patch, image_size // patch, width
    self.image_size, self.channels = image_size, channels
    self.out_channels = 2 * channels if learn_sigma else channels
    self.num_classes = num_classes
    self.class_dropout = class_dropout
    self.dtype = dtype
    self.posemb_kind = posemb
    self.tokenizer_kernel = vit.param(
      vit.dense_init, rngs, (patch * patch * channels, width), (None, "embed")
    )
    self.tokenizer_bias = vit.param(vit.zeros, rngs, (width,), ("embed",))
    self.posemb = vit.learned_posemb(posemb, self.grid * self.grid, width, rngs)
    self.time_fc1_kernel = vit.param(
      normal_init, rngs, (TIMESTEP_FREQUENCIES, width), (None, "embed")
    )
    self.time_fc1_bias = vit.param(vit.zeros, rngs, (width,), ("embed",))
    self.time_fc2_kernel = vit.param(normal_init, rngs, (width, width), (None, "embed"))
    self.time_fc2_bias = vit.param(vit.zeros, rngs, (width,), ("embed",))
    # The last row is the null class used for unconditional predictions. Rows
    # are not sharded: num_classes + 1 is odd for the usual class counts.
    self.class_table = vit.param(normal_init, rngs, (num_classes + 1, width), (None, "embed"))
    self.blocks = vit.BlockStack(
      lambda r: DiTBlock(size, dtype=dtype, attention=attention, rngs=r),
      depth=size.depth,
      scan=scan,
      remat=remat,
      rngs=rngs,
    )
    self.final_norm = nonaffine_norm(width, dtype=dtype, rngs=rngs)
    self.final_modulation = AdaLNModulation(width, 2, dtype=dtype, rngs=rngs)
    self.final_kernel = vit.param(
      vit.zeros, rngs, (width, patch * patch * self.out_channels), ("embed", None)
    )
    self.final_bias = vit.param(vit.zeros, rngs, (patch * patch * self.out_channels,), (None,))

  @property
  def null_label(self) -> int:
    return self.num_classes

  def condition(self, t, labels, *, key=None) -> jax.Array:
    """[B] timesteps and labels -> [B, width]; `key` drops labels to the null class."""
    if key is not None and self.class_dropout > 0:
      drop = jax.random.bernoulli(key, self.class_dropout, labels.shape)
      labels = jnp.where(drop, self.null_label, labels)
    h = timestep_features(t) @ self.time_fc1_kernel[...] + self.time_fc1_bias[...]
    h = jax.nn.silu(h) @ self.time_fc2_kernel[...] + self.time_fc2_bias[...]
    return (h + self.class_table[...][labels]).astype(self.dtype)

  def tokenize(self, x) -> jax.Array:
    posemb = vit.position_embedding(self.posemb_kind, self.posemb, self.grid, self.width)
    return vit.embed_patches(
      x, self.patch, self.tokenizer_kernel, self.tokenizer_bias, posemb, self.dtype
    )

  def __call__(self, x, t, labels, *, key=None) -> jax.Array:
    """x [B, H, W, C], t [B], labels [B] int -> [B, H, W, out_channels] float32.

    `key` (training) switches on label dropout for classifier-free guidance.
    """
    cond = self.condition(t, labels, key=key)
    h = self.blocks(self.tokenize(x), cond=cond)
    shift, scale = self.final_modulation(cond)
    h = modulate(self.final_norm(h), shift, scale)
    out = h @ self.final_kernel[...].astype(self.dtype) + self.final_bias[...].astype(self.dtype)
    return vit.unpatchify(out.astype(jnp.float32), self.patch, self.image_size, self.image_size)


def build_dit(
  model_config, *, image_size: int, channels: int, num_classes: int, rngs: nnx.Rngs
) -> DiT:
  """The DiT a `config.model` describes (see configs/dit_pixel.py)."""
  size, patch = vit.parse_variant(model_config.variant)
  return DiT(
    size=size,
    patch=patch,
    image_size=image_size,
    channels=channels,
    num_classes=num_classes,
    learn_sigma=model_config.learn_sigma,
    posemb=model_config.posemb,
    class_dropout=model_config.class_dropout,
    dtype=vit.DTYPES[model_config.dtype],
    attention=model_config.attention,
    scan=model_config.scan,
    remat=model_config.remat,
    rngs=rngs,
  )


def validate_model_config(model) -> None:
  """The DiT-only model keys (the rest: `vit.validate_model_config`)."""
  check_choice("model.posemb", model.posemb, POSEMBS)
  require(
    0.0 <= model.class_dropout < 1.0,
    f"config.model.class_dropout={model.class_dropout!r} must be in [0, 1); "
    "classifier-free guidance needs > 0 (DiT: 0.1).",
  )
