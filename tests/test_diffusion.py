"""Gaussian diffusion (pixel_vit.diffusion): schedules and posteriors against closed
forms computed here in numpy, respacing, the hybrid loss's variational bound
against numpy / scipy references, the samplers on data whose exact noise
predictor is known (a single point, a Gaussian), and classifier-free guidance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from pixel_vit.diffusion import gaussian, sampling
from pixel_vit.diffusion.gaussian import GaussianDiffusion

T = 1000


# ---------------------------------------------------------------- numpy references


def reference_alpha_bar(schedule: str, num_timesteps: int = T) -> np.ndarray:
  """alpha-bar_t, t = 0..T-1, straight from the papers' definitions."""
  if schedule == "linear":  # Ho et al. at T = 1000; ADM rescales for other T
    scale = 1000 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps)
  else:  # Nichol & Dhariwal eq. 17 with beta clipped at 0.999
    f = lambda t: np.cos((t / num_timesteps + 0.008) / 1.008 * np.pi / 2) ** 2
    betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_timesteps)])
  return np.cumprod(1 - betas)


def betas_from_alpha_bar(alpha_bar: np.ndarray) -> np.ndarray:
  return 1 - alpha_bar / np.concatenate([[1.0], alpha_bar[:-1]])


def bayes_posterior(alpha_bar, t, x0, x_t):
  """q(x_{t-1} | x_t, x0) as the product of q(x_{t-1} | x0) and q(x_t | x_{t-1}), t >= 1."""
  abar, abar_prev = alpha_bar[t], alpha_bar[t - 1]
  alpha = abar / abar_prev
  precision = 1 / (1 - abar_prev) + alpha / (1 - alpha)
  variance = 1 / precision
  mean = variance * (np.sqrt(abar_prev) * x0 / (1 - abar_prev) + np.sqrt(alpha) * x_t / (1 - alpha))
  return mean, variance


def posterior_variance_clipped(alpha_bar, t):
  """beta_t (1 - abar_{t-1}) / (1 - abar_t), with t = 0 replaced by t = 1 (ADM)."""
  t = max(t, 1)
  beta = betas_from_alpha_bar(alpha_bar)[t]
  return beta * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])


def gaussian_kl(mean1, var1, mean2, var2):
  return 0.5 * (np.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def per_timestep(array, t):
  return np.asarray(array)[t].reshape(-1, 1, 1, 1)


def single_point_model(alpha_bar_original, x_star):
  """The exact noise predictor when the data is the single point x_star."""
  alpha_bar = jnp.asarray(alpha_bar_original, jnp.float32)

  def model_fn(x, t_model, labels):
    abar = alpha_bar[t_model].reshape(-1, 1, 1, 1)
    return (x - jnp.sqrt(abar) * x_star) / jnp.sqrt(1 - abar)

  return model_fn


def gaussian_data_model(alpha_bar_original, mean, std):
  """The exact noise predictor E[eps | x_t] when the data is N(mean, std^2) per element."""
  alpha_bar = jnp.asarray(alpha_bar_original, jnp.float32)

  def model_fn(x, t_model, labels):
    abar = alpha_bar[t_model].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mean) / (abar * std**2 + 1 - abar)

  return model_fn


@pytest.fixture(scope="module")
def linear():
  return GaussianDiffusion.create("linear", T)


# ---------------------------------------------------------------- schedules


def test_linear_betas_are_adm_endpoints_for_any_length():
  np.testing.assert_allclose(
    gaussian.betas_for("linear", 1000), np.linspace(1e-4, 0.02, 1000), rtol=1e-12
  )
  # 250 steps: endpoints scaled by 1000/250 so the total noise stays comparable.
  np.testing.assert_allclose(
    gaussian.betas_for("linear", 250), np.linspace(4e-4, 0.08, 250), rtol=1e-12
  )
  assert gaussian.betas_for("linear", 1000).dtype == np.float64


@pytest.mark.parametrize("schedule", gaussian.SCHEDULES)
def test_alpha_bar_is_cumprod_of_one_minus_beta(schedule):
  d = GaussianDiffusion.create(schedule, T)
  reference = reference_alpha_bar(schedule)
  np.testing.assert_allclose(d.alphas_cumprod, reference, rtol=1e-10)
  np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1 - d.betas), rtol=1e-12)
  np.testing.assert_allclose(
    d.alphas_cumprod_prev, np.concatenate([[1.0], reference[:-1]]), rtol=1e-10
  )
  np.testing.assert_allclose(
    d.alphas_cumprod_next, np.concatenate([reference[1:], [0.0]]), rtol=1e-10, atol=1e-300
  )
  np.testing.assert_allclose(d.sqrt_alphas_cumprod, np.sqrt(reference), rtol=1e-10)
  np.testing.assert_allclose(d.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - reference), rtol=1e-10)
  np.testing.assert_allclose(d.sqrt_recip_alphas_cumprod, 1 / np.sqrt(reference), rtol=1e-10)
  np.testing.assert_allclose(
    d.sqrt_recipm1_alphas_cumprod, np.sqrt((1 - reference) / reference), rtol=1e-9
  )
  np.testing.assert_array_equal(d.timestep_map, np.arange(T))
  assert d.num_timesteps == T and d.timestep_map.dtype == np.int32


def test_cosine_alpha_bar_is_f_over_f0_except_the_clipped_last_step():
  d = GaussianDiffusion.create("cosine", T)
  f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
  steps = np.arange(1, T + 1)
  # Only beta_{T-1} reaches the clip (f(T) = 0 would make it 1).
  np.testing.assert_allclose(d.alphas_cumprod[:-1], f(steps[:-1]) / f(0), rtol=1e-10)
  assert d.betas.max() == pytest.approx(0.999) and np.sum(d.betas >= 0.999) == 1
  assert d.alphas_cumprod[-1] == pytest.approx(d.alphas_cumprod[-2] * 0.001, rel=1e-10)


def test_posterior_variance_and_coefficients_match_bayes(linear):
  rng = np.random.default_rng(0)
  reference = reference_alpha_bar("linear")
  betas = betas_from_alpha_bar(reference)
  t = np.arange(1, T)
  np.testing.assert_allclose(
    linear.posterior_variance[t], betas[t] * (1 - reference[t - 1]) / (1 - reference[t]), rtol=1e-10
  )
  assert linear.posterior_variance[0] == 0.0
  np.testing.assert_allclose(
    linear.posterior_log_variance_clipped,
    np.log([posterior_variance_clipped(reference, i) for i in range(T)]),
    rtol=1e-10,
  )
  # Mean coefficients, via the jnp method, against the product-of-Gaussians posterior.
  t = np.array([1, 2, 50, 500, 999], np.int32)
  x0 = rng.normal(size=(5, 3, 2, 2))
  x_t = rng.normal(size=(5, 3, 2, 2))
  mean, variance, log_variance = jax.device_get(
    linear.q_posterior_mean_variance(
      jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t)
    )
  )
  ref_mean, ref_variance = bayes_posterior(reference, per_timestep(np.arange(T), t), x0, x_t)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(variance, np.broadcast_to(ref_variance, x0.shape), rtol=1e-5)
  np.testing.assert_allclose(
    log_variance, np.log(np.broadcast_to(ref_variance, x0.shape)), rtol=1e-5
  )
  # At t = 0 the posterior collapses on x0 (coef1 = 1, coef2 = 0).
  mean0, _, _ = linear.q_posterior_mean_variance(
    jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.zeros(5, jnp.int32)
  )
  np.testing.assert_allclose(np.asarray(mean0), x0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "schedule, steps, problem",
  [
    ("quadratic", 1000, "noise schedule 'quadratic' is unknown"),
    ("linear", 0, "num_timesteps=0 must be a positive integer"),
    ("cosine", 10.0, "num_timesteps=10.0 must be a positive integer"),
    ("linear", 20, "would reach beta = 1 >= 1"),
  ],
)
def test_bad_schedule_is_a_value_error(schedule, steps, problem):
  with pytest.raises(ValueError, match=problem) as error:
    gaussian.betas_for(schedule, steps)
  if schedule == "quadratic":
    assert "('linear', 'cosine')" in str(error.value)


# ---------------------------------------------------------------- respacing


def test_space_timesteps_examples():
  assert gaussian.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  assert gaussian.space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
  kept = gaussian.space_timesteps(1000, "250")
  assert kept == gaussian.space_timesteps(1000, 250)
  assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
  assert set(np.diff(kept)) <= {4, 5}  # stride 999/249 = 4.01..., rounded
  # 10 steps kept out of 10: all of them; 3 out of 10: stride 4.5 -> 0, round(4.5) = 4, 9.
  assert gaussian.space_timesteps(10, "10") == list(range(10))
  assert gaussian.space_timesteps(10, 3) == [0, 4, 9]
  # Stride 19/5 = 3.8: the fractional positions are rounded, not truncated.
  assert gaussian.space_timesteps(20, 6) == [0, 4, 8, 11, 15, 19]
  # Three sections of 100 steps with 10, 15 and 20 steps each, both ends kept.
  kept = gaussian.space_timesteps(300, "10,15,20")
  assert len(kept) == 45
  first, second, third = kept[:10], kept[10:25], kept[25:]
  assert first == list(range(0, 100, 11))
  assert second[0] == 100 and second[-1] == 199 and max(np.diff(second)) <= 8
  assert third[0] == 200 and third[-1] == 299 and set(np.diff(third)) <= {5, 6}
  # Sections of unequal size when T does not divide: 10 = 4 + 3 + 3.
  assert gaussian.space_timesteps(10, "2,1,2") == [0, 3, 4, 7, 9]


@pytest.mark.parametrize(
  "counts, problem",
  [
    ("ddim999", "no integer stride gives exactly 999"),
    ("ddim0", "must be 'ddimN'"),
    ("ddimx", "must be 'ddimN'"),
    ("abc", "must be an integer"),
    ("", "must be an integer"),
    ("10,x", "must be an integer"),
    ("1001", "cannot keep 1001"),
    (0, "cannot keep 0"),
    ("600,600", "section 0 has 500 of the 1000 steps and cannot keep 600"),
    (2.5, "must be an int or a string"),
  ],
)
def test_space_timesteps_bad_input(counts, problem):
  with pytest.raises(ValueError, match=problem):
    gaussian.space_timesteps(1000, counts)


@pytest.mark.parametrize("schedule", gaussian.SCHEDULES)
def test_respaced_alpha_bar_equals_original_at_kept_steps(schedule):
  base = GaussianDiffusion.create(schedule, T)
  kept = gaussian.space_timesteps(T, "ddim50")
  spaced = base.respace(kept)
  reference = reference_alpha_bar(schedule)
  assert spaced.num_timesteps == 50
  np.testing.assert_allclose(spaced.alphas_cumprod, reference[kept], rtol=1e-10)
  np.testing.assert_array_equal(spaced.timestep_map, kept)
  np.testing.assert_allclose(spaced.betas, betas_from_alpha_bar(reference[kept]), rtol=1e-9)
  # Respacing a respaced diffusion still names the ORIGINAL timesteps.
  again = spaced.respace([0, 10, 49])
  np.testing.assert_array_equal(again.timestep_map, [0, 200, 980])
  np.testing.assert_allclose(again.alphas_cumprod, reference[[0, 200, 980]], rtol=1e-10)


@pytest.mark.parametrize(
  "kept, problem", [([5], "at least 2 distinct"), ([0, 1000], "in 0..999"), ([-1, 3], "in 0..999")]
)
def test_respace_bad_timesteps(linear, kept, problem):
  with pytest.raises(ValueError, match=problem):
    linear.respace(kept)


def test_from_betas_rejects_bad_arrays():
  with pytest.raises(ValueError, match=r"in \(0, 1\)"):
    GaussianDiffusion.from_betas([0.1, 0.0, 0.2])
  with pytest.raises(ValueError, match=r"in \(0, 1\)"):
    GaussianDiffusion.from_betas([0.1, 1.0])
  with pytest.raises(ValueError, match="1-D array"):
    GaussianDiffusion.from_betas(np.full((2, 2), 0.1))
  with pytest.raises(ValueError, match="increasing model timesteps"):
    GaussianDiffusion.from_betas([0.1, 0.2, 0.3], timestep_map=[0, 5])


def test_diffusion_is_immutable(linear):
  with pytest.raises(Exception):
    linear.betas = np.ones(3)
  with pytest.raises(ValueError):
    linear.betas[0] = 0.5


# ---------------------------------------------------------------- forward process


def test_q_sample_marginal_mean_and_variance(linear):
  t_values = np.array([0, 100, 400, 999], np.int32)
  x0 = np.array([0.9, -0.5, 0.2, 1.0], np.float32).reshape(4, 1, 1, 1)
  samples = 20_000
  noise = jax.random.normal(jax.random.key(0), (4, samples, 1, 1))
  x_t = np.asarray(
    jax.jit(linear.q_sample)(
      jnp.broadcast_to(jnp.asarray(x0), (4, samples, 1, 1)), jnp.asarray(t_values), noise
    )
  )
  abar = reference_alpha_bar("linear")[t_values]
  mean, var = x_t.reshape(4, -1).mean(axis=1), x_t.reshape(4, -1).var(axis=1)
  # Standard errors: sqrt(var / n) for the mean, var * sqrt(2 / n) for the variance.
  np.testing.assert_allclose(
    mean, np.sqrt(abar) * x0.ravel(), atol=5 * np.sqrt((1 - abar).max() / samples) + 1e-6
  )
  np.testing.assert_allclose(var, 1 - abar, rtol=5 * np.sqrt(2 / samples))


def test_sample_timesteps_are_uniform_int32(linear):
  t = np.asarray(linear.sample_timesteps(jax.random.key(1), 50_000))
  assert t.dtype == np.int32 and t.min() == 0 and t.max() == T - 1
  counts = np.bincount(t // 100, minlength=10)  # 10 bins of 100 steps: 5000 each
  assert np.all(np.abs(counts - 5000) < 5 * np.sqrt(5000))


# ---------------------------------------------------------------- learned variance and the bound


def test_learned_sigma_endpoints(linear):
  rng = np.random.default_rng(1)
  t = np.array([0, 1, 20, 500, 999], np.int32)
  x_t = jnp.asarray(rng.normal(size=(5, 2, 2, 3)), jnp.float32)
  eps = rng.normal(size=(5, 2, 2, 3))
  reference = reference_alpha_bar("linear")
  log_beta = np.log(betas_from_alpha_bar(reference)[t]).reshape(-1, 1, 1, 1)
  log_posterior = np.log([posterior_variance_clipped(reference, i) for i in t]).reshape(-1, 1, 1, 1)
  for v, expected in [
    (1.0, log_beta),
    (-1.0, log_posterior),
    (0.0, 0.5 * (log_beta + log_posterior)),
  ]:
    output = jnp.asarray(np.concatenate([eps, np.full_like(eps, v)], axis=-1), jnp.float32)
    out = linear.p_mean_variance(output, x_t, jnp.asarray(t), learn_sigma=True)
    np.testing.assert_allclose(
      np.asarray(out["log_variance"]), np.broadcast_to(expected, x_t.shape), rtol=1e-5
    )
    np.testing.assert_allclose(
      np.asarray(out["variance"]), np.exp(np.broadcast_to(expected, x_t.shape)), rtol=1e-5
    )
    np.testing.assert_allclose(np.asarray(out["eps"]), eps, rtol=1e-6)
  # Without learn_sigma the variance is the posterior's (fixedsmall), whatever the output.
  out = linear.p_mean_variance(
    jnp.asarray(eps, jnp.float32), x_t, jnp.asarray(t), learn_sigma=False
  )
  np.testing.assert_allclose(
    np.asarray(out["log_variance"]), np.broadcast_to(log_posterior, x_t.shape), rtol=1e-5
  )


def noisy_batch(rng, t, shape, *, on_pixel_grid=False):
  """x0, noise, x_t (numpy float64) and a model output close to the true noise."""
  x0 = rng.uniform(-1, 1, size=shape)
  if on_pixel_grid:
    x0 = np.round((x0 + 1) * 127.5) / 127.5 - 1
    x0.reshape(-1)[:4] = [-1.0, 1.0, -1.0, 1.0]  # the open-ended edge bins
  noise = rng.normal(size=shape)
  abar = per_timestep(reference_alpha_bar("linear"), t)
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  eps = noise + 0.5 * rng.normal(size=shape)
  v = rng.uniform(-1, 1, size=shape)
  return x0, noise, x_t, eps, v


def run_losses(diffusion, x0, noise, x_t, eps, v, t, *, learn_sigma=True):
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  output = np.concatenate([eps, v], axis=-1) if learn_sigma else eps
  losses = jax.jit(functools.partial(diffusion.training_losses, learn_sigma=learn_sigma))(
    f32(output), f32(x0), f32(x_t), jnp.asarray(t, jnp.int32), f32(noise)
  )
  return {k: np.asarray(value, np.float64) for k, value in losses.items()}


def model_mean_and_log_variance(t, x_t, eps, v):
  """The reverse-step Gaussian of improved DDPM, computed from first principles (t >= 1)."""
  reference = reference_alpha_bar("linear")
  steps = per_timestep(np.arange(T), t)
  abar = reference[steps]
  pred_x0 = (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
  mean, _ = bayes_posterior(reference, steps, pred_x0, x_t)
  frac = (v + 1) / 2
  log_beta = np.log(betas_from_alpha_bar(reference)[steps])
  log_posterior = np.log(
    per_timestep([posterior_variance_clipped(reference, i) for i in range(T)], t)
  )
  return mean, frac * log_beta + (1 - frac) * log_posterior


def test_vb_at_positive_t_is_the_gaussian_kl_in_bits(linear):
  rng = np.random.default_rng(2)
  t = np.array([1, 2, 10, 250, 600, 999], np.int32)
  x0, noise, x_t, eps, v = noisy_batch(rng, t, (6, 4, 4, 3))
  losses = run_losses(linear, x0, noise, x_t, eps, v, t)
  reference = reference_alpha_bar("linear")
  true_mean, true_var = bayes_posterior(reference, per_timestep(np.arange(T), t), x0, x_t)
  model_mean, model_log_var = model_mean_and_log_variance(t, x_t, eps, v)
  kl_bits = gaussian_kl(true_mean, true_var, model_mean, np.exp(model_log_var)) / np.log(2)
  expected_vb = kl_bits.mean(axis=(1, 2, 3)) * (T / 1000)
  assert np.all(expected_vb > 1e-3)  # a real mismatch, so the comparison means something
  np.testing.assert_allclose(losses["vb"], expected_vb, rtol=2e-4)
  np.testing.assert_allclose(losses["mse"], ((noise - eps) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(losses["loss"], losses["mse"] + losses["vb"], rtol=1e-6)


def test_vb_is_rescaled_by_num_timesteps_over_1000():
  short = GaussianDiffusion.create("linear", 250)
  rng = np.random.default_rng(3)
  t = np.array([3, 100], np.int32)
  shape = (2, 2, 2, 1)
  x0, noise = rng.uniform(-1, 1, shape), rng.normal(size=shape)
  abar = per_timestep(reference_alpha_bar("linear", 250), t)
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  eps, v = noise + 0.3 * rng.normal(size=shape), rng.uniform(-1, 1, shape)
  true_mean, true_var = bayes_posterior(
    reference_alpha_bar("linear", 250), per_timestep(np.arange(250), t), x0, x_t
  )
  pred_x0 = (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
  model_mean, _ = bayes_posterior(
    reference_alpha_bar("linear", 250), per_timestep(np.arange(250), t), pred_x0, x_t
  )
  betas = betas_from_alpha_bar(reference_alpha_bar("linear", 250))
  log_posterior = np.log(
    [posterior_variance_clipped(reference_alpha_bar("linear", 250), i) for i in t]
  ).reshape(-1, 1, 1, 1)
  frac = (v + 1) / 2
  model_var = np.exp(frac * np.log(per_timestep(betas, t)) + (1 - frac) * log_posterior)
  kl_bits = gaussian_kl(true_mean, true_var, model_mean, model_var).mean(axis=(1, 2, 3)) / np.log(2)
  losses = run_losses(short, x0, noise, x_t, eps, v, t)
  np.testing.assert_allclose(losses["vb"], kl_bits * 0.25, rtol=2e-4)


def test_vb_at_t0_is_the_discretized_decoder_nll_in_bits(linear):
  rng = np.random.default_rng(4)
  t = np.zeros(4, np.int32)
  x0, noise, x_t, eps, v = noisy_batch(rng, t, (4, 8, 8, 3), on_pixel_grid=True)
  losses = run_losses(linear, x0, noise, x_t, eps, v, t)
  # The decoder is centred on the predicted x0 (the posterior mean at t = 0).
  abar0 = reference_alpha_bar("linear")[0]
  mean = (x_t - np.sqrt(1 - abar0) * eps) / np.sqrt(abar0)
  # Log variance between log(beta_0) and the clipped posterior's (t = 1's value).
  frac = (v + 1) / 2
  beta0 = betas_from_alpha_bar(reference_alpha_bar("linear"))[0]
  log_var = frac * np.log(beta0) + (1 - frac) * np.log(
    posterior_variance_clipped(reference_alpha_bar("linear"), 0)
  )
  std = np.exp(0.5 * log_var)
  upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
  lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
  mass = stats.norm.cdf((upper - mean) / std) - stats.norm.cdf((lower - mean) / std)
  assert mass.min() > 1e-3  # bins near the mean: the tanh CDF approximation is accurate there
  expected = -np.log2(mass).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(losses["vb"], expected, rtol=1e-3)


def test_vb_trains_only_the_variance_channels(linear):
  rng = np.random.default_rng(5)
  t = np.array([0, 5, 300, 999], np.int32)
  x0, noise, x_t, eps, v = noisy_batch(rng, t, (4, 4, 4, 2), on_pixel_grid=True)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  output = f32(np.concatenate([eps, v], axis=-1))

  def summed(name, output):
    losses = linear.training_losses(
      output, f32(x0), f32(x_t), jnp.asarray(t), f32(noise), learn_sigma=True
    )
    return losses[name].sum()

  grad_vb = np.asarray(jax.grad(functools.partial(summed, "vb"))(output))
  assert np.all(grad_vb[..., :2] == 0.0)
  # Every example, t = 0 too (at t = 999 beta and the posterior variance nearly
  # coincide, so v matters little there, but not nothing).
  assert np.all(np.abs(grad_vb[..., 2:]).sum(axis=(1, 2, 3)) > 0)
  assert np.abs(grad_vb[:2, ..., 2:]).sum() > 1e-3
  # The total loss's gradient on eps is the MSE's alone: -2 (noise - eps) / (H W C).
  grad_loss = np.asarray(jax.grad(functools.partial(summed, "loss"))(output))
  np.testing.assert_allclose(grad_loss[..., :2], -2 * (noise - eps) / 32, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grad_loss[..., 2:], grad_vb[..., 2:], rtol=1e-6)


def test_fixed_variance_loss_is_the_mse(linear):
  rng = np.random.default_rng(6)
  t = np.array([0, 999], np.int32)
  x0, noise, x_t, eps, _ = noisy_batch(rng, t, (2, 3, 3, 4))
  losses = run_losses(linear, x0, noise, x_t, eps, None, t, learn_sigma=False)
  np.testing.assert_allclose(losses["mse"], ((noise - eps) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_array_equal(losses["vb"], 0.0)
  np.testing.assert_array_equal(losses["loss"], losses["mse"])


@pytest.mark.parametrize("learn_sigma, channels", [(True, 4), (False, 8), (True, 6)])
def test_wrong_output_channels_are_a_value_error(linear, learn_sigma, channels):
  x = jnp.zeros((2, 3, 3, 4))
  with pytest.raises(ValueError, match="set learn_sigma to match the model"):
    linear.training_losses(
      jnp.zeros((2, 3, 3, channels)), x, x, jnp.zeros(2, jnp.int32), x, learn_sigma=learn_sigma
    )


# ---------------------------------------------------------------- samplers


SHAPE = (4, 4, 4, 2)


def x_star():
  return jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (1,) + SHAPE[1:]), jnp.float32)


def start_noise(seed=0):
  return jax.random.normal(jax.random.key(seed), SHAPE)


def test_ddim_eta0_is_deterministic_and_eta1_is_ddpm(linear):
  spaced = linear.respace(gaussian.space_timesteps(T, "ddim25"))
  model = gaussian_data_model(linear.alphas_cumprod, 0.2, 0.5)
  ddim = jax.jit(
    functools.partial(sampling.ddim_sample, model, spaced, learn_sigma=False), static_argnames="eta"
  )
  ddpm = jax.jit(functools.partial(sampling.ddpm_sample, model, spaced, learn_sigma=False))
  noise = start_noise()
  first = np.asarray(ddim(noise, None, jax.random.key(1), eta=0.0))
  second = np.asarray(ddim(noise, None, jax.random.key(2), eta=0.0))
  np.testing.assert_array_equal(first, second)
  stochastic = [np.asarray(ddim(noise, None, jax.random.key(k), eta=1.0)) for k in (1, 2)]
  assert np.abs(stochastic[0] - stochastic[1]).max() > 1e-2
  # eta = 1 has the posterior variance and mean: the same draws give DDPM's sample.
  np.testing.assert_allclose(
    stochastic[0], np.asarray(ddpm(noise, None, jax.random.key(1))), rtol=1e-4, atol=1e-4
  )


@pytest.mark.parametrize("schedule, respacing", [("linear", "ddim10"), ("cosine", "20")])
def test_ddim_single_point_data_returns_the_point(schedule, respacing):
  base = GaussianDiffusion.create(schedule, T)
  spaced = base.respace(gaussian.space_timesteps(T, respacing))
  target = x_star()
  model = single_point_model(base.alphas_cumprod, target)  # knows ORIGINAL timesteps only
  sample = jax.jit(functools.partial(sampling.ddim_sample, model, spaced, learn_sigma=False))
  for seed in (0, 1):
    result = np.asarray(sample(3.0 * start_noise(seed), None, jax.random.key(0)))
    np.testing.assert_allclose(result, np.broadcast_to(target, SHAPE), atol=1e-4)
  inverted = sampling.ddim_reverse(
    model, spaced, jnp.broadcast_to(target, SHAPE), None, learn_sigma=False
  )
  assert np.abs(np.asarray(inverted) - np.asarray(target)).max() > 0.1  # it did move
  np.testing.assert_allclose(
    np.asarray(sample(inverted, None, jax.random.key(0))), np.broadcast_to(target, SHAPE), atol=1e-4
  )


def ddim_round_trip_error(base, steps, mean, std, x0):
  spaced = base.respace(gaussian.space_timesteps(T, steps))
  model = gaussian_data_model(base.alphas_cumprod, mean, std)
  x_T = sampling.ddim_reverse(model, spaced, x0, None, learn_sigma=False)
  back = sampling.ddim_sample(model, spaced, x_T, None, jax.random.key(0), learn_sigma=False)
  return np.abs(np.asarray(back) - np.asarray(x0)).max() / np.abs(np.asarray(x0 - mean)).max()


@pytest.mark.parametrize("schedule", gaussian.SCHEDULES)
def test_ddim_inversion_round_trip_on_gaussian_data(schedule):
  # Data N(0.3, 0.8^2): the exact eps is linear in x_t. DDIM is a first-order
  # ODE solver, so the round trip error falls like 1/steps: <= 5% of |x0 - mean|
  # at 100 of 1000 steps, and twice as large at 50.
  base = GaussianDiffusion.create(schedule, T)
  x0 = 0.3 + 0.8 * jax.random.normal(jax.random.key(3), SHAPE)
  error_100 = ddim_round_trip_error(base, 100, 0.3, 0.8, x0)
  error_50 = ddim_round_trip_error(base, 50, 0.3, 0.8, x0)
  assert error_100 < 0.05
  assert 1.6 < error_50 / error_100 < 2.4


def test_ddim_matches_the_exact_probability_flow_on_gaussian_data(linear):
  # For N(0, s^2) data the probability-flow ODE maps x_T to x_T s / sqrt(abar s^2 + 1 - abar).
  std = 0.5
  model = gaussian_data_model(linear.alphas_cumprod, 0.0, std)
  noise = start_noise()
  errors = []
  for steps in (50, 250):
    spaced = linear.respace(gaussian.space_timesteps(T, steps))
    abar = reference_alpha_bar("linear")[-1]
    exact = np.asarray(noise) * std / np.sqrt(abar * std**2 + 1 - abar)
    result = sampling.ddim_sample(model, spaced, noise, None, jax.random.key(0), learn_sigma=False)
    errors.append(np.abs(np.asarray(result) - exact).max() / np.abs(exact).max())
  assert errors[1] < 0.015
  assert 4 < errors[0] / errors[1] < 6  # first order in the step count


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_single_point_converges_to_the_point(linear, learn_sigma):
  spaced = linear.respace(gaussian.space_timesteps(T, "ddim25"))
  target = x_star()
  eps_model = single_point_model(linear.alphas_cumprod, target)
  model = eps_model
  if learn_sigma:
    model = lambda x, t, y: jnp.concatenate([eps_model(x, t, y), jnp.zeros_like(x)], axis=-1)
  sample = jax.jit(functools.partial(sampling.ddpm_sample, model, spaced, learn_sigma=learn_sigma))
  result = np.asarray(sample(start_noise(), None, jax.random.key(4)))
  assert np.all(np.isfinite(result))
  np.testing.assert_allclose(result, np.broadcast_to(target, SHAPE), atol=1e-4)


def reference_ddpm_moments(kept, data_mean, data_std, log_variance_fn):
  """Mean and variance of DDPM samples when the data is N(m, s^2) and the model exact.

  Every step is x <- P x + Q + sigma z with P, Q from the Bayes posterior of the
  predicted x0 (itself linear in x), so the moments follow exactly.
  """
  abar_all = reference_alpha_bar("linear")
  abar = abar_all[kept]
  mean, var = 0.0, 1.0
  for i in reversed(range(len(kept))):
    # x0_hat = E[x0 | x_i] = a x + b for Gaussian data.
    denom = abar[i] * data_std**2 + 1 - abar[i]
    a = np.sqrt(abar[i]) * data_std**2 / denom
    b = data_mean * (1 - abar[i]) / denom
    if i == 0:
      p, q, step_var = a, b, 0.0
    else:
      abar_prev = abar[i - 1]
      alpha = abar[i] / abar_prev
      post_var = 1 / (1 / (1 - abar_prev) + alpha / (1 - alpha))
      c_x0, c_x = (
        post_var * np.sqrt(abar_prev) / (1 - abar_prev),
        post_var * np.sqrt(alpha) / (1 - alpha),
      )
      p, q = c_x0 * a + c_x, c_x0 * b
      step_var = np.exp(log_variance_fn(i, 1 - alpha, post_var))
    mean, var = p * mean + q, p**2 * var + step_var
  return mean, var


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_sample_moments_on_gaussian_data(linear, learn_sigma):
  kept = list(range(0, T, 20))
  spaced = linear.respace(kept)
  data_mean, data_std = 0.3, 0.6
  eps_model = gaussian_data_model(linear.alphas_cumprod, data_mean, data_std)
  if learn_sigma:  # v = 0.5: log variance 3/4 of the way to log(beta)
    model = lambda x, t, y: jnp.concatenate([eps_model(x, t, y), jnp.full_like(x, 0.5)], axis=-1)
    log_variance_fn = lambda i, beta, post_var: 0.75 * np.log(beta) + 0.25 * np.log(post_var)
  else:
    model = eps_model
    log_variance_fn = lambda i, beta, post_var: np.log(post_var)
  samples = 16_384
  noise = jax.random.normal(jax.random.key(5), (samples // 64, 8, 8, 1))
  result = np.asarray(
    jax.jit(functools.partial(sampling.ddpm_sample, model, spaced, learn_sigma=learn_sigma))(
      noise, None, jax.random.key(6)
    )
  )
  expected_mean, expected_var = reference_ddpm_moments(kept, data_mean, data_std, log_variance_fn)
  assert result.mean() == pytest.approx(expected_mean, abs=5 * np.sqrt(expected_var / samples))
  assert result.var() == pytest.approx(expected_var, rel=5 * np.sqrt(2 / samples))


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "ddim_reverse"])
def test_samplers_trace_the_model_once_and_call_it_per_step_with_original_timesteps(linear, kind):
  spaced = linear.respace(gaussian.space_timesteps(T, "ddim10"))
  seen, traces = [], []
  eps_model = single_point_model(linear.alphas_cumprod, x_star())

  def model(x, t_model, labels):
    traces.append(1)
    jax.debug.callback(
      lambda t, y: seen.append((np.asarray(t), np.asarray(y))), t_model, labels, ordered=True
    )
    return eps_model(x, t_model, labels)

  labels = jnp.arange(SHAPE[0], dtype=jnp.int32)
  if kind == "ddim_reverse":
    run = functools.partial(sampling.ddim_reverse, model, spaced, learn_sigma=False)
    result = jax.jit(run)(start_noise(), labels)
    expected_order = spaced.timestep_map
  else:
    run = functools.partial(sampling.sampler(kind), model, spaced, learn_sigma=False)
    result = jax.jit(run)(start_noise(), labels, jax.random.key(0))
    expected_order = spaced.timestep_map[::-1]
  jax.effects_barrier()
  assert np.all(np.isfinite(np.asarray(result)))
  assert len(traces) == 1  # one scan body, not a Python loop over the steps
  assert len(seen) == spaced.num_timesteps == 10
  np.testing.assert_array_equal(
    [t for t, _ in seen], np.repeat(np.asarray(expected_order)[:, None], SHAPE[0], axis=1)
  )
  for _, y in seen:
    np.testing.assert_array_equal(y, np.asarray(labels))


def test_bad_sampler_arguments():
  with pytest.raises(
    ValueError, match=r"sampler 'euler' is unknown; use one of \('ddpm', 'ddim'\)"
  ):
    sampling.sampler("euler")
  d = GaussianDiffusion.create("cosine", 10)
  with pytest.raises(ValueError, match="eta=-0.5 must be >= 0"):
    sampling.ddim_sample(
      lambda x, t, y: x, d, jnp.zeros(SHAPE), None, jax.random.key(0), eta=-0.5, learn_sigma=False
    )


# ---------------------------------------------------------------- classifier-free guidance


def toy_conditional_model(record):
  """Noise channels 0.1 (label + 1) (c + 1) + x, variance channels -0.05 (label + 1)."""

  def model_fn(x, t_model, labels):
    record.append((np.asarray(x), np.asarray(t_model), np.asarray(labels)))
    scale = (labels.astype(jnp.float32) + 1).reshape(-1, 1, 1, 1)
    channel = jnp.arange(1, x.shape[-1] + 1, dtype=jnp.float32)
    return jnp.concatenate([0.1 * scale * channel + x, -0.05 * scale * jnp.ones_like(x)], axis=-1)

  return model_fn


def test_guidance_scale_one_is_exactly_the_conditional_model():
  model = toy_conditional_model([])
  assert sampling.guided(model, cfg_scale=1.0, null_label=10, channels=4) is model


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5, 4.0])
def test_guidance_extrapolates_every_noise_channel_and_keeps_conditional_variance(cfg_scale):
  record = []
  model = toy_conditional_model(record)
  channels, null_label = 4, 10
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, channels))
  t = jnp.array([5, 7, 9], jnp.int32)
  labels = jnp.array([0, 2, 3], jnp.int32)
  out = np.asarray(
    sampling.guided(model, cfg_scale=cfg_scale, null_label=null_label, channels=channels)(
      x, t, labels
    )
  )
  assert out.shape == (3, 2, 2, 2 * channels)
  # One model call on the doubled batch: each example, then its twin with the null label.
  ((seen_x, seen_t, seen_labels),) = record
  np.testing.assert_array_equal(seen_labels, [0, null_label, 2, null_label, 3, null_label])
  np.testing.assert_array_equal(seen_t, [5, 5, 7, 7, 9, 9])
  np.testing.assert_array_equal(seen_x, np.repeat(np.asarray(x), 2, axis=0))
  channel = np.arange(1, channels + 1)
  cond = 0.1 * (np.asarray(labels)[:, None, None, None] + 1) * channel + np.asarray(x)
  uncond = 0.1 * (null_label + 1) * channel + np.asarray(x)
  np.testing.assert_allclose(
    out[..., :channels], uncond + cfg_scale * (cond - uncond), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    out[..., channels:],
    np.broadcast_to(-0.05 * (np.asarray(labels)[:, None, None, None] + 1), (3, 2, 2, channels)),
    rtol=1e-6,
  )


@pytest.mark.parametrize("kind", sampling.SAMPLERS)
def test_guided_sampling_of_point_classes_lands_on_the_extrapolated_point(linear, kind):
  # Class k's data is the single point POINTS[k] (the null label's is the
  # unconditional point). Guided eps is then exactly the eps of the single
  # point u + s (c - u), so both samplers must return it.
  spaced = linear.respace(gaussian.space_timesteps(T, "ddim10"))
  points = jnp.asarray(np.random.default_rng(8).uniform(-1, 1, (4,) + SHAPE[1:]), jnp.float32)
  null_label, cfg_scale = 3, 2.5
  abar = jnp.asarray(linear.alphas_cumprod, jnp.float32)

  def class_points_model(x, t_model, labels):
    a = abar[t_model].reshape(-1, 1, 1, 1)
    eps = (x - jnp.sqrt(a) * points[labels]) / jnp.sqrt(1 - a)
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)  # learned-sigma layout

  model = sampling.guided(
    class_points_model, cfg_scale=cfg_scale, null_label=null_label, channels=SHAPE[-1]
  )
  labels = jnp.array([0, 1, 2, 0], jnp.int32)
  run = jax.jit(functools.partial(sampling.sampler(kind), model, spaced, learn_sigma=True))
  result = np.asarray(run(start_noise(), labels, jax.random.key(0)))
  uncond = np.asarray(points[null_label])
  expected = uncond + cfg_scale * (np.asarray(points)[np.asarray(labels)] - uncond)
  np.testing.assert_allclose(result, expected, atol=1e-4)


def test_guidance_rejects_wrong_channels():
  x = jnp.zeros((2, 2, 2, 2))
  wrong = sampling.guided(toy_conditional_model([]), cfg_scale=2.0, null_label=10, channels=3)
  with pytest.raises(ValueError, match=r"must have 3 \(eps\) or 6"):
    wrong(x, jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="channels=0 must be the positive data channel count"):
    sampling.guided(toy_conditional_model([]), cfg_scale=2.0, null_label=10, channels=0)


def test_guided_model_keeps_each_devices_examples_on_it():
  # The doubled batch pairs each example with its unconditional twin, so a
  # batch sharded over 8 devices needs no collective to be guided (the
  # conditional and unconditional halves used to be concatenated: every
  # device then sent half its rows to another, at every sampling step).
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from pixel_vit import program_costs

  mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
  rows = NamedSharding(mesh, PartitionSpec("batch"))
  model = lambda x, t, y: x * (y[:, None, None, None] + 1.0) + t[:, None, None, None]
  guided = sampling.guided(model, cfg_scale=1.5, null_label=10, channels=4)
  x = jax.ShapeDtypeStruct((16, 2, 2, 4), jnp.float32, sharding=rows)
  t = jax.ShapeDtypeStruct((16,), jnp.int32, sharding=rows)
  text = jax.jit(guided, out_shardings=rows).lower(x, t, t).compile().as_text()
  assert not program_costs.hlo_traffic(text).collectives
