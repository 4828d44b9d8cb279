"""Gaussian diffusion with epsilon prediction and learned variance, as in DiT.

This follows improved DDPM (Nichol & Dhariwal, 2021) in the form of OpenAI's
ADM code, which DiT trains with: linear or cosine beta schedules, the model
predicts the noise (and, with `learn_sigma`, an interpolation weight for the
log variance), and the hybrid loss is the noise MSE plus the variational
bound with the mean frozen, rescaled by T/1000. Respacing keeps a subset of
the timesteps (for fast sampling) and remembers which original timestep the
model must be told.

`GaussianDiffusion` is a frozen dataclass of float64 numpy arrays so a jitted
function can close over it: the arrays become constants of the program and
are gathered per example with the batch of timestep indices `t`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")

# The discretized decoder assumes 8-bit data scaled to [-1, 1]: each pixel
# value owns a bin of width 2/255 around it.
PIXEL_HALF_BIN = 1.0 / 255.0

# The cosine schedule's offset keeps beta_0 from being vanishingly small, and
# its betas are capped below 1 to avoid a singularity at t = T.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


def cosine_alpha_bar(fraction: np.ndarray) -> np.ndarray:
  """f(t/T) of the cosine schedule (not yet divided by f(0))."""
  return np.cos((fraction + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2


def betas_for(schedule: str, num_timesteps: int) -> np.ndarray:
  """The float64 beta_t of a named schedule, t = 0 .. num_timesteps - 1."""
  if schedule not in SCHEDULES:
    raise ValueError(f"noise schedule {schedule!r} is unknown; use one of {SCHEDULES}.")
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise ValueError(f"num_timesteps={num_timesteps!r} must be a positive integer (DiT uses 1000).")
  if schedule == "linear":
    # ADM scales the endpoints so any T gives roughly the same total noise as
    # T = 1000 with betas 1e-4 .. 0.02.
    scale = 1000 / num_timesteps
    if scale * 0.02 >= 1:
      raise ValueError(
        f"the linear schedule with num_timesteps={num_timesteps} would reach beta = "
        f"{scale * 0.02:g} >= 1 (ADM scales 0.02 by 1000/T); use more than 20 steps "
        "or the cosine schedule."
      )
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  fractions = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alpha_bar = cosine_alpha_bar(fractions)
  return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], COSINE_MAX_BETA)


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
  """The timesteps (sorted) a respaced sampler keeps out of `num_timesteps`.

  ADM semantics: `250` or `"250"` keeps 250 evenly strided steps (first and
  last included); `"10,15,20"` splits the range into three equal sections and
  strides each to that many steps; `"ddim50"` keeps `range(0, T, stride)` for
  the integer stride that gives exactly 50 steps (the DDIM paper's spacing).
  """
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise ValueError(f"num_timesteps={num_timesteps!r} must be a positive integer.")
  if isinstance(section_counts, str) and section_counts.startswith("ddim"):
    count_text = section_counts[len("ddim") :]
    if not count_text.isdigit() or int(count_text) < 1:
      raise ValueError(
        f"timestep respacing {section_counts!r} must be 'ddimN' with N a positive "
        "integer, e.g. 'ddim50'."
      )
    desired = int(count_text)
    for stride in range(1, num_timesteps + 1):
      if len(range(0, num_timesteps, stride)) == desired:
        return list(range(0, num_timesteps, stride))
    raise ValueError(
      f"timestep respacing {section_counts!r}: no integer stride gives exactly "
      f"{desired} of {num_timesteps} steps; pick another count or use the plain "
      f"form '{desired}' (not exactly evenly strided)."
    )

  if isinstance(section_counts, (int, np.integer)) and not isinstance(section_counts, bool):
    counts = [int(section_counts)]
  elif isinstance(section_counts, str):
    parts = section_counts.split(",")
    if not all(p.strip().isdigit() for p in parts):
      raise ValueError(
        f"timestep respacing {section_counts!r} must be an integer ('250'), "
        "comma-separated section counts ('10,15,20') or 'ddimN'."
      )
    counts = [int(p) for p in parts]
  else:
    raise ValueError(
      f"timestep respacing {section_counts!r} must be an int or a string such as "
      "'250', '10,15,20' or 'ddim50'."
    )

  size_per_section, extra = divmod(num_timesteps, len(counts))
  kept: list[int] = []
  start = 0
  for i, count in enumerate(counts):
    size = size_per_section + (1 if i < extra else 0)
    if count < 1 or count > size:
      raise ValueError(
        f"timestep respacing {section_counts!r}: section {i} has {size} of the "
        f"{num_timesteps} steps and cannot keep {count}; each count must be in "
        f"1..{size}."
      )
    # Strides are fractional and rounded so each section keeps both its ends.
    stride = (size - 1) / (count - 1) if count > 1 else 1
    kept += [start + round(stride * j) for j in range(count)]
    start += size
  return sorted(set(kept))


# ---------------------------------------------------------------- Gaussian helpers


def normal_kl(mean1, log_var1, mean2, log_var2):
  """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) elementwise, in nats."""
  return 0.5 * (
    -1.0
    + log_var2
    - log_var1
    + jnp.exp(log_var1 - log_var2)
    + jnp.square(mean1 - mean2) * jnp.exp(-log_var2)
  )


def approx_standard_normal_cdf(x):
  """Phi(x) with ADM's tanh approximation (error below ~2e-4)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """log P(pixel bin of x) under N(means, exp(log_scales)^2), in nats.

  `x` holds 8-bit values scaled to [-1, 1]; the edge bins extend to +-inf so
  the probabilities of the 256 values sum to one.
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_upper = approx_standard_normal_cdf(inv_std * (centered + PIXEL_HALF_BIN))
  cdf_lower = approx_standard_normal_cdf(inv_std * (centered - PIXEL_HALF_BIN))
  # The floor keeps log finite (and gradients defined) for far-off means.
  log_cdf_upper = jnp.log(jnp.maximum(cdf_upper, 1e-12))
  log_one_minus_cdf_lower = jnp.log(jnp.maximum(1.0 - cdf_lower, 1e-12))
  log_bin = jnp.log(jnp.maximum(cdf_upper - cdf_lower, 1e-12))
  return jnp.where(
    x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_one_minus_cdf_lower, log_bin)
  )


def mean_over_example(x: jax.Array) -> jax.Array:
  """[B, ...] -> [B]: the mean over every non-batch dimension."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _read_only(array: np.ndarray) -> np.ndarray:
  array = np.array(array)
  array.flags.writeable = False
  return array


# ---------------------------------------------------------------- the diffusion


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """A discrete Gaussian diffusion; every array is indexed by this diffusion's t.

  Build it with `from_betas` or `create`. `timestep_map[t]` is the timestep
  of the ORIGINAL (un-respaced) process that index t stands for: the model
  is always called with it. Equality is identity (`eq=False`), so an
  instance can also be a static jit argument.
  """

  betas: np.ndarray
  timestep_map: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  alphas_cumprod_next: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray

  @classmethod
  def from_betas(cls, betas, timestep_map=None) -> GaussianDiffusion:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
      raise ValueError(f"betas must be a 1-D array of at least 2 steps, got shape {betas.shape}.")
    if not np.all((betas > 0) & (betas < 1)):
      # beta = 1 would make alpha-bar 0 and the x0 prediction divide by zero.
      raise ValueError("betas must all lie in (0, 1); check the schedule.")
    steps = betas.size
    if timestep_map is None:
      timestep_map = np.arange(steps)
    timestep_map = np.asarray(timestep_map)
    if timestep_map.shape != (steps,) or np.any(np.diff(timestep_map) <= 0):
      raise ValueError(
        f"timestep_map must be {steps} increasing model timesteps (one per beta), "
        f"got shape {timestep_map.shape}."
      )

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    arrays = dict(
      betas=betas,
      timestep_map=timestep_map.astype(np.int32),
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      alphas_cumprod_next=alphas_cumprod_next,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
      posterior_variance=posterior_variance,
      # The posterior variance is 0 at t = 0; ADM borrows t = 1's value so the
      # log (and the learned-variance interpolation using it) stays finite.
      posterior_log_variance_clipped=np.log(
        np.append(posterior_variance[1], posterior_variance[1:])
      ),
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )
    return cls(**{name: _read_only(value) for name, value in arrays.items()})

  @classmethod
  def create(cls, schedule: str, num_timesteps: int) -> GaussianDiffusion:
    return cls.from_betas(betas_for(schedule, num_timesteps))

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  def respace(self, use_timesteps) -> GaussianDiffusion:
    """The diffusion on the kept indices (e.g. from `space_timesteps`).

    The new betas reproduce this diffusion's alphas_cumprod at the kept
    indices; `timestep_map` composes, so it still names original timesteps.
    """
    kept = sorted(set(int(t) for t in use_timesteps))
    if len(kept) < 2 or kept[0] < 0 or kept[-1] >= self.num_timesteps:
      raise ValueError(
        f"respacing needs at least 2 distinct timesteps in 0..{self.num_timesteps - 1}, "
        f"got {len(kept)} spanning {kept[:1]}..{kept[-1:]}; use space_timesteps()."
      )
    alphas_cumprod = self.alphas_cumprod[kept]
    betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return GaussianDiffusion.from_betas(betas, self.timestep_map[kept])

  # -------------------------------------------------------------- jnp side

  def gather(self, array: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
    """array[t] as float32, shaped [B, 1, ..., 1] to broadcast against `like`."""
    values = jnp.asarray(array, jnp.float32)[t]
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

  def sample_timesteps(self, key: jax.Array, batch: int) -> jax.Array:
    """int32 [batch] indices, uniform over this diffusion's timesteps."""
    return jax.random.randint(key, (batch,), 0, self.num_timesteps, dtype=jnp.int32)

  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I), given the noise."""
    return (
      self.gather(self.sqrt_alphas_cumprod, t, x0) * x0
      + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )

  def q_posterior_mean_variance(self, x0, x_t, t):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
    mean = (
      self.gather(self.posterior_mean_coef1, t, x_t) * x0
      + self.gather(self.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = jnp.broadcast_to(self.gather(self.posterior_variance, t, x_t), x_t.shape)
    log_variance = jnp.broadcast_to(
      self.gather(self.posterior_log_variance_clipped, t, x_t), x_t.shape
    )
    return mean, variance, log_variance

  def predict_xstart_from_eps(self, x_t, t, eps):
    return (
      self.gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
      - self.gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    return (self.gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / self.gather(
      self.sqrt_recipm1_alphas_cumprod, t, x_t
    )

  def p_mean_variance(
    self, model_output, x_t, t, *, learn_sigma: bool, clip_denoised: bool = False
  ) -> dict[str, jax.Array]:
    """The reverse step p(x_{t-1} | x_t) the model's output defines.

    The first C channels are the predicted noise. With `learn_sigma` the
    other C channels v set log variance = frac log(beta_t) + (1 - frac)
    log(posterior variance), frac = (v + 1) / 2 (improved DDPM); without,
    the variance is the posterior's ("fixedsmall").
    """
    channels = _check_model_output(model_output, x_t, learn_sigma)
    eps = model_output[..., :channels]
    if learn_sigma:
      frac = (model_output[..., channels:] + 1.0) / 2.0
      min_log = self.gather(self.posterior_log_variance_clipped, t, x_t)
      max_log = self.gather(np.log(self.betas), t, x_t)
      log_variance = frac * max_log + (1.0 - frac) * min_log
      variance = jnp.exp(log_variance)
    else:
      variance = jnp.broadcast_to(self.gather(self.posterior_variance, t, x_t), x_t.shape)
      log_variance = jnp.broadcast_to(
        self.gather(self.posterior_log_variance_clipped, t, x_t), x_t.shape
      )
    pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
    return dict(
      mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart, eps=eps
    )

  def variational_bound_terms(
    self, model_output, x0, x_t, t, *, learn_sigma: bool, clip_denoised: bool = False
  ) -> jax.Array:
    """[B] bits per dimension: the term L_{t} of the variational bound.

    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, and the negative
    log likelihood of the discretized Gaussian decoder at t = 0.
    """
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
    out = self.p_mean_variance(
      model_output, x_t, t, learn_sigma=learn_sigma, clip_denoised=clip_denoised
    )
    kl = mean_over_example(
      normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    )
    decoder_nll = -mean_over_example(
      discretized_gaussian_log_likelihood(
        x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
      )
    )
    return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)

  def training_losses(
    self, model_output, x0, x_t, t, noise, *, learn_sigma: bool
  ) -> dict[str, jax.Array]:
    """DiT's per-example loss: noise MSE (+ the frozen-mean bound with learn_sigma).

    The caller ran `model_output = model(x_t, timestep_map[t], y)`. With
    `learn_sigma`, vb only trains the variance channels (the mean is
    stop-gradient-ed, the MSE already trains it) and is scaled by T/1000 as
    ADM's RESCALED_MSE hybrid loss.
    """
    channels = _check_model_output(model_output, x_t, learn_sigma)
    eps = model_output[..., :channels]
    mse = mean_over_example(jnp.square(noise - eps))
    if learn_sigma:
      frozen_mean = jnp.concatenate(
        [jax.lax.stop_gradient(eps), model_output[..., channels:]], axis=-1
      )
      vb = self.variational_bound_terms(frozen_mean, x0, x_t, t, learn_sigma=True)
      vb = vb * (self.num_timesteps / 1000.0)
    else:
      vb = jnp.zeros_like(mse)
    return dict(loss=mse + vb, mse=mse, vb=vb)


def _check_model_output(model_output, x_t, learn_sigma: bool) -> int:
  """The data channel count C, after checking the output has C or 2C channels."""
  channels = x_t.shape[-1]
  expected = 2 * channels if learn_sigma else channels
  if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != expected:
    raise ValueError(
      f"model output shape {tuple(model_output.shape)} does not fit x_t "
      f"{tuple(x_t.shape)} with learn_sigma={learn_sigma}: expected {expected} "
      "channels (2C = [eps, v] with learned sigma, C = eps without); set "
      "learn_sigma to match the model."
    )
  return channels
