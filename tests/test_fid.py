"""Generative-model metrics: Frechet distance (against the scipy sqrtm formula
of pytorch-fid / ADM), streaming statistics, reference files, Inception Score
and precision / recall against closed forms and brute force; the FID
Inception-v3 block by block against a torch.nn.functional reference on the
same random weights; and a classifier trained by the real trainer as a
feature extractor (its logits, accuracy and FID on digits). The torch
comparisons skip without torch (the [parity] extra); the rest runs without it."""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
from flax import nnx

from pixel_vit.data import augment
from pixel_vit.evaluation import features as features_lib
from pixel_vit.evaluation import fid
from pixel_vit.models import inception
from pixel_vit.trainers import classification, loop
from pixel_vit.trainers import state as state_lib
from support import set_dotted

DIGITS_TEST_EXAMPLES = 360
PARITY = (
  "needs torch for the reference: install the [parity] extra: "
  "pip install torch==2.13.0 (CPU wheel) diffusers"
)


def import_torch():
  """(torch, torch.nn.functional), or skips the calling test naming the extra."""
  torch = pytest.importorskip("torch", reason=PARITY)
  return torch, torch.nn.functional


# ---------------------------------------------------------------- Frechet distance


def scipy_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """The classic formula (TTUR / pytorch-fid / ADM's evaluator)."""
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def gaussian_features(rng, n, d, shift=0.0):
  mixing = rng.normal(size=(d, d)) / math.sqrt(d)
  return rng.normal(size=(n, d)) @ mixing + shift + rng.normal(size=d)


@pytest.mark.parametrize(
  "d, n",
  [(2, 500), (16, 400), (64, 1000), (64, 40), (96, 30)],
  ids=["d2", "d16", "d64", "d64_singular", "d96_singular"],
)
def test_frechet_distance_matches_scipy_sqrtm(d, n):
  rng = np.random.default_rng(d + n)
  a, b = gaussian_features(rng, n, d), gaussian_features(rng, n + 7, d, shift=0.3)
  stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
  ours = fid.frechet_distance(*stats[0], *stats[1])
  reference = scipy_frechet(*stats[0], *stats[1])
  assert ours == pytest.approx(reference, rel=1e-6)
  assert math.isfinite(ours) and ours > 0


def test_frechet_distance_closed_forms():
  # Diagonal covariances: ||m1 - m2||^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
  m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  expected = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
  assert fid.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected)
  # A distribution against itself: 0, also for a singular covariance.
  x = gaussian_features(np.random.default_rng(0), 20, 32)
  mu, sigma = x.mean(0), np.cov(x, rowvar=False)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)


def test_frechet_distance_rejects_mismatched_dimensions():
  with pytest.raises(ValueError, match=r"2048 vs 64.*different feature extractors"):
    fid.frechet_distance(np.zeros(2048), np.eye(2048), np.zeros(64), np.eye(64))
  with pytest.raises(ValueError, match=r"sigma2 has shape \(3, 3\), expected \(4, 4\)"):
    fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), np.eye(3))


def test_feature_stats_stream_and_merge_like_np_cov():
  rng = np.random.default_rng(1)
  x = gaussian_features(rng, 301, 12, shift=5.0)
  streamed = fid.FeatureStats(12)
  for start in range(0, 301, 64):
    streamed.add(x[start : start + 64])
  np.testing.assert_allclose(streamed.mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(streamed.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
  # Two "processes" holding halves, combined from their gathered sums.
  first, second = fid.FeatureStats(12).add(x[:100]), fid.FeatureStats(12).add(x[100:])
  merged = first.merge(fid.FeatureStats.from_sums(second.count, second.total, second.outer))
  assert merged.count == 301
  np.testing.assert_allclose(merged.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
  with pytest.raises(ValueError, match=r"shape \[B, 12\]"):
    streamed.add(np.zeros((3, 5)))
  with pytest.raises(ValueError, match="at least 2"):
    _ = fid.FeatureStats(3).add(np.ones((1, 3))).sigma


# ---------------------------------------------------------------- reference files


def test_reference_files_round_trip_and_read_adm_batches(tmp_path):
  rng = np.random.default_rng(2)
  mu, sigma = rng.normal(size=8), np.cov(rng.normal(size=(50, 8)), rowvar=False)
  mu_s, sigma_s = rng.normal(size=5), np.eye(5)
  path = str(tmp_path / "ref.npz")
  fid.save_stats(path, mu, sigma, mu_s=mu_s, sigma_s=sigma_s, features=rng.normal(size=(20, 8)))
  loaded = fid.load_reference(path)
  assert set(loaded) == {"mu", "sigma", "mu_s", "sigma_s", "features"}
  np.testing.assert_array_equal(loaded["sigma"], sigma)
  np.testing.assert_array_equal(loaded["mu_s"], mu_s)

  # ADM's reference batch layout: images in arr_0 beside the statistics.
  adm = str(tmp_path / "VIRTUAL_adm.npz")
  np.savez(
    adm, arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s
  )
  assert set(fid.load_reference(adm)) == {"mu", "sigma", "mu_s", "sigma_s"}


@pytest.mark.parametrize(
  "arrays, match",
  [
    ({"arr_0": np.zeros((2, 4, 4, 3), np.uint8)}, r"has no \['mu', 'sigma'\]"),
    ({"mu": np.zeros(4)}, r"has no \['sigma'\]"),
    ({"mu": np.zeros(4), "sigma": np.eye(3)}, r"'sigma' has shape \(3, 3\), expected \(4, 4\)"),
    ({"mu": np.zeros(4), "sigma": np.eye(4), "mu_s": np.zeros(2)}, "only one of 'mu_s'"),
  ],
  ids=["images_only", "no_sigma", "shape", "half_spatial"],
)
def test_bad_reference_files_are_named(tmp_path, arrays, match):
  path = str(tmp_path / "bad.npz")
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=match):
    fid.load_reference(path)


def test_missing_reference_file():
  with pytest.raises(ValueError, match="do not exist.*save_stats"):
    fid.load_reference("/nonexistent/ref.npz")


# ---------------------------------------------------------------- Inception Score


def test_inception_score_closed_forms():
  k = 10
  confident = 50.0 * np.eye(k)[np.arange(200) % k]  # every class equally, certain
  mean, std = fid.inception_score(confident, splits=4)
  assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-5)
  mean, _ = fid.inception_score(np.zeros((100, k)), splits=2)  # uniform predictions
  assert mean == pytest.approx(1.0)
  # IS = exp(mutual information) = exp(H(mean p) - mean H(p)), in one split.
  logits = np.random.default_rng(3).normal(size=(300, 7)) * 2
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  entropy = lambda q: -(q * np.log(q)).sum(-1)  # noqa: E731
  expected = np.exp(entropy(p.mean(0)) - entropy(p).mean())
  assert fid.inception_score(logits, splits=1)[0] == pytest.approx(expected, rel=1e-10)
  with pytest.raises(ValueError, match="splits=400 must be in"):
    fid.inception_score(logits, splits=400)


# ---------------------------------------------------------------- precision / recall


def brute_force_precision_recall(real, fake, k):
  def radii(x):
    return np.sort(scipy.spatial.distance.cdist(x, x), axis=1)[:, k]

  cross = scipy.spatial.distance.cdist(fake, real)
  precision = (cross <= radii(real)[None, :]).any(1).mean()
  recall = (cross <= radii(fake)[:, None]).any(0).mean()
  return precision, recall


def test_precision_recall_matches_brute_force_and_closed_forms():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(230, 6))
  fake = rng.normal(size=(170, 6)) + 1.0
  ours = fid.precision_recall(real, fake, k=3, block=64)  # several row blocks
  expected = brute_force_precision_recall(real, fake, 3)
  assert 0.05 < ours[0] < 0.95 and 0.05 < ours[1] < 0.95, ours
  # float32 distances may flip a point exactly on a radius: within one point.
  assert abs(ours[0] - expected[0]) <= 1 / len(fake) + 1e-12
  assert abs(ours[1] - expected[1]) <= 1 / len(real) + 1e-12
  assert fid.precision_recall(real, real, k=3) == (1.0, 1.0)
  assert fid.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
  # Samples collapsed onto one real cluster: precise, but they miss the rest.
  precision, recall = fid.precision_recall(
    np.concatenate([real, real + 50.0]), real[:100] + 1e-3, k=3
  )
  assert precision == 1.0 and recall < 0.5


# ---------------------------------------------------------------- metrics over an extractor


def moments_extractor():
  """A deterministic numpy extractor: per-channel moments as features and
  4 'classes' scored by brightness."""

  def forward(images):
    flat = images.reshape(len(images), -1)
    pool = np.stack([flat.mean(1), flat.std(1), (flat**3).mean(1)], axis=1)
    logits = np.stack([-((flat.mean(1) - c) ** 2) * 50 for c in (0.2, 0.4, 0.6, 0.8)], 1)
    return {"pool": pool, "logits": logits, "spatial": flat[:, :5]}

  return features_lib.Extractor(name="moments", forward=forward, dimension=3, num_classes=4)


def test_sample_metrics_equal_the_formulas_on_all_features(tmp_path):
  rng = np.random.default_rng(5)
  real = rng.uniform(size=(90, 4, 4, 1)).astype(np.float32)
  samples = (rng.uniform(size=(37, 4, 4, 1)) ** 1.5).astype(np.float32)
  labels = rng.integers(0, 4, size=37)
  extractor = moments_extractor()
  reference = fid.reference_from_images(extractor, real, batch_size=16)
  # A batch size that leaves a padded last batch: padding must not leak in.
  results = fid.sample_metrics(extractor, samples, labels, reference, batch_size=8, splits=2)

  real_out, out = (
    {k: v.astype(np.float64) for k, v in extractor(x).items()} for x in (real, samples)
  )
  expected_fid = fid.frechet_distance(
    out["pool"].mean(0),
    np.cov(out["pool"], rowvar=False),
    real_out["pool"].mean(0),
    np.cov(real_out["pool"], rowvar=False),
  )
  assert results["fid"] == pytest.approx(expected_fid, rel=1e-9)
  expected_sfid = fid.frechet_distance(
    out["spatial"].mean(0),
    np.cov(out["spatial"], rowvar=False),
    real_out["spatial"].mean(0),
    np.cov(real_out["spatial"], rowvar=False),
  )
  assert results["sfid"] == pytest.approx(expected_sfid, rel=1e-9)
  assert results["inception_score"] == pytest.approx(
    fid.inception_score(out["logits"], splits=2)[0]
  )
  assert (results["precision"], results["recall"]) == fid.precision_recall(
    real_out["pool"], out["pool"]
  )
  assert results["accuracy"] == pytest.approx((out["logits"].argmax(1) == labels).mean())
  assert results["count"] == 37
  # Streaming batches from an iterator give the same numbers.
  streamed = fid.sample_metrics(
    extractor, iter([samples[:20], samples[20:]]), labels, reference, batch_size=20, splits=2
  )
  assert streamed["fid"] == pytest.approx(results["fid"], rel=1e-9)
  # Two processes' shares, gathered and merged; the reference through a file.
  shares = [fid.extract(extractor, part, batch_size=8) for part in (samples[:15], samples[15:])]
  path = str(tmp_path / "reference.npz")
  fid.save_stats(path, **reference)
  merged = fid.metrics_from(
    shares[0].merge(shares[1]), labels, fid.load_reference(path), num_classes=4, splits=2
  )
  for name, value in results.items():
    assert merged[name] == pytest.approx(value, rel=1e-6), name


def test_extractor_rejects_images_outside_unit_range():
  with pytest.raises(ValueError, match=r"in \[0, 1\].*\(x \+ 1\) / 2"):
    moments_extractor()(np.full((2, 4, 4, 1), -1.0, np.float32))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    moments_extractor()(np.zeros((4, 4, 1), np.float32))


# ---------------------------------------------------------------- Inception: torch reference

# torchvision's Inception-v3 layers (pytorch-fid's FID variant), written out
# independently of pixel_vit.models.inception: name -> (in, out, kernel,
# stride, padding).


def block_a(cin, pool_features):
  return {
    "branch1x1": (cin, 64, 1, 1, 0),
    "branch5x5_1": (cin, 48, 1, 1, 0),
    "branch5x5_2": (48, 64, 5, 1, 2),
    "branch3x3dbl_1": (cin, 64, 1, 1, 0),
    "branch3x3dbl_2": (64, 96, 3, 1, 1),
    "branch3x3dbl_3": (96, 96, 3, 1, 1),
    "branch_pool": (cin, pool_features, 1, 1, 0),
  }


def block_b(cin):
  return {
    "branch3x3": (cin, 384, 3, 2, 0),
    "branch3x3dbl_1": (cin, 64, 1, 1, 0),
    "branch3x3dbl_2": (64, 96, 3, 1, 1),
    "branch3x3dbl_3": (96, 96, 3, 2, 0),
  }


def block_c(cin, c7):
  row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
  return {
    "branch1x1": (cin, 192, 1, 1, 0),
    "branch7x7_1": (cin, c7, 1, 1, 0),
    "branch7x7_2": (c7, c7, *row),
    "branch7x7_3": (c7, 192, *col),
    "branch7x7dbl_1": (cin, c7, 1, 1, 0),
    "branch7x7dbl_2": (c7, c7, *col),
    "branch7x7dbl_3": (c7, c7, *row),
    "branch7x7dbl_4": (c7, c7, *col),
    "branch7x7dbl_5": (c7, 192, *row),
    "branch_pool": (cin, 192, 1, 1, 0),
  }


def block_d(cin):
  return {
    "branch3x3_1": (cin, 192, 1, 1, 0),
    "branch3x3_2": (192, 320, 3, 2, 0),
    "branch7x7x3_1": (cin, 192, 1, 1, 0),
    "branch7x7x3_2": (192, 192, (1, 7), 1, (0, 3)),
    "branch7x7x3_3": (192, 192, (7, 1), 1, (3, 0)),
    "branch7x7x3_4": (192, 192, 3, 2, 0),
  }


def block_e(cin):
  row, col = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
  return {
    "branch1x1": (cin, 320, 1, 1, 0),
    "branch3x3_1": (cin, 384, 1, 1, 0),
    "branch3x3_2a": (384, 384, *row),
    "branch3x3_2b": (384, 384, *col),
    "branch3x3dbl_1": (cin, 448, 1, 1, 0),
    "branch3x3dbl_2": (448, 384, 3, 1, 1),
    "branch3x3dbl_3a": (384, 384, *row),
    "branch3x3dbl_3b": (384, 384, *col),
    "branch_pool": (cin, 192, 1, 1, 0),
  }


STEM = {
  "Conv2d_1a_3x3": (3, 32, 3, 2, 0),
  "Conv2d_2a_3x3": (32, 32, 3, 1, 0),
  "Conv2d_2b_3x3": (32, 64, 3, 1, 1),
  "Conv2d_3b_1x1": (64, 80, 1, 1, 0),
  "Conv2d_4a_3x3": (80, 192, 3, 1, 0),
}
MIXED = [
  ("Mixed_5b", "A", block_a(192, 32)),
  ("Mixed_5c", "A", block_a(256, 64)),
  ("Mixed_5d", "A", block_a(288, 64)),
  ("Mixed_6a", "B", block_b(288)),
  ("Mixed_6b", "C", block_c(768, 128)),
  ("Mixed_6c", "C", block_c(768, 160)),
  ("Mixed_6d", "C", block_c(768, 160)),
  ("Mixed_6e", "C", block_c(768, 192)),
  ("Mixed_7a", "D", block_d(768)),
  ("Mixed_7b", "E_1", block_e(1280)),
  ("Mixed_7c", "E_2", block_e(2048)),
]


def random_state_dict(rng, layers: dict, prefix: str = "") -> dict:
  """torch-named random weights; He-scaled so activations stay O(1) in depth."""
  state = {}
  for name, (cin, cout, kernel, _, _) in layers.items():
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    key = f"{prefix}{name}"
    state[f"{key}.conv.weight"] = rng.standard_normal((cout, cin, kh, kw), np.float32) * np.float32(
      math.sqrt(2.0 / (cin * kh * kw))
    )
    state[f"{key}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    state[f"{key}.bn.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
    state[f"{key}.bn.running_mean"] = rng.normal(0, 0.1, cout).astype(np.float32)
    state[f"{key}.bn.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
  return state


def full_state_dict(seed=0) -> dict:
  rng = np.random.default_rng(seed)
  state = random_state_dict(rng, STEM)
  for name, _, layers in MIXED:
    state.update(random_state_dict(rng, layers, prefix=f"{name}."))
  state["fc.weight"] = rng.standard_normal((1008, 2048), np.float32) * np.float32(0.02)
  state["fc.bias"] = rng.normal(0, 0.1, 1008).astype(np.float32)
  return state


def torch_conv(x, state, layers, name, prefix=""):
  _, _, _, stride, padding = layers[name]
  torch, F = import_torch()
  key = f"{prefix}{name}"
  t = {k: torch.from_numpy(v) for k, v in state.items() if k.startswith(key + ".")}
  x = F.conv2d(x, t[f"{key}.conv.weight"], stride=stride, padding=padding)
  x = F.batch_norm(
    x,
    t[f"{key}.bn.running_mean"],
    t[f"{key}.bn.running_var"],
    t[f"{key}.bn.weight"],
    t[f"{key}.bn.bias"],
    training=False,
    eps=1e-3,
  )
  return F.relu(x)


def torch_block(kind, x, state, layers, prefix=""):
  """pytorch-fid's forward of one block, in torch.nn.functional (NCHW)."""
  torch, F = import_torch()
  c = lambda name, h: torch_conv(h, state, layers, name, prefix)  # noqa: E731
  tf_avg = lambda h: F.avg_pool2d(h, 3, stride=1, padding=1, count_include_pad=False)  # noqa: E731
  if kind == "A":
    out = [
      c("branch1x1", x),
      c("branch5x5_2", c("branch5x5_1", x)),
      c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
      c("branch_pool", tf_avg(x)),
    ]
  elif kind == "B":
    out = [
      c("branch3x3", x),
      c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
      F.max_pool2d(x, 3, stride=2),
    ]
  elif kind == "C":
    b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
    dbl = x
    for i in range(1, 6):
      dbl = c(f"branch7x7dbl_{i}", dbl)
    out = [c("branch1x1", x), b7, dbl, c("branch_pool", tf_avg(x))]
  elif kind == "D":
    b7 = x
    for i in range(1, 5):
      b7 = c(f"branch7x7x3_{i}", b7)
    out = [c("branch3x3_2", c("branch3x3_1", x)), b7, F.max_pool2d(x, 3, stride=2)]
  else:  # E_1 / E_2
    b3 = c("branch3x3_1", x)
    dbl = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
    pooled = tf_avg(x) if kind == "E_1" else F.max_pool2d(x, 3, stride=1, padding=1)
    out = [
      c("branch1x1", x),
      c("branch3x3_2a", b3),
      c("branch3x3_2b", b3),
      c("branch3x3dbl_3a", dbl),
      c("branch3x3dbl_3b", dbl),
      c("branch_pool", pooled),
    ]
  return torch.cat(out, 1)


def torch_inception(images_nhwc, state):
  """pytorch-fid's FID InceptionV3 forward -> (pool, logits, Mixed_6d.branch1x1)."""
  torch, F = import_torch()
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  x = 2 * x - 1
  for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
    x = torch_conv(x, state, STEM, name)
  x = F.max_pool2d(x, 3, stride=2)
  x = torch_conv(torch_conv(x, state, STEM, "Conv2d_3b_1x1"), state, STEM, "Conv2d_4a_3x3")
  x = F.max_pool2d(x, 3, stride=2)
  for name, kind, layers in MIXED:
    if name == "Mixed_6d":
      spatial = torch_conv(x, state, layers, "branch1x1", prefix=f"{name}.")
    x = torch_block(kind, x, state, layers, prefix=f"{name}.")
  pool = x.mean(dim=(2, 3))
  logits = pool @ torch.from_numpy(state["fc.weight"]).T + torch.from_numpy(state["fc.bias"])
  return pool.numpy(), logits.numpy(), spatial.numpy()


def nhwc(x_nchw):
  return np.asarray(x_nchw).transpose(0, 2, 3, 1)


@pytest.mark.torch
def test_basic_conv_matches_torch():
  torch, _ = import_torch()
  layers = {"conv1": (5, 7, (3, 1), 2, (1, 0))}
  state = random_state_dict(np.random.default_rng(6), layers)
  x = np.random.default_rng(7).normal(size=(2, 5, 9, 8)).astype(np.float32)
  expected = torch_conv(torch.from_numpy(x), state, layers, "conv1")
  conv = inception.from_state_dict(
    lambda: inception.BasicConv2d(5, 7, (3, 1), stride=2, padding=(1, 0), rngs=nnx.Rngs(0)),
    {k.removeprefix("conv1."): v for k, v in state.items()},
  )
  np.testing.assert_allclose(conv(jnp.asarray(nhwc(x))), nhwc(expected), rtol=1e-5, atol=1e-5)


BLOCKS = {
  "A": (lambda: inception.FIDInceptionA(6, 32, rngs=nnx.Rngs(0)), block_a(6, 32), 5),
  "B": (lambda: inception.InceptionB(6, rngs=nnx.Rngs(0)), block_b(6), 7),
  "C": (lambda: inception.FIDInceptionC(6, 16, rngs=nnx.Rngs(0)), block_c(6, 16), 5),
  "D": (lambda: inception.InceptionD(6, rngs=nnx.Rngs(0)), block_d(6), 7),
  "E_1": (lambda: inception.FIDInceptionE_1(6, rngs=nnx.Rngs(0)), block_e(6), 4),
  "E_2": (lambda: inception.FIDInceptionE_2(6, rngs=nnx.Rngs(0)), block_e(6), 4),
}


@pytest.mark.torch
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_each_block_matches_the_torch_reference(kind):
  torch, _ = import_torch()
  make, layers, size = BLOCKS[kind]
  state = random_state_dict(np.random.default_rng(8), layers)
  # Signed inputs: zero-padded max pooling or pad-counting averages would differ.
  x = np.random.default_rng(9).normal(size=(2, 6, size, size)).astype(np.float32)
  expected = nhwc(torch_block(kind, torch.from_numpy(x), state, layers))
  block = inception.from_state_dict(make, state)
  actual = np.asarray(block(jnp.asarray(nhwc(x))))
  assert actual.shape == expected.shape
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_pooling_differs_between_e_1_and_e_2():
  """The two E blocks on the same weights: only their pool branch may differ."""
  state = random_state_dict(np.random.default_rng(10), block_e(6))
  x = jnp.asarray(np.random.default_rng(11).normal(size=(1, 4, 4, 6)).astype(np.float32))
  first = np.asarray(inception.from_state_dict(BLOCKS["E_1"][0], state)(x))
  second = np.asarray(inception.from_state_dict(BLOCKS["E_2"][0], state)(x))
  np.testing.assert_array_equal(first[..., :-192], second[..., :-192])
  assert not np.allclose(first[..., -192:], second[..., -192:])


@pytest.fixture(scope="module")
def inception_state():
  """A random state dict {key: numpy array} with pytorch-fid's keys (torch-free)."""
  return full_state_dict()


@pytest.fixture(scope="module")
def inception_weights(inception_state, tmp_path_factory):
  """The random state dict, as .pth (torch.save) and .npz (through the converter)."""
  torch, _ = import_torch()
  state = inception_state
  # Newer torch state dicts carry BatchNorm step counters; they are no weights.
  saved = {k: torch.from_numpy(v) for k, v in state.items()}
  saved["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
  directory = tmp_path_factory.mktemp("inception")
  pth, npz = str(directory / "pt_inception.pth"), str(directory / "inception.npz")
  torch.save(saved, pth)
  inception.main(["--convert", pth, npz])
  return state, pth, npz


@pytest.fixture(scope="module")
def inception_run(inception_weights):
  """The model loaded from the .pth, applied (jitted) to two small RGB images."""
  images = np.random.default_rng(12).uniform(size=(2, 40, 52, 3)).astype(np.float32)
  graphdef, params = nnx.split(inception.load_inception(inception_weights[1]))
  outputs = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, images)
  return images, jax.device_get(outputs)


@pytest.fixture(scope="module")
def expected_keys():
  return inception.torch_shapes(nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0))))


def test_expected_keys_are_pytorch_fids(inception_state, expected_keys):
  assert expected_keys == {k: v.shape for k, v in inception_state.items()}


@pytest.mark.torch
def test_converter_keeps_keys_and_layouts(inception_weights):
  state, _, npz = inception_weights
  with np.load(npz) as converted:  # the converter keeps keys and torch layouts
    assert set(converted.files) == set(state)
    for key in (
      "Mixed_6d.branch7x7_2.conv.weight",
      "fc.weight",
      "Mixed_7c.branch_pool.bn.running_var",
    ):
      np.testing.assert_array_equal(converted[key], state[key])


@pytest.mark.torch
def test_full_model_matches_torch(inception_weights, inception_run):
  state, _, _ = inception_weights
  images, out = inception_run
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  assert out["spatial"].shape == (2, 7 * 17 * 17)
  assert all(np.isfinite(v).all() for v in out.values())

  pool, logits, spatial = torch_inception(images, state)
  scale = lambda a: 1e-4 * np.abs(a).max()  # noqa: E731
  np.testing.assert_allclose(out["pool"], pool, rtol=1e-3, atol=scale(pool))
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-3, atol=scale(logits))
  # ADM's sFID layout: the first 7 channels of mixed_6/conv, flattened (h, w, c).
  expected_spatial = nhwc(spatial)[..., :7].reshape(2, -1)
  np.testing.assert_allclose(
    out["spatial"], expected_spatial, rtol=1e-3, atol=scale(expected_spatial)
  )


@pytest.mark.torch
def test_inception_extractor_runs_the_converted_weights(inception_weights, inception_run):
  images, out = inception_run
  extractor = features_lib.inception_extractor(inception_weights[2])  # the .npz
  assert extractor.dimension == 2048 and extractor.num_classes is None
  # Two images padded to the 8 devices' batch; same numbers as the .pth model.
  extracted = fid.extract(extractor, images, batch_size=2)
  # Another batch size rounds float32 sums differently: tolerance ~1e-6 of the scale.
  for actual, expected in (
    (extracted.features, out["pool"]),
    (extracted.logits, out["logits"]),
    (extracted.spatial.mu, out["spatial"].mean(0)),
  ):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
  assert extracted.pool.count == 2 and extracted.spatial.dimension == 2023
  with pytest.raises(
    ValueError,
    match="reference statistics are 64-d but extractor 'inception.*' gives 2048-d features",
  ):
    fid.check_reference(extractor, {"mu": np.zeros(64), "sigma": np.eye(64)})


@pytest.mark.parametrize(
  "edit, match",
  [
    (
      lambda s: s.pop("Mixed_6d.branch1x1.bn.running_var"),
      r"missing keys \['Mixed_6d\.branch1x1\.bn\.running_var'\]",
    ),
    (
      lambda s: s.update({"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)}),
      r"unexpected keys \['AuxLogits\.fc\.weight'\]",
    ),
    (
      lambda s: s.update({"fc.weight": np.zeros((1000, 2048), np.float32)}),
      r"wrong shapes fc\.weight: \(1000, 2048\) \(expected \(1008, 2048\)\)",
    ),
  ],
  ids=["missing", "unexpected", "shape"],
)
def test_bad_state_dicts_are_named(inception_state, expected_keys, edit, match):
  state = dict(inception_state)
  edit(state)
  with pytest.raises(
    ValueError,
    match=r"'w.pth' does not hold the FID Inception-v3 weights: "
    + match
    + r".*pt_inception-2015-12-05",
  ):
    inception.check_state_dict(expected_keys, state, "'w.pth'")


def test_loading_checks_the_keys_first(inception_state, tmp_path):
  state = dict(inception_state)
  del state["fc.bias"]
  path = str(tmp_path / "partial.npz")
  np.savez(path, **{k: state[k] for k in list(state)[:5]})
  with pytest.raises(ValueError, match=r"partial\.npz.*missing keys.*'fc\.bias'"):
    inception.load_inception(path)


def test_pth_without_torch_says_how_to_convert(tmp_path, monkeypatch):
  pth = tmp_path / "pt_inception.pth"
  pth.write_bytes(b"not read: torch is missing")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  with pytest.raises(ImportError, match=r"needs torch.*--convert IN\.pth OUT\.npz"):
    inception.load_inception(str(pth))
  with pytest.raises(ValueError, match="do not exist"):
    inception.load_inception("/nonexistent/pt_inception.pth")


@pytest.mark.torch
def test_preprocessing_is_pytorch_fids_resize():
  torch, F = import_torch()
  for shape in ((1, 3, 8, 8), (1, 3, 320, 301)):  # up- and downsampling
    x = np.random.default_rng(14).uniform(size=shape).astype(np.float32)
    expected = (
      2 * F.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear", align_corners=False)
      - 1
    )
    actual = inception.preprocess(jnp.asarray(nhwc(x)))
    np.testing.assert_allclose(actual, nhwc(expected), atol=2e-6)


def test_preprocessing_channels():
  # A grey image enters the network as the same image in all three channels.
  grey = jnp.asarray(np.random.default_rng(15).uniform(size=(2, 20, 20, 1)), jnp.float32)
  np.testing.assert_array_equal(
    inception.preprocess(grey), inception.preprocess(jnp.repeat(grey, 3, axis=-1))
  )
  with pytest.raises(ValueError, match="C = 1 or 3"):
    inception.preprocess(jnp.zeros((1, 8, 8, 4)))


# ---------------------------------------------------------------- a project classifier


@pytest.fixture(scope="module")
def classifier_run(cls_pixel, tmp_path_factory):
  """The quick digits classifier, trained briefly by the real trainer, with an
  EMA (so the extractor's choice of EMA over raw parameters is visible)."""
  config = set_dotted(
    cls_pixel.get_config("variant=mu/4,quick"),
    {
      "total_steps": 30,
      "batch_size": 64,
      "eval_batch_size": 360,
      "eval_every": 30,
      "checkpoint_every": 30,
      "log_every": 10,
      "optimizer.lr": 2e-3,
      "optimizer.warmup_steps": 3,
      "optimizer.ema_decay": 0.8,
    },
  )
  workdir = str(tmp_path_factory.mktemp("classifier") / "workdir")
  state, results = classification.train_and_evaluate(config, workdir)
  train_split, test_split = loop.load_splits(config)
  return config, workdir, state, results, train_split, test_split


@pytest.mark.slow
def test_classifier_extractor_gives_the_trained_models_outputs(classifier_run):
  config, workdir, state, results, train_split, test_split = classifier_run
  extractor = features_lib.classifier_extractor(workdir)
  assert extractor.dimension == 64 and extractor.num_classes == 10
  images = test_split.images[:50]
  out = extractor(images.astype(np.float32) / 255.0)

  graphdef = nnx.split(nnx.eval_shape(classification.make_model_fn(config, train_split)))[0]
  normalised, _ = augment.preprocess_eval(
    images, test_split.labels[:50], num_classes=10, config=config.augment
  )
  model = state_lib.merge_model(graphdef, jax.device_get(state.ema_params))
  np.testing.assert_allclose(out["logits"], model(normalised), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["pool"], model.features(normalised), rtol=1e-4, atol=1e-5)
  # The EMA was taken, not the raw parameters (they differ after 30 steps).
  raw = state_lib.merge_model(graphdef, jax.device_get(state.params))(normalised)
  assert not np.allclose(out["logits"], raw, atol=1e-3)

  # Accuracy of "samples" = the real test digits with their labels: the
  # trainer's own EMA evaluation, within one example.
  reference = fid.reference_from_images(extractor, train_split.images, batch_size=128)
  metrics = fid.sample_metrics(
    extractor,
    test_split.images.astype(np.float32) / 255.0,
    test_split.labels,
    reference,
    batch_size=128,
  )
  assert abs(metrics["accuracy"] - results["eval_ema/top1"]) <= 1 / DIGITS_TEST_EXAMPLES
  assert metrics["accuracy"] > 0.3, metrics

  # Real held-out digits are close to the real training digits; noise is not.
  noise = np.random.default_rng(15).uniform(size=test_split.images.shape).astype(np.float32)
  noise_metrics = fid.sample_metrics(extractor, noise, None, reference, batch_size=128)
  assert metrics["fid"] * 10 < noise_metrics["fid"], (metrics, noise_metrics)
  assert metrics["precision"] > noise_metrics["precision"]
  assert "accuracy" not in noise_metrics  # no labels given


@pytest.mark.slow
def test_classifier_extractor_rejects_mismatches(classifier_run, tmp_path):
  _, workdir, _, _, _, test_split = classifier_run
  extractor = features_lib.classifier_extractor(workdir)
  inception_reference = {"mu": np.zeros(2048), "sigma": np.eye(2048)}
  with pytest.raises(
    ValueError,
    match=r"reference statistics are 2048-d but extractor "
    r"'classifier mu/4.*' gives 64-d features",
  ):
    fid.sample_metrics(
      extractor, test_split.images / 255.0, None, inception_reference, batch_size=32
    )
  with pytest.raises(
    ValueError,
    match=r"images are 16x16x1 but this classifier was trained "
    r"on 8x8x1",
  ):
    extractor(np.zeros((2, 16, 16, 1), np.float32))
  with pytest.raises(ValueError, match=r"does not exist.*cls_pixel\.py:quick"):
    features_lib.classifier_extractor(str(tmp_path / "nowhere"))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps({"model": {}}))
  with pytest.raises(ValueError, match=r"no finished checkpoint.*cls_pixel\.py:quick"):
    features_lib.classifier_extractor(str(empty))
  os.makedirs(tmp_path / "no_config")
  with pytest.raises(ValueError, match=r"no config\.json"):
    features_lib.classifier_extractor(str(tmp_path / "no_config"))


def test_classifier_extractor_rejects_other_tasks(tmp_path):
  from pixel_vit import checkpoint as checkpoint_lib

  workdir = str(tmp_path / "mae")
  checkpointer = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=1, async_save=False)
  checkpointer.save(
    1,
    {"params": {"w": jnp.ones(3)}},
    checkpoint_lib.RunIdentity(task="mae", variant="mu/1", posemb="learn", image_shape=(8, 8, 1)),
    force=True,
  )
  checkpointer.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"model": {"variant": "mu/1"}}, f)
  with pytest.raises(ValueError, match=r"task 'mae', not 'classification'.*cls_pixel"):
    features_lib.classifier_extractor(workdir)
