"""Optimizer and learning-rate schedule from `config.optimizer` (optax).

AdamW with warmup + cosine and global-norm clipping, plus two fine-tuning
options (both off unless the config sets them, so a config without these
keys gets plain AdamW):

* `layer_decay` (0 or 1 = off): layer-wise learning-rate decay as in BEiT /
  MAE. With encoder depth L, the tokenizer, position embedding and [CLS] are
  layer 0, block i (1..L) is layer i, the final norm and everything outside
  the encoder (the head) are layer L + 1; layer i's update is scaled by
  `layer_decay ** (L + 1 - i)`. The blocks' parameters are stacked on a
  leading `layers` axis (`vit.BlockStack`), so their scale is a per-layer
  vector broadcast along that axis. The scale multiplies the *final* update
  (lr x Adam direction + decoupled weight decay), which is what MAE's
  per-group `lr_scale` does with PyTorch AdamW.
* `freeze` (a tuple of top-level parameter names, e.g. `("encoder",)` for a
  linear probe): their gradients are zeroed before clipping and Adam, and
  their updates after weight decay, so they get exactly zero updates and
  clipping sees only the trainable gradients. (They still hold Adam moments,
  all zeros: an `optax.multi_transform` without them would give an optimizer
  state whose parameter-shaped trees have holes, which
  `trainers.state.sharded_state` cannot map shardings onto.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pixel_vit.config_checks import check_positive, require


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def decay_mask(params) -> dict:
  """Weight decay on matmul kernels only: not on norms, biases, position
  embeddings or the [CLS] token (their names do not end in `_kernel`)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _key(path[-1]).endswith("kernel"), params)


def make_schedule(opt, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine to `opt.end_lr`."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=opt.lr,
    warmup_steps=warmup_steps,
    decay_steps=max(total_steps, warmup_steps + 1),
    end_value=opt.end_lr,
  )


# ---------------------------------------------------------------- layer-wise lr decay

ENCODER = "encoder"
STACKED_BLOCKS = ("blocks", "layers")  # encoder/blocks/layers/...: leading axis = depth


def encoder_depth(params) -> int:
  """L, the number of stacked blocks under `encoder/blocks/layers`."""
  try:
    leaves = jax.tree.leaves(params[ENCODER][STACKED_BLOCKS[0]][STACKED_BLOCKS[1]])
  except (KeyError, TypeError):
    leaves = []
  if not leaves:
    raise ValueError(
      "config.optimizer.layer_decay needs a model whose parameters hold an encoder "
      f"with stacked blocks under '{ENCODER}/{'/'.join(STACKED_BLOCKS)}'; this one has "
      f"top-level parameters {sorted(params)}. Set config.optimizer.layer_decay=0."
    )
  return int(leaves[0].shape[0])


def layer_id(path: tuple[str, ...], depth: int) -> int | np.ndarray:
  """The layer of the parameter at `path` (a tuple of key names): 0 for the
  tokenizer / position embedding / [CLS], [1..L] (one per stacked block) for
  the blocks, L + 1 for the final norm and anything outside the encoder."""
  if len(path) < 2 or path[0] != ENCODER:
    return depth + 1
  if path[1:3] == STACKED_BLOCKS:
    return np.arange(1, depth + 1)
  if path[1] == "norm":
    return depth + 1
  return 0


def layer_scale(path: tuple[str, ...], ndim: int, depth: int, decay: float):
  """`decay ** (L + 1 - layer)`: a Python float, or for stacked blocks an
  array of shape [L, 1, ..., 1] that broadcasts along the `layers` axis."""
  layer = layer_id(path, depth)
  scale = np.asarray(decay, np.float64) ** (depth + 1 - np.asarray(layer))
  if np.ndim(scale) == 0:
    return float(scale)
  return scale.astype(np.float32).reshape((depth,) + (1,) * (ndim - 1))


def scale_by_layer(params, decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its layer's `layer_scale` (stateless); the
  scales depend only on the parameters' names and shapes."""
  depth = encoder_depth(params)
  scales = jax.tree_util.tree_map_with_path(
    lambda path, x: layer_scale(tuple(map(_key, path)), len(x.shape), depth, decay), params
  )
  return optax.stateless(
    lambda updates, _: jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
  )


# ---------------------------------------------------------------- freezing


def frozen_mask(params, freeze) -> dict:
  """True on every leaf under the top-level names in `freeze`."""
  unknown = [name for name in freeze if name not in params]
  if unknown:
    raise ValueError(
      f"config.optimizer.freeze={tuple(freeze)!r} names {unknown}, which are not "
      f"top-level parameters of this model; choose from {sorted(params)}."
    )
  if all(name in freeze for name in params):
    raise ValueError(
      f"config.optimizer.freeze={tuple(freeze)!r} freezes every parameter "
      f"({sorted(params)}); leave at least one trainable (e.g. freeze=('encoder',) "
      "for a linear probe)."
    )
  return {
    name: jax.tree.map(lambda _, frozen=name in freeze: frozen, subtree)
    for name, subtree in params.items()
  }


# ---------------------------------------------------------------- the optimizer


def make_optimizer(opt, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (`grad_clip` 0 = off), optional layer-wise
  lr decay (`layer_decay`) and frozen top-level parameters (`freeze`).

  `params` is the (abstract) parameter pure dict; only its structure, names
  and shapes are used.
  """
  parts = []
  if opt.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip))
  parts.append(
    optax.adamw(
      schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask(params)
    )
  )
  layer_decay = float(opt.get("layer_decay", 0.0))
  if layer_decay not in (0.0, 1.0):
    parts.append(scale_by_layer(params, layer_decay))
  freeze = tuple(opt.get("freeze", ()) or ())
  if freeze:
    # Zero the frozen gradients first (so clipping and Adam's moments see only
    # the trainable ones) and the frozen updates last (so weight decay cannot
    # move them): exactly zero updates.
    zero_frozen = optax.masked(optax.set_to_zero(), frozen_mask(params, freeze))
    parts = [zero_frozen, *parts, zero_frozen]
  return optax.chain(*parts)


def validate_config(opt) -> None:
  """`config.optimizer`."""
  check_positive("optimizer.lr", opt.lr)
  check_positive("optimizer.weight_decay", opt.weight_decay, allow_zero=True)
  check_positive("optimizer.grad_clip", opt.grad_clip, allow_zero=True)
  check_positive("optimizer.warmup_steps", opt.warmup_steps, allow_zero=True)
  require(
    0.0 <= opt.b1 < 1.0 and 0.0 <= opt.b2 < 1.0,
    f"config.optimizer b1={opt.b1}, b2={opt.b2} must be in [0, 1).",
  )
  require(
    opt.ema_decay == 0.0 or 0.0 < opt.ema_decay < 1.0,
    f"config.optimizer.ema_decay={opt.ema_decay!r} must be 0 (off) or in (0, 1).",
  )
  # Fine-tuning options (configs/mae_finetune.py; absent = off).
  layer_decay = opt.get("layer_decay", 0.0)
  require(
    isinstance(layer_decay, (int, float)) and 0.0 <= layer_decay <= 1.0,
    f"config.optimizer.layer_decay={layer_decay!r} must be in [0, 1]: 0 or 1 = off, "
    "else layer i of L gets lr x layer_decay**(L+1-i) (MAE: 0.75, 0.65 for L/H).",
  )
  freeze = opt.get("freeze", ())
  require(
    isinstance(freeze, (tuple, list)) and all(isinstance(n, str) and n for n in freeze),
    f"config.optimizer.freeze={freeze!r} must be a tuple of top-level parameter "
    "names, e.g. ('encoder',) for a linear probe, or () for none.",
  )
