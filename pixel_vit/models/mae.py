"""Masked autoencoder (He et al., 2022) on pixel or patch tokens.

The encoder is the classification encoder (`vit.Encoder`) and runs on the
visible tokens only, each with its own position embedding. A lighter decoder
sees the encoded visible tokens plus a learned mask token at every masked
position (with decoder position embeddings) and predicts each token's pixel
values. The loss is over masked tokens only.

Normalised targets (`norm_pix_loss`): MAE normalises each patch's pixels by
that patch's mean and variance. For a 1x1 token that is degenerate (one
grey value has variance 0; three RGB values give a per-pixel colour
direction). We normalise over a `norm_pix_window` x `norm_pix_window`
neighbourhood instead, independent of the token size: with window 2, PiT/1
and ViT/2 learn the very same targets, so the two are compared on equal
terms. Window 0 means "the token itself" (MAE's rule for patches).
"""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
from flax import nnx

from pixel_vit import parallel
from pixel_vit.config_checks import check_choice, check_positive, require
from pixel_vit.models import vit


def num_visible(num_tokens: int, mask_ratio: float) -> int:
  """Visible tokens per example: round(N * (1 - ratio)), at least 1.

  Computed on the ratio as written (0.9 is 9/10), so float noise in 1 - 0.9
  cannot decide an exact half.
  """
  exact = num_tokens * (1 - fractions.Fraction(repr(float(mask_ratio))))
  return max(1, round(exact))


def random_masking(key: jax.Array, batch: int, num_tokens: int, mask_ratio: float):
  """Per-example random masking by shuffling token indices.

  Returns (keep [B, n_visible] token indices, mask [B, N] with 1 = masked,
  restore [B, N]: the inverse permutation that unshuffles).
  """
  n_keep = num_visible(num_tokens, mask_ratio)
  noise = jax.random.uniform(key, (batch, num_tokens))
  shuffle = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  keep = shuffle[:, :n_keep]
  mask = jnp.ones((batch, num_tokens), jnp.float32).at[:, :n_keep].set(0.0)
  mask = jnp.take_along_axis(mask, restore, axis=1)
  return keep, mask, restore


def _window_stats(images: jax.Array, window: int):
  tiles = vit.patchify(images, window)
  return tiles.mean(axis=-1, keepdims=True), jnp.sqrt(tiles.var(axis=-1, keepdims=True) + 1e-6)


def pixel_targets(
  images: jax.Array, patch: int, *, norm_pix_loss: bool, norm_pix_window: int
) -> jax.Array:
  """[B, H, W, C] normalised images -> [B, N, patch*patch*C] targets."""
  if norm_pix_loss:
    window = norm_pix_window or patch
    height, width = images.shape[1:3]
    mean, std = _window_stats(images, window)
    tiles = (vit.patchify(images, window) - mean) / std
    images = vit.unpatchify(tiles, window, height, width)
  return vit.patchify(images, patch)


def predictions_as_images(
  pred: jax.Array, images: jax.Array, patch: int, *, norm_pix_loss: bool, norm_pix_window: int
) -> jax.Array:
  """Inverse of `pixel_targets` for pictures: [B, N, p*p*C] -> [B, H, W, C] in
  the input's space (normalised targets get the true window statistics back,
  as MAE's visualisation does)."""
  height, width = images.shape[1:3]
  pred_images = vit.unpatchify(pred, patch, height, width)
  if norm_pix_loss:
    window = norm_pix_window or patch
    mean, std = _window_stats(images, window)
    tiles = vit.patchify(pred_images, window) * std + mean
    pred_images = vit.unpatchify(tiles, window, height, width)
  return pred_images


def _per_token_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error per token, averaged over masked tokens only."""
  return jnp.sum(_per_token_mse(pred, target) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_mse_per_example(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """[B]: each example's mean squared error over its masked tokens."""
  return jnp.sum(_per_token_mse(pred, target) * mask, axis=1) / jnp.maximum(
    jnp.sum(mask, axis=1), 1.0
  )


class MaskedAutoencoder(nnx.Module):
  def __init__(
    self,
    *,
    encoder: vit.Encoder,
    decoder_size: vit.EncoderSize,
    channels: int,
    decoder_posemb: str,
    dtype,
    attention: str,
    scan: bool,
    remat: str,
    rngs: nnx.Rngs,
  ):
    if encoder.cls is None:
      raise ValueError("the MAE encoder needs its [CLS] token (cls_token=True).")
    self.encoder = encoder
    self.patch = encoder.patch
    self.dtype = dtype
    width = decoder_size.width
    self.decoder_embed_kernel = vit.param(
      vit.dense_init, rngs, (encoder.width, width), ("embed", None)
    )
    self.decoder_embed_bias = vit.param(vit.zeros, rngs, (width,), (None,))
    self.mask_token = vit.param(
      jax.nn.initializers.normal(0.02), rngs, (1, 1, width), (None, None, None)
    )
    self.decoder_posemb_kind = decoder_posemb
    self.decoder_posemb = vit.learned_posemb(
      decoder_posemb, encoder.num_patches, width, rngs, logical_axes=(None, None, None)
    )
    self.decoder_width = width
    self.decoder_blocks = vit.encoder_blocks(
      decoder_size, dtype=dtype, attention=attention, scan=scan, remat=remat, rngs=rngs
    )
    self.decoder_norm = vit.layer_norm(width, dtype=dtype, rngs=rngs)
    out = self.patch * self.patch * channels
    self.decoder_pred_kernel = vit.param(vit.dense_init, rngs, (width, out), (None, None))
    self.decoder_pred_bias = vit.param(vit.zeros, rngs, (out,), (None,))

  def encode_visible(self, images: jax.Array, keep: jax.Array, *, key=None) -> jax.Array:
    """Encodes only the tokens at `keep` ([B, n]); returns [B, 1 + n, width]."""
    tokens = self.encoder.tokenize(images)
    visible = jnp.take_along_axis(tokens, keep[:, :, None], axis=1)
    return self.encoder.encode(visible, key=key)

  def decode(self, latent: jax.Array, restore: jax.Array) -> jax.Array:
    """[B, 1 + n, enc width] -> per-token predictions [B, N, patch*patch*C]."""
    x = latent @ self.decoder_embed_kernel[...].astype(self.dtype)
    x = x + self.decoder_embed_bias[...].astype(self.dtype)
    cls, visible = x[:, :1], x[:, 1:]
    b, n_keep, width = visible.shape
    n_tokens = restore.shape[1]
    masked = jnp.broadcast_to(
      self.mask_token[...].astype(self.dtype), (b, n_tokens - n_keep, width)
    )
    x = jnp.take_along_axis(jnp.concatenate([visible, masked], axis=1), restore[:, :, None], axis=1)
    x = x + vit.position_embedding(
      self.decoder_posemb_kind, self.decoder_posemb, self.encoder.grid, self.decoder_width
    ).astype(self.dtype)
    x = parallel.constrain(jnp.concatenate([cls, x], axis=1), ("batch", "length", "embed"))
    x = self.decoder_norm(self.decoder_blocks(x))
    pred = x[:, 1:] @ self.decoder_pred_kernel[...].astype(self.dtype)
    return pred + self.decoder_pred_bias[...].astype(self.dtype)

  def __call__(self, images: jax.Array, *, mask_key: jax.Array, mask_ratio: float, key=None):
    """Returns (predictions [B, N, p*p*C], mask [B, N] with 1 = masked)."""
    keep, mask, restore = random_masking(
      mask_key, images.shape[0], self.encoder.num_patches, mask_ratio
    )
    pred = self.decode(self.encode_visible(images, keep, key=key), restore)
    return pred.astype(jnp.float32), mask


def build_mae(
  model_config, *, image_size: int, channels: int, rngs: nnx.Rngs, pixel_stats: tuple | None = None
) -> MaskedAutoencoder:
  """The MAE a `config.model` describes (see configs/mae_pixel.py);
  `pixel_stats` = (config.augment.mean, config.augment.std)."""
  size, patch = vit.parse_variant(model_config.variant)
  dtype = vit.DTYPES[model_config.dtype]
  common = dict(
    dtype=dtype, attention=model_config.attention, scan=model_config.scan, remat=model_config.remat
  )
  encoder = vit.Encoder(
    size=size,
    patch=patch,
    image_size=image_size,
    channels=channels,
    posemb=model_config.posemb,
    cls_token=True,
    drop_path_rate=model_config.drop_path,
    tokenizer=model_config.get("tokenizer", "linear"),
    pixel_stats=pixel_stats,
    rngs=rngs,
    **common,
  )
  decoder = model_config.decoder
  decoder_size = vit.EncoderSize(
    width=decoder.width, depth=decoder.depth, heads=decoder.heads, mlp_dim=decoder.mlp_dim
  )
  return MaskedAutoencoder(
    encoder=encoder,
    decoder_size=decoder_size,
    channels=channels,
    decoder_posemb=decoder.posemb,
    rngs=rngs,
    **common,
  )


def mask_as_image(mask: jax.Array, patch: int, height: int, width: int) -> jax.Array:
  """[B, N] token mask -> [B, H, W, 1] pixel mask (1 = masked)."""
  tokens = jnp.repeat(mask[:, :, None], patch * patch, axis=2)
  return vit.unpatchify(tokens, patch, height, width)


def validate_decoder_config(model) -> None:
  """The MAE decoder and target settings (configs/mae_pixel.py)."""
  decoder = model.decoder
  for key in ("width", "depth", "heads", "mlp_dim"):
    check_positive(f"model.decoder.{key}", decoder[key])
  require(
    decoder.width % decoder.heads == 0,
    f"config.model.decoder.width={decoder.width} must be divisible by "
    f"config.model.decoder.heads={decoder.heads}.",
  )
  check_choice("model.decoder.posemb", decoder.posemb, vit.POSEMBS)
  require(
    decoder.posemb != "sincos2d" or decoder.width % 4 == 0,
    f"config.model.decoder.width={decoder.width} must be a multiple of 4 for "
    "config.model.decoder.posemb='sincos2d'.",
  )
  check_positive("model.norm_pix_window", model.norm_pix_window, allow_zero=True)
  _, patch = vit.parse_variant(model.variant)
  window = model.norm_pix_window or patch  # 0 = the token itself
  require(
    not (model.norm_pix_loss and window < 2),
    f"config.model.norm_pix_loss normalises over {window}x{window} pixels "
    f"(config.model.norm_pix_window={model.norm_pix_window}, patch {patch}): one "
    "pixel's own statistics are degenerate (a grey value has variance 0). Set "
    "config.model.norm_pix_window >= 2; 2 gives the targets of ViT/2.",
  )


def validate_mask_ratio(mask_ratio: float, model, image_size: int) -> None:
  """MAE masking hides at least one token and keeps at least one, on the real
  token count and with the model's own rounding (`num_visible`)."""
  _, patch = vit.parse_variant(model.variant)
  tokens = (image_size // patch) ** 2
  kept = round(tokens * (1 - fractions.Fraction(repr(float(mask_ratio)))))
  require(
    tokens - num_visible(tokens, mask_ratio) > 0 and kept > 0,
    f"config.mask_ratio={mask_ratio!r} masks {tokens - kept} of the {tokens} tokens "
    f"({image_size}x{image_size} images, config.model.variant={model.variant!r} with "
    f"patch {patch}) and keeps {kept} visible (round({tokens} x (1 - ratio))); MAE "
    "needs at least one masked token (else the loss is 0 and nothing trains) and at "
    f"least one visible. With {tokens} tokens use a ratio in [1/{tokens}, "
    f"{tokens - 1}/{tokens}] = [{1 / tokens:.4g}, {(tokens - 1) / tokens:.4g}] "
    "(MAE: 0.75).",
  )
