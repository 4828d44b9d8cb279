"""Samplers for `GaussianDiffusion`: ancestral DDPM, DDIM, DDIM inversion, guidance.

Each sampler runs every step of the (possibly respaced) diffusion inside one
`jax.lax.scan`, so it compiles once whatever the number of steps. They are
pure and traceable: the caller jits them (with its batch shardings), e.g.
`jax.jit(functools.partial(ddpm_sample, model_fn, diffusion, learn_sigma=True))`.

A model function is `model_fn(x, t_model, labels) -> output`, where
`t_model` are int32 ORIGINAL timesteps (`diffusion.timestep_map[t]`) and the
output is [B, H, W, C] (noise) or [B, H, W, 2C] (noise, variance weights).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from pixel_vit.config_checks import check_choice, check_positive, named, require
from pixel_vit.diffusion import gaussian
from pixel_vit.diffusion.gaussian import GaussianDiffusion

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

SAMPLERS = ("ddpm", "ddim")


def guided(model_fn: ModelFn, *, cfg_scale: float, null_label: int, channels: int) -> ModelFn:
  """Classifier-free guidance: eps = uncond + s (cond - uncond).

  The model runs once on a doubled batch (each input twice, the second time
  with `null_label`); the result has the original batch size. The
  variance channels, if any, come from the conditional half. Scale 1.0
  returns `model_fn` itself: exactly the conditional model, at half the cost.
  """
  if not isinstance(channels, int) or channels < 1:
    raise ValueError(f"channels={channels!r} must be the positive data channel count.")
  if cfg_scale == 1.0:
    return model_fn

  def guided_fn(x, t_model, labels):
    batch = x.shape[0]
    # Each example next to its unconditional twin: [x0, x0, x1, x1, ...], so
    # a batch sharded over devices stays where it is (concatenating the two
    # halves moved half of every device's rows to another, at every step).
    pair = lambda a, b: jnp.stack([a, b], axis=1).reshape(2 * batch, *a.shape[1:])
    output = model_fn(
      pair(x, x), pair(t_model, t_model), pair(labels, jnp.full_like(labels, null_label))
    )
    if output.shape[-1] not in (channels, 2 * channels):
      raise ValueError(
        f"guided model output has {output.shape[-1]} channels; with channels="
        f"{channels} it must have {channels} (eps) or {2 * channels} (eps, v). "
        "Pass the data channel count as `channels`."
      )
    output = output.reshape(batch, 2, *output.shape[1:])
    cond, uncond = output[:, 0], output[:, 1]
    # DiT's reference guides only the first 3 channels (a leftover from RGB
    # pixels), which leaves one of the 4 VAE latent channels unguided; all
    # `channels` noise channels are guided here.
    eps = uncond[..., :channels] + cfg_scale * (cond[..., :channels] - uncond[..., :channels])
    return jnp.concatenate([eps, cond[..., channels:]], axis=-1)

  return guided_fn


def _step_noise(key: jax.Array, index: jax.Array, like: jax.Array) -> jax.Array:
  """The fresh noise for step `index`: a function of (key, index) only, so
  DDPM and DDIM with eta=1 draw the same numbers."""
  return jax.random.normal(jax.random.fold_in(key, index), like.shape, like.dtype)


def _run_steps(step, diffusion: GaussianDiffusion, x, *, reverse: bool):
  """x after `step(x, i)` for every index i (descending if `reverse`), in one scan."""
  steps = diffusion.num_timesteps
  indices = jnp.arange(steps, dtype=jnp.int32)
  if reverse:
    indices = indices[::-1]
  x, _ = jax.lax.scan(lambda carry, i: (step(carry, i), None), x, indices)
  return x


def _call_model(model_fn: ModelFn, diffusion: GaussianDiffusion, x, index, labels):
  """(t, model output): the model sees the original timestep of index `index`."""
  t = jnp.full((x.shape[0],), index, jnp.int32)
  t_model = jnp.asarray(diffusion.timestep_map, jnp.int32)[t]
  return t, model_fn(x, t_model, labels)


def ddpm_sample(
  model_fn: ModelFn,
  diffusion: GaussianDiffusion,
  noise: jax.Array,
  labels,
  key: jax.Array,
  *,
  learn_sigma: bool,
  clip_denoised: bool = False,
) -> jax.Array:
  """Ancestral sampling from x_T = `noise` through every step of `diffusion`."""

  def step(x, index):
    t, output = _call_model(model_fn, diffusion, x, index, labels)
    out = diffusion.p_mean_variance(
      output, x, t, learn_sigma=learn_sigma, clip_denoised=clip_denoised
    )
    # The last step (t = 0) returns the mean: no noise is added to the sample.
    std = jnp.where(index > 0, jnp.exp(0.5 * out["log_variance"]), 0.0)
    return (out["mean"] + std * _step_noise(key, index, x)).astype(x.dtype)

  return _run_steps(step, diffusion, noise, reverse=True)


def _check_eta(eta) -> None:
  if isinstance(eta, (int, float)) and eta < 0:
    raise ValueError(f"DDIM eta={eta} must be >= 0 (0: deterministic, 1: DDPM-like).")


def ddim_sample(
  model_fn: ModelFn,
  diffusion: GaussianDiffusion,
  noise: jax.Array,
  labels,
  key: jax.Array,
  *,
  eta: float = 0.0,
  learn_sigma: bool,
  clip_denoised: bool = False,
) -> jax.Array:
  """DDIM (Song et al.) from x_T = `noise`; eta=0 is deterministic.

  The model's variance channels are ignored: DDIM's step variance is set by
  eta (eta = 1 gives the posterior variance, i.e. DDPM's fixedsmall).
  """
  _check_eta(eta)

  def step(x, index):
    t, output = _call_model(model_fn, diffusion, x, index, labels)
    out = diffusion.p_mean_variance(
      output, x, t, learn_sigma=learn_sigma, clip_denoised=clip_denoised
    )
    eps = out["eps"]
    if clip_denoised:  # the noise consistent with the clipped x0
      eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    alpha_bar = diffusion.gather(diffusion.alphas_cumprod, t, x)
    alpha_bar_prev = diffusion.gather(diffusion.alphas_cumprod_prev, t, x)
    sigma = (
      eta
      * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
      * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
    )
    mean = (
      out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
      # max: rounding must not turn a zero into a NaN under the root.
      + jnp.sqrt(jnp.maximum(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
    )
    if isinstance(eta, (int, float)) and eta == 0:
      return mean.astype(x.dtype)  # no noise to draw
    sigma = jnp.where(index > 0, sigma, 0.0)
    return (mean + sigma * _step_noise(key, index, x)).astype(x.dtype)

  return _run_steps(step, diffusion, noise, reverse=True)


def ddim_reverse(
  model_fn: ModelFn, diffusion: GaussianDiffusion, x0: jax.Array, labels, *, learn_sigma: bool
) -> jax.Array:
  """Deterministic DDIM inversion (eta = 0): the x_T that `ddim_sample` maps to ~x0.

  As ADM, step i evaluates the model at (x, index i) and moves to
  alphas_cumprod_next[i]; the last step lands on alpha_bar = 0 (pure noise).
  """

  def step(x, index):
    t, output = _call_model(model_fn, diffusion, x, index, labels)
    out = diffusion.p_mean_variance(output, x, t, learn_sigma=learn_sigma)
    alpha_bar_next = diffusion.gather(diffusion.alphas_cumprod_next, t, x)
    mean = out["pred_xstart"] * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1 - alpha_bar_next) * out["eps"]
    return mean.astype(x.dtype)

  return _run_steps(step, diffusion, x0, reverse=False)


def sampler(kind: str):
  """`ddpm_sample` or `ddim_sample` by name (a config's `sampler` value)."""
  if kind not in SAMPLERS:
    raise ValueError(f"sampler {kind!r} is unknown; use one of {SAMPLERS}.")
  return {"ddpm": ddpm_sample, "ddim": ddim_sample}[kind]


def validate_config(config) -> None:
  """`config.diffusion` and `config.sample` (configs/dit_pixel.py)."""
  check_choice("diffusion.schedule", config.diffusion.schedule, gaussian.SCHEDULES)
  check_positive("diffusion.num_timesteps", config.diffusion.num_timesteps)
  sample = config.sample
  check_choice("sample.sampler", sample.sampler, SAMPLERS)
  named("sample.steps", gaussian.space_timesteps, config.diffusion.num_timesteps, str(sample.steps))
  require(0.0 <= sample.eta <= 1.0, f"config.sample.eta={sample.eta!r} must be in [0, 1].")
  for key in ("cfg_scale", "grid_cfg_scale"):
    require(
      sample[key] >= 1.0 or sample[key] == 0.0,
      f"config.sample.{key}={sample[key]!r}: use 1.0 for no guidance, > 1 to guide.",
    )
  require(
    (sample.cfg_scale == 1.0 and sample.grid_cfg_scale == 1.0) or config.model.class_dropout > 0,
    "config.sample guidance scales > 1 need a model trained with "
    "config.model.class_dropout > 0 (its null class is never trained otherwise).",
  )
  check_positive("sample.grid_columns", sample.grid_columns)
