"""The ViT / PiT encoder and classifier (Flax NNX).

One encoder serves patches and pixels: the tokenizer cuts the image into
`patch x patch` tiles, so `patch=1` makes every pixel a token (PiT). Model
sizes come from one table, written `SIZE/PATCH` (`Ti/1`, `S/2`).

Parameters carry logical axis names (`logical_axes` metadata: embed, mlp,
heads, kv, vocab, layers) and activations are constrained by logical names;
`pixel_vit.parallel` maps both to mesh axes with the config's rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_vit import hardware, parallel
from pixel_vit.config_checks import check_choice, named, require
from pixel_vit.models import attention as attention_lib


@dataclasses.dataclass(frozen=True)
class EncoderSize:
  width: int
  depth: int
  heads: int
  mlp_dim: int


# The ViT size table (Dosovitskiy et al.; DeiT for Ti; XL from DiT), plus `mu`
# for tests and quick runs. DiT uses the same S / B / L / XL.
SIZES: dict[str, EncoderSize] = {
  "mu": EncoderSize(width=64, depth=4, heads=4, mlp_dim=256),
  "Ti": EncoderSize(width=192, depth=12, heads=3, mlp_dim=768),
  "S": EncoderSize(width=384, depth=12, heads=6, mlp_dim=1536),
  "B": EncoderSize(width=768, depth=12, heads=12, mlp_dim=3072),
  "L": EncoderSize(width=1024, depth=24, heads=16, mlp_dim=4096),
  "XL": EncoderSize(width=1152, depth=28, heads=16, mlp_dim=4608),
  "H": EncoderSize(width=1280, depth=32, heads=16, mlp_dim=5120),
}

POSEMBS = ("learn", "sincos2d", "none")
# How a token's pixels become a vector: `linear`, a projection of the
# (normalised) values (ViT's patch embedding); `vocab`, learned embeddings of
# the 8-bit values (see `embed_pixel_values`).
TOKENIZERS = ("linear", "vocab")
PIXEL_LEVELS = 256
POOLS = ("cls", "gap")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  # `auto` (resolved per input by BlockStack.resolve_remat): `dots` when it
  # fits, else `full`; see choose_remat.
  # Keeps the projection / MLP matmul outputs and the flash backends'
  # (`chunked`, `splash`) output and log-sum-exp (O(length)); recomputes
  # the cheap elementwise work and the [length, length] scores of `xla`.
  "dots": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(*attention_lib.REMAT_SAVEABLE_NAMES),
  ),
}


# `auto`: `dots` when its saved activations (estimated below) fit in this
# fraction of one device's memory, else `full`; the rest is left for the
# state, temporaries and the runtime. Low-memory switch: remat='full'.
REMAT_AUTO_MEMORY_FRACTION = 0.4
REMAT_CHOICES = ("auto", "none", "dots", "full")


def saved_activation_bytes(
  remat: str,
  *,
  batch: int,
  tokens: int,
  width: int,
  mlp_dim: int,
  depth: int,
  dtype_bytes: int,
  attention_bytes: float = 0.0,
) -> int:
  """What the backward pass keeps of the blocks' forward, per device.

  Per token and layer: `none` keeps about 11 width-sized vectors (LayerNorm
  inputs and outputs, q, k, v, attention output, projections, residuals)
  and 2 mlp-sized ones (fc1, GELU), plus, not counted here, the [heads, N,
  N] probabilities of an attention that materialises them (`xla`);
  `dots` keeps the matmul outputs (qkv, out, fc1, fc2: 5 x width + mlp) and
  `attention_bytes` per token of the attention backend's own residuals
  (`attention.remat_saved_bytes`); `full` keeps each layer's input only.
  """
  per_token = {"none": 11 * width + 2 * mlp_dim, "dots": 5 * width + mlp_dim, "full": width}[
    remat
  ] * dtype_bytes
  if remat == "dots":
    per_token += attention_bytes
  return int(depth * batch * tokens * per_token)


def choose_remat(*, memory_bytes: int, **shape) -> str:
  """`auto`'s pick: `dots` if its saved activations fit in
  REMAT_AUTO_MEMORY_FRACTION of `memory_bytes`, else `full`. `shape`: the
  keyword arguments of `saved_activation_bytes`.

  Not `none`, although it recomputes nothing: on the 2-core CPU it was
  slower than `dots` everywhere we measured (benchmarks/README.md, "Levers,
  measured one by one"): PiT-Ti/1 batch 32 43.5 s a step against 27.1,
  ViT-Ti/2 5.56 against 4.54, mu/1 16x16 batch 128 2.52 against 2.25.
  Keeping every activation costs more memory traffic than recomputing the
  cheap elementwise ops; `dots` keeps only what is costly to recompute.
  """
  budget = REMAT_AUTO_MEMORY_FRACTION * memory_bytes
  return "dots" if saved_activation_bytes("dots", **shape) <= budget else "full"


def auto_remat(
  size: EncoderSize,
  *,
  batch_per_device: int,
  tokens: int,
  dtype,
  memory_bytes: int | None = None,
  attention_bytes: float = 0.0,
) -> str:
  """What `remat='auto'` runs for `size` blocks on `tokens` tokens; the
  memory is one device's of the target (`hardware.active_target`) unless given."""
  return choose_remat(
    memory_bytes=hardware.active_target().memory_bytes if memory_bytes is None else memory_bytes,
    batch=batch_per_device,
    tokens=tokens,
    width=size.width,
    mlp_dim=size.mlp_dim,
    depth=size.depth,
    dtype_bytes=jnp.dtype(dtype).itemsize,
    attention_bytes=attention_bytes,
  )


def parse_variant(variant: str) -> tuple[EncoderSize, int]:
  """`'Ti/1'` -> (Ti size, patch 1). Raises ValueError naming what is allowed."""
  size_name, sep, patch = variant.partition("/")
  if not sep or size_name not in SIZES or not patch.isdigit() or int(patch) < 1:
    raise ValueError(
      f"model variant {variant!r} is not SIZE/PATCH with SIZE in "
      f"{list(SIZES)} and PATCH a positive integer, e.g. 'Ti/1' (pixels) or 'Ti/2'."
    )
  return SIZES[size_name], int(patch)


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], tokens in row-major image order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: jax.Array, patch: int, height: int, width: int) -> jax.Array:
  """Inverse of `patchify`."""
  b, _, d = tokens.shape
  c = d // (patch * patch)
  x = tokens.reshape(b, height // patch, width // patch, patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def sincos2d_posemb(
  grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0
) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding [1, grid_h*grid_w, width]."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width % 4 == 0, got {width}.")
  y, x = np.mgrid[:grid_h, :grid_w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = np.einsum("m,d->md", y.ravel(), omega)
  x = np.einsum("m,d->md", x.ravel(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


def param(init, rngs: nnx.Rngs, shape, logical_axes) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=logical_axes)


dense_init = jax.nn.initializers.xavier_uniform()
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def layer_norm(width: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """Flax's LayerNorm (statistics in float32, output in the compute dtype),
  with logical axes on its scale and bias."""
  axes = {"logical_axes": ("embed",)}
  return nnx.LayerNorm(
    width,
    epsilon=1e-6,
    dtype=dtype,
    use_fast_variance=False,
    scale_metadata=axes,
    bias_metadata=axes,
    rngs=rngs,
  )


def learned_posemb(
  kind: str, num_tokens: int, width: int, rngs: nnx.Rngs, logical_axes=(None, None, "embed")
) -> nnx.Param | None:
  """The parameter of a `learn` position embedding (random init, as in the
  paper: pixels are a set); None for the parameter-free kinds."""
  if kind != "learn":
    return None
  return param(jax.nn.initializers.normal(0.02), rngs, (1, num_tokens, width), logical_axes)


def resample_posemb(posemb: jax.Array, grid: int) -> jax.Array:
  """A learned [1, g*g, width] position embedding resampled to [1, grid*grid,
  width] over its 2-D grid, bilinearly (as big_vision's `resample_posemb`,
  which zooms with scipy; here jax.image.resize: half-pixel centres, and
  antialiased when shrinking), to fine-tune at another image or patch size."""
  old_grid = math.isqrt(posemb.shape[1])
  if old_grid * old_grid != posemb.shape[1]:
    raise ValueError(f"a position embedding of {posemb.shape[1]} tokens is not a square grid.")
  if old_grid == grid:
    return posemb
  table = posemb.reshape(old_grid, old_grid, posemb.shape[-1])
  resized = jax.image.resize(
    table.astype(jnp.float32), (grid, grid, posemb.shape[-1]), method="bilinear"
  )
  return resized.reshape(1, grid * grid, posemb.shape[-1]).astype(posemb.dtype)


def position_embedding(kind: str, learned: nnx.Param | None, grid: int, width: int) -> jax.Array:
  """[1, grid*grid, width]: the learned table, fixed sin-cos, or zeros (`none`)."""
  if kind == "learn":
    return learned[...]
  if kind == "sincos2d":
    return jnp.asarray(sincos2d_posemb(grid, grid, width))
  return jnp.zeros((1, grid * grid, width), jnp.float32)


def embed_patches(
  images: jax.Array, patch: int, kernel: nnx.Param, bias: nnx.Param, posemb: jax.Array, dtype
) -> jax.Array:
  """[B, H, W, C] -> [B, num_patches, width]: linear patch embedding plus
  position embedding (the encoder's and DiT's tokenizer)."""
  tokens = patchify(images.astype(dtype), patch) @ kernel[...].astype(dtype)
  return add_bias_and_position(tokens, bias, posemb, dtype)


def add_bias_and_position(
  tokens: jax.Array, bias: nnx.Param, posemb: jax.Array, dtype
) -> jax.Array:
  tokens = tokens + bias[...].astype(dtype)
  return parallel.constrain(tokens + posemb.astype(dtype), ("batch", "length", "embed"))


def embed_pixel_values(
  images: jax.Array, patch: int, table: nnx.Param, pixel_stats: tuple, dtype
) -> jax.Array:
  """[B, H, W, C] normalised images -> [B, num_patches, width]: the sum, over
  a token's p*p*C 8-bit values, of learned embeddings, one 256-entry table per
  (position in the patch, channel). For one RGB pixel that is three tables
  summed: the memory-feasible form of the paper's 256^3 colour vocabulary.

  `pixel_stats` = (mean, std) of the normalisation, to recover the 8-bit
  level v = 255 * (x * std + mean). Integer levels (every eval image) select
  one table row exactly; values between levels (after a resized crop or
  mixup) interpolate linearly between the two neighbouring rows. The lookup
  is a matmul with "hat" weights max(0, 1 - |v - level|), which TPUs and
  CPUs run as a dense dot rather than a gather.
  """
  mean, std = (jnp.asarray(s, jnp.float32) for s in pixel_stats)
  levels = jnp.clip((images.astype(jnp.float32) * std + mean) * 255.0, 0.0, PIXEL_LEVELS - 1)
  levels = patchify(levels, patch)  # [B, N, p*p*C]
  grid = jnp.arange(PIXEL_LEVELS, dtype=jnp.float32)
  weights = jax.nn.relu(1.0 - jnp.abs(levels[..., None] - grid))  # [B, N, p*p*C, 256]
  return jnp.einsum("bnkv,kvd->bnd", weights.astype(dtype), table[...].astype(dtype))


class MultiHeadAttention(nnx.Module):
  """Self-attention with a fused qkv projection; the math is a backend choice."""

  def __init__(self, width: int, heads: int, *, dtype, attention: str, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width {width} is not divisible by heads {heads}.")
    head_dim = width // heads
    self.qkv_kernel = param(
      dense_init, rngs, (width, 3, heads, head_dim), ("embed", None, "heads", "kv")
    )
    self.qkv_bias = param(zeros, rngs, (3, heads, head_dim), (None, "heads", "kv"))
    self.out_kernel = param(dense_init, rngs, (heads, head_dim, width), ("heads", "kv", "embed"))
    self.out_bias = param(zeros, rngs, (width,), ("embed",))
    self.dtype = dtype
    self.attention = attention

  def __call__(self, x):
    qkv = jnp.einsum("bnd,dthk->tbnhk", x, self.qkv_kernel[...].astype(self.dtype))
    qkv = qkv + self.qkv_bias[...].astype(self.dtype)[:, None, None]
    q, k, v = (parallel.constrain(t, ("batch", "length", "heads", "kv")) for t in qkv)
    y = attention_lib.get_backend(self.attention)(q, k, v)
    y = jnp.einsum("bnhk,hkd->bnd", y, self.out_kernel[...].astype(self.dtype))
    return y + self.out_bias[...].astype(self.dtype)


class Mlp(nnx.Module):
  def __init__(self, width: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs):
    self.fc1_kernel = param(dense_init, rngs, (width, mlp_dim), ("embed", "mlp"))
    self.fc1_bias = param(zeros, rngs, (mlp_dim,), ("mlp",))
    self.fc2_kernel = param(dense_init, rngs, (mlp_dim, width), ("mlp", "embed"))
    self.fc2_bias = param(zeros, rngs, (width,), ("embed",))
    self.dtype = dtype

  def __call__(self, x):
    h = x @ self.fc1_kernel[...].astype(self.dtype) + self.fc1_bias[...].astype(self.dtype)
    h = parallel.constrain(jax.nn.gelu(h), ("batch", "length", "mlp"))
    return h @ self.fc2_kernel[...].astype(self.dtype) + self.fc2_bias[...].astype(self.dtype)


def drop_path(x, rate, key):
  """Stochastic depth: drop the whole residual branch per example.

  `rate` may be traced (it is scanned over layers); rate 0 keeps everything.
  """
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask.astype(x.dtype) / keep.astype(x.dtype))


class EncoderBlock(nnx.Module):
  """Pre-LayerNorm Transformer block."""

  def __init__(self, size: EncoderSize, *, dtype, attention: str, rngs: nnx.Rngs):
    self.norm1 = layer_norm(size.width, dtype=dtype, rngs=rngs)
    self.attn = MultiHeadAttention(
      size.width, size.heads, dtype=dtype, attention=attention, rngs=rngs
    )
    self.norm2 = layer_norm(size.width, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(size.width, size.mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, drop_rate=None, key=None):
    stochastic = key is not None and drop_rate is not None
    if stochastic:
      key_attn, key_mlp = jax.random.split(key)
    y = self.attn(self.norm1(x))
    x = x + (drop_path(y, drop_rate, key_attn) if stochastic else y)
    y = self.mlp(self.norm2(x))
    x = x + (drop_path(y, drop_rate, key_mlp) if stochastic else y)
    return parallel.constrain(x, ("batch", "length", "embed"))


class BlockStack(nnx.Module):
  """`depth` blocks with parameters stacked on a leading `layers` axis.

  Applied with `lax.scan` (compiles one block) or unrolled; both read the same
  stacked parameters, so they are interchangeable on one checkpoint.
  `make_block(rngs)` builds one block (encoder, decoder or DiT block); every
  block is called as `block(x, drop_rate=, key=, **context)`, where `context`
  (e.g. DiT's conditioning vector) is the same for all layers.
  """

  def __init__(
    self,
    make_block: Callable[[nnx.Rngs], nnx.Module],
    *,
    depth: int,
    scan: bool,
    remat: str,
    rngs: nnx.Rngs,
  ):

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return make_block(rngs)

    self.layers = make_blocks(rngs)
    for _, variable in nnx.iter_graph(self.layers):
      if isinstance(variable, nnx.Variable) and variable.has_metadata("logical_axes"):
        variable.set_metadata(
          logical_axes=("layers",) + tuple(variable.get_metadata("logical_axes"))
        )
    self.depth = depth
    self.scan = scan
    self.remat = remat

  def resolve_remat(self, x) -> str:
    """`auto` for this input (`auto_remat`): the per-device batch is the
    global one over the active mesh's batch shards."""
    attn, mlp = getattr(self.layers, "attn", None), getattr(self.layers, "mlp", None)
    if attn is None or mlp is None:
      return "full"
    batch, tokens, width = x.shape
    size = EncoderSize(
      width=width,
      depth=self.depth,
      heads=attn.qkv_kernel.shape[-2],
      mlp_dim=mlp.fc1_kernel.shape[-1],
    )
    per_device = -(-batch // parallel.batch_shards_active())
    memory = hardware.active_target().memory_bytes
    attention_bytes = attention_lib.remat_saved_bytes(
      attn.attention,
      batch=batch,
      length=tokens,
      heads=size.heads,
      head_dim=width // size.heads,
      dtype=x.dtype,
    )
    remat = auto_remat(
      size,
      batch_per_device=per_device,
      tokens=tokens,
      dtype=x.dtype,
      memory_bytes=memory,
      attention_bytes=attention_bytes,
    )
    kept = saved_activation_bytes(
      "dots",
      batch=per_device,
      tokens=tokens,
      width=width,
      mlp_dim=size.mlp_dim,
      depth=self.depth,
      dtype_bytes=jnp.dtype(x.dtype).itemsize,
      attention_bytes=attention_bytes,
    )
    hardware.record_choice(
      "model.remat=auto",
      remat,
      f"{self.depth} blocks of width {width} on {tokens} tokens, batch {per_device} per "
      f"device: 'dots' keeps {kept / hardware.GIB:.2f} GiB, "
      f"{'within' if remat == 'dots' else 'over'} {REMAT_AUTO_MEMORY_FRACTION:.0%} of the "
      f"device's {memory / hardware.GIB:.1f} GiB ('full' uses the least memory)",
    )
    return remat

  def __call__(self, x, *, drop_rates=None, key=None, **context):
    graphdef, state = nnx.split(self.layers)
    stochastic = key is not None and drop_rates is not None
    per_layer = (
      state,
      jnp.asarray(drop_rates, jnp.float32) if stochastic else None,
      jax.random.split(key, self.depth) if stochastic else None,
    )

    def apply_block(x, layer):
      layer_state, rate, layer_key = layer
      block = nnx.merge(graphdef, layer_state)
      return block(x, drop_rate=rate, key=layer_key, **context), None

    remat = self.resolve_remat(x) if self.remat == "auto" else self.remat
    if remat != "none":
      apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[remat])
    if self.scan:
      x, _ = jax.lax.scan(apply_block, x, per_layer)
    else:
      for i in range(self.depth):
        x, _ = apply_block(x, jax.tree.map(lambda a, i=i: a[i], per_layer))
    return x


def encoder_blocks(
  size: EncoderSize, *, dtype, attention: str, scan: bool, remat: str, rngs: nnx.Rngs
) -> BlockStack:
  """`size.depth` pre-LN Transformer blocks (the encoder's, the MAE decoder's)."""
  return BlockStack(
    lambda r: EncoderBlock(size, dtype=dtype, attention=attention, rngs=r),
    depth=size.depth,
    scan=scan,
    remat=remat,
    rngs=rngs,
  )


class Encoder(nnx.Module):
  """Tokenizer + position embedding + Transformer blocks + final LayerNorm."""

  def __init__(
    self,
    *,
    size: EncoderSize,
    patch: int,
    image_size: int,
    channels: int,
    posemb: Literal["learn", "sincos2d", "none"] = "learn",
    cls_token: bool = True,
    dtype=jnp.float32,
    attention: str = "xla",
    scan: bool = True,
    remat: str = "none",
    drop_path_rate: float = 0.0,
    tokenizer: Literal["linear", "vocab"] = "linear",
    pixel_stats: tuple | None = None,
    rngs: nnx.Rngs,
  ):
    """`pixel_stats` = (mean, std) of the input normalisation: `vocab` needs it."""
    if image_size % patch:
      raise ValueError(f"patch size {patch} does not divide image size {image_size}.")
    if tokenizer not in TOKENIZERS:
      raise ValueError(f"tokenizer {tokenizer!r} is not one of {TOKENIZERS}.")
    if tokenizer == "vocab" and pixel_stats is None:
      raise ValueError(
        "tokenizer 'vocab' needs pixel_stats=(mean, std) of the input "
        "normalisation to recover 8-bit pixel values."
      )
    self.patch = patch
    self.grid = image_size // patch
    self.num_patches = self.grid * self.grid
    self.width = size.width
    self.dtype = dtype
    self.posemb_kind = posemb
    self.drop_path_rate = drop_path_rate
    self.depth = size.depth
    self.tokenizer = tokenizer
    self.pixel_stats = pixel_stats
    values = patch * patch * channels
    if tokenizer == "vocab":  # N(0, 0.02) rows, like a word-embedding table
      self.tokenizer_table = param(
        jax.nn.initializers.normal(0.02),
        rngs,
        (values, PIXEL_LEVELS, size.width),
        (None, None, "embed"),
      )
    else:
      self.tokenizer_kernel = param(dense_init, rngs, (values, size.width), (None, "embed"))
    self.tokenizer_bias = param(zeros, rngs, (size.width,), ("embed",))
    self.posemb = learned_posemb(posemb, self.num_patches, size.width, rngs)
    self.cls = param(zeros, rngs, (1, 1, size.width), (None, None, "embed")) if cls_token else None
    self.blocks = encoder_blocks(
      size, dtype=dtype, attention=attention, scan=scan, remat=remat, rngs=rngs
    )
    self.norm = layer_norm(size.width, dtype=dtype, rngs=rngs)

  def position_embedding(self) -> jax.Array:
    """[1, num_patches, width] for the patch tokens (zeros for `none`)."""
    return position_embedding(self.posemb_kind, self.posemb, self.grid, self.width)

  def tokenize(self, images: jax.Array) -> jax.Array:
    """[B, H, W, C] float -> [B, num_patches, width] with position embeddings."""
    if self.tokenizer == "linear":
      return embed_patches(
        images,
        self.patch,
        self.tokenizer_kernel,
        self.tokenizer_bias,
        self.position_embedding(),
        self.dtype,
      )
    tokens = embed_pixel_values(
      images, self.patch, self.tokenizer_table, self.pixel_stats, self.dtype
    )
    return add_bias_and_position(tokens, self.tokenizer_bias, self.position_embedding(), self.dtype)

  def encode(self, tokens: jax.Array, *, key=None) -> jax.Array:
    """Prepends [CLS] (if any), runs the blocks and the final norm.

    `key` switches on stochastic depth (training); None is deterministic.
    """
    if self.cls is not None:
      cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (tokens.shape[0], 1, self.width))
      tokens = jnp.concatenate([cls, tokens], axis=1)
    drop_rates = None
    if key is not None and self.drop_path_rate > 0:
      drop_rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    x = self.blocks(tokens, drop_rates=drop_rates, key=key)
    return self.norm(x)

  def __call__(self, images, *, key=None):
    return self.encode(self.tokenize(images), key=key)


class Classifier(nnx.Module):
  """Encoder + pooling (`cls` token or global average) + linear head."""

  def __init__(self, *, encoder: Encoder, pool: str, num_classes: int, rngs: nnx.Rngs):
    if pool not in POOLS:
      raise ValueError(f"pool {pool!r} is not one of {POOLS}.")
    if (pool == "cls") != (encoder.cls is not None):
      raise ValueError("pool='cls' needs an encoder built with cls_token=True, 'gap' without.")
    self.encoder = encoder
    self.pool = pool
    # Zero-initialised head, as big_vision: the first logits are uniform.
    self.head_kernel = param(zeros, rngs, (encoder.width, num_classes), ("embed", "vocab"))
    self.head_bias = param(zeros, rngs, (num_classes,), ("vocab",))

  def features(self, images, *, key=None) -> jax.Array:
    x = self.encoder(images, key=key)
    return x[:, 0] if self.pool == "cls" else x.mean(axis=1)

  def __call__(self, images, *, key=None) -> jax.Array:
    """Logits in float32."""
    pooled = self.features(images, key=key).astype(jnp.float32)
    return pooled @ self.head_kernel[...] + self.head_bias[...]


def build_classifier(
  model_config,
  *,
  image_size: int,
  channels: int,
  num_classes: int,
  rngs: nnx.Rngs,
  pixel_stats: tuple | None = None,
) -> Classifier:
  """The classifier a `config.model` describes (see configs/cls_pixel.py);
  `pixel_stats` = (config.augment.mean, config.augment.std)."""
  size, patch = parse_variant(model_config.variant)
  encoder = Encoder(
    size=size,
    patch=patch,
    image_size=image_size,
    channels=channels,
    posemb=model_config.posemb,
    cls_token=model_config.pool == "cls",
    dtype=DTYPES[model_config.dtype],
    attention=model_config.attention,
    scan=model_config.scan,
    remat=model_config.remat,
    drop_path_rate=model_config.drop_path,
    tokenizer=model_config.get("tokenizer", "linear"),
    pixel_stats=pixel_stats,
    rngs=rngs,
  )
  return Classifier(encoder=encoder, pool=model_config.pool, num_classes=num_classes, rngs=rngs)


def validate_model_config(model) -> None:
  """`config.model` of a ViT / PiT (classifier and MAE encoder; DiT shares
  the variant, dtype, remat and attention keys)."""
  named("model.variant", parse_variant, model.variant)
  check_choice("model.posemb", model.posemb, POSEMBS)
  if "tokenizer" in model:  # classifier and MAE encoders; DiT's input is noisy, not 8-bit
    check_choice("model.tokenizer", model.tokenizer, TOKENIZERS)
  if "pool" in model:  # classifiers only
    check_choice("model.pool", model.pool, POOLS)
  check_choice("model.dtype", model.dtype, list(DTYPES))
  check_choice("model.remat", model.remat, list(REMAT_CHOICES))
  check_choice("model.attention", model.attention, list(attention_lib.BACKENDS))
  drop_path = model.get("drop_path", 0.0)  # DiT has none
  require(0.0 <= drop_path < 1.0, f"config.model.drop_path={drop_path!r} must be in [0, 1).")


def validate_image_size(model, image_size: int) -> None:
  """The patch must tile the image (checked once the image size is known)."""
  _, patch = parse_variant(model.variant)
  require(
    image_size % patch == 0,
    f"config.model.variant={model.variant!r} has patch {patch}, which does not "
    f"divide the image size {image_size}; pick a patch that divides it or set "
    "config.data.image_size.",
  )
  window = model.get("norm_pix_window", 0) if model.get("norm_pix_loss", False) else 0
  require(
    window == 0 or image_size % window == 0,
    f"config.model.norm_pix_window={window} does not divide the image size {image_size}.",
  )
