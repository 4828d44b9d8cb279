"""Optimizer and learning-rate schedule from `config.optimizer` (optax)."""
from __future__ import annotations

import jax
import optax


def decay_mask(params) -> dict:
  """Weight decay on matmul kernels only: not on norms, biases, position
  embeddings or the [CLS] token (their names do not end in `_kernel`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: str(getattr(path[-1], "key", path[-1])).endswith("kernel"), params)


def make_schedule(opt, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine to `opt.end_lr`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=opt.end_lr)


def make_optimizer(opt, schedule: optax.Schedule, params) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (`grad_clip` 0 = off)."""
  parts = []
  if opt.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                           mask=decay_mask(params)))
  return optax.chain(*parts)
