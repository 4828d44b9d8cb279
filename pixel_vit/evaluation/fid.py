"""Sample-quality metrics for generative models: FID, sFID, Inception Score,
improved precision / recall, and class accuracy of samples.

The definitions follow the ADM evaluation suite (openai/guided-diffusion,
`evaluations/evaluator.py`) that the PiT paper's diffusion study reports:

  * FID: Frechet distance between Gaussians fitted to the features of samples
    and of real images (`pool` features); sFID the same on `spatial` features.
  * Inception Score: exp(E_x KL(p(y|x) || p(y))) on the extractor's logits,
    averaged over splits.
  * precision / recall: Kynkaanniemi et al. (2019), k-NN radii in feature space.
  * accuracy: how often the extractor's classifier assigns a sample the class
    it was generated for (only for extractors over the dataset's classes).

Features come from an `Extractor` (`pixel_vit.evaluation.features`): the FID
Inception-v3 for real-sized images, or a classifier trained by this project
for small data (digits, MNIST) where Inception's ImageNet features mean little.

Everything here is numpy on the host, statistics in float64.

Several processes: every function works on the arrays *this process* holds.
To evaluate samples spread over processes, each runs `extract` on its share
and the caller gathers the results to one place (e.g.
`jax.experimental.multihost_utils.process_allgather` on the `FeatureStats`
sums, logits and features, then `Extracted.merge`) before `metrics_from`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Iterator

import numpy as np

# Real / sample features kept for precision-recall (ADM keeps 10k reference
# images; pairwise distances of more cost O(N^2 D) on the host).
PRECISION_RECALL_SAMPLES = 10_000
# Rows of the pairwise-distance matrix computed at once (memory: rows x N floats).
DISTANCE_BLOCK = 1024


# ---------------------------------------------------------------- Gaussian statistics


class FeatureStats:
  """Streaming mean and covariance of feature vectors.

  Keeps the count, the sum and the sum of outer products in float64, so
  batches (and the sums of other processes) can be added in any order.
  """

  def __init__(self, dimension: int):
    self.dimension = int(dimension)
    self.count = 0
    self.total = np.zeros(self.dimension, np.float64)
    self.outer = np.zeros((self.dimension, self.dimension), np.float64)

  @classmethod
  def from_sums(cls, count: int, total: np.ndarray, outer: np.ndarray) -> FeatureStats:
    """Rebuilds statistics from gathered sums (`count`, `total`, `outer`)."""
    stats = cls(np.shape(total)[0])
    if np.shape(outer) != (stats.dimension, stats.dimension):
      raise ValueError(
        f"outer-product sum of shape {np.shape(outer)} does not match a "
        f"{stats.dimension}-d sum; expected ({stats.dimension}, "
        f"{stats.dimension})."
      )
    stats.count = int(count)
    stats.total = np.asarray(total, np.float64).copy()
    stats.outer = np.asarray(outer, np.float64).copy()
    return stats

  def add(self, features: np.ndarray) -> FeatureStats:
    """Adds a batch [B, D] of feature vectors."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[1] != self.dimension:
      raise ValueError(f"features must have shape [B, {self.dimension}], got {features.shape}.")
    if not np.isfinite(features).all():
      raise ValueError(
        "features contain NaN or inf: the extractor's input or weights are "
        "broken (check that images are finite and in [0, 1])."
      )
    self.count += features.shape[0]
    self.total += features.sum(axis=0)
    self.outer += features.T @ features
    return self

  def merge(self, other: FeatureStats) -> FeatureStats:
    """The statistics of both sets together (a new object)."""
    if other.dimension != self.dimension:
      raise ValueError(
        f"cannot merge {self.dimension}-d and {other.dimension}-d feature "
        "statistics: they come from different extractors."
      )
    return FeatureStats.from_sums(
      self.count + other.count, self.total + other.total, self.outer + other.outer
    )

  @property
  def mu(self) -> np.ndarray:
    if self.count < 1:
      raise ValueError("no features were added: the mean of an empty set is undefined.")
    return self.total / self.count

  @property
  def sigma(self) -> np.ndarray:
    """Unbiased covariance (divides by count - 1, like np.cov)."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}.")
    mu = self.mu
    sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return (sigma + sigma.T) / 2  # exactly symmetric despite rounding


def _check_stats(mu1, sigma1, mu2, sigma2):
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(
      f"feature means differ in dimension: {mu1.shape[0]} vs {mu2.shape[0]}. The two "
      "statistics come from different feature extractors (e.g. 2048-d Inception pool3 vs "
      "a classifier's features); compute both with the same extractor."
    )
  dimension = mu1.shape[0]
  for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
    if sigma.shape != (dimension, dimension):
      raise ValueError(
        f"{name} has shape {sigma.shape}, expected ({dimension}, "
        f"{dimension}) for {dimension}-d means."
      )
  for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.isfinite(value).all():
      raise ValueError(f"{name} contains NaN or inf.")
  return mu1, sigma1, mu2, sigma2


def _round_to_zero(eigenvalues: np.ndarray) -> np.ndarray:
  """Eigenvalues of a PSD matrix with rounding noise removed: anything below
  the eigensolver's error (~ eps * D * the largest eigenvalue), including tiny
  negative values, is 0. Otherwise each zero eigenvalue of a singular
  covariance would add sqrt(1e-16) = 1e-8 to the trace of the square root."""
  scale = np.abs(eigenvalues).max(initial=0.0)
  threshold = np.finfo(np.float64).eps * len(eigenvalues) * scale
  return np.where(eigenvalues > threshold, eigenvalues, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix."""
  eigenvalues, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
  return (vectors * np.sqrt(_round_to_zero(eigenvalues))) @ vectors.T


def _factor(sigma: np.ndarray) -> np.ndarray:
  """F with F F^T = sigma: Cholesky when sigma is positive definite (fast),
  else the symmetric square root (singular covariances: fewer samples than
  dimensions)."""
  try:
    return np.linalg.cholesky(sigma)
  except np.linalg.LinAlgError:
    return _psd_sqrt(sigma)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

  With S1 = F F^T, S1 S2 = F (F^T S2 F) F^-1 is similar to the symmetric PSD
  matrix F^T S2 F, so tr (S1 S2)^(1/2) is the sum of the square roots of
  that matrix's eigenvalues: one symmetric eigenvalue solve, no
  scipy.linalg.sqrtm. F is a Cholesky factor, or for a singular S1 its
  symmetric square root, so singular covariances (fewer samples than
  dimensions), where sqrtm of S1 S2 needs ADM's diagonal-offset fallback,
  give accurate finite values. Eigenvalues within rounding of 0 count as 0.
  """
  mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
  diff = mu1 - mu2
  factor = _factor(sigma1)
  middle = factor.T @ sigma2 @ factor
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt = np.sqrt(_round_to_zero(eigenvalues)).sum()
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ---------------------------------------------------------------- reference files


def save_stats(
  path: str,
  mu: np.ndarray,
  sigma: np.ndarray,
  *,
  mu_s: np.ndarray | None = None,
  sigma_s: np.ndarray | None = None,
  features: np.ndarray | None = None,
) -> None:
  """Writes an npz readable by `load_reference` (and, for `mu`/`sigma`/`mu_s`/
  `sigma_s`, by ADM's evaluator). `features`: real features for precision/recall."""
  arrays = {"mu": mu, "sigma": sigma}
  if (mu_s is None) != (sigma_s is None):
    raise ValueError("spatial statistics need both mu_s and sigma_s (or neither).")
  if mu_s is not None:
    arrays.update(mu_s=mu_s, sigma_s=sigma_s)
  if features is not None:
    arrays["features"] = features
  arrays = {name: np.asarray(value) for name, value in arrays.items()}
  _check_reference(arrays, path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **arrays)


def _check_reference(reference: dict, where: str) -> None:
  for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
    if mu_key not in reference:
      continue
    mu, sigma = np.asarray(reference[mu_key]), np.asarray(reference.get(sigma_key))
    if mu.ndim != 1:
      raise ValueError(f"{where}: {mu_key!r} has shape {mu.shape}, expected a vector [D].")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
      raise ValueError(
        f"{where}: {sigma_key!r} has shape {sigma.shape}, expected "
        f"({mu.shape[0]}, {mu.shape[0]}) to match {mu_key!r}."
      )
  if "features" in reference:
    features = np.asarray(reference["features"])
    if features.ndim != 2 or features.shape[1] != np.shape(reference["mu"])[0]:
      raise ValueError(
        f"{where}: 'features' has shape {features.shape}, expected "
        f"[N, {np.shape(reference['mu'])[0]}] like 'mu'."
      )


def load_reference(path: str) -> dict:
  """Reads reference statistics: `mu`, `sigma` and, when present, `mu_s`,
  `sigma_s` (sFID) and `features` (precision / recall).

  Reads ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`: their
  `arr_0` images are not needed and not loaded) and files from `save_stats`.
  """
  if not os.path.exists(path):
    raise ValueError(
      f"reference statistics {path!r} do not exist. Write them with "
      "pixel_vit.evaluation.fid.save_stats (from reference_from_images) or "
      "use an ADM reference batch .npz."
    )
  with np.load(path) as data:
    keys = set(data.files)
    missing = [k for k in ("mu", "sigma") if k not in keys]
    if missing:
      raise ValueError(
        f"reference {path!r} has no {missing} (keys: {sorted(keys)}). It must hold "
        "precomputed statistics: write it with save_stats, or pass an ADM reference "
        "batch (which has 'mu' and 'sigma'); an images-only file (arr_0) needs "
        "reference_from_images first."
      )
    if ("mu_s" in keys) != ("sigma_s" in keys):
      raise ValueError(f"reference {path!r} has only one of 'mu_s' / 'sigma_s'; sFID needs both.")
    reference = {
      k: np.asarray(data[k], np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys
    }
    if "features" in keys:
      reference["features"] = np.asarray(data["features"], np.float32)
  _check_reference(reference, f"reference {path!r}")
  return reference


# ---------------------------------------------------------------- Inception Score


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` equal parts of exp(E_x KL(p(y|x) || p(y))),
  with p(y|x) = softmax(logits) and p(y) the part's mean prediction."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must have shape [N, classes], got {logits.shape}.")
  n = logits.shape[0]
  if not 1 <= splits <= n:
    raise ValueError(
      f"inception_score splits={splits} must be in [1, N={n}]: each split needs samples."
    )
  log_p = _log_softmax(logits)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits : (i + 1) * n // splits]
    p = np.exp(part)
    log_marginal = np.log(p.mean(axis=0))
    kl = (p * (part - log_marginal)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------- precision / recall


def _distance_blocks(a: np.ndarray, b: np.ndarray, block: int) -> Iterator[tuple[int, np.ndarray]]:
  """(start, squared distances [rows, len(b)]) for row blocks of `a`.

  float32 matmuls: the distances only decide inside / outside a radius, and
  float64 would be several times slower at N = 10k, D = 2048.
  """
  b_norms = (b.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
  for start in range(0, len(a), block):
    rows = a[start : start + block]
    row_norms = (rows.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
    squared = row_norms[:, None] - 2.0 * (rows @ b.T) + b_norms[None, :]
    yield start, np.maximum(squared, 0.0)


def _knn_radii(features: np.ndarray, k: int, block: int) -> np.ndarray:
  """Squared distance from each point to its k-th nearest other point."""
  radii = np.empty(len(features), np.float32)
  for start, squared in _distance_blocks(features, features, block):
    # Index k of the sorted row: index 0 is the point itself (distance 0).
    radii[start : start + len(squared)] = np.partition(squared, k, axis=1)[:, k]
  return radii


def precision_recall(
  real: np.ndarray, fake: np.ndarray, k: int = 3, *, block: int = DISTANCE_BLOCK
) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al., 2019).

  Each set's manifold is the union of balls around its points with radius
  the distance to the k-th nearest neighbour in the same set. Precision is
  the fraction of `fake` inside the real manifold, recall the fraction of
  `real` inside the fake manifold. Distances are computed `block` rows at a
  time, so memory is O(block * N).
  """
  real = np.asarray(real, np.float32)
  fake = np.asarray(fake, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(
      f"real {real.shape} and fake {fake.shape} features must be [N, D] with "
      "the same D (the same extractor)."
    )
  if min(len(real), len(fake)) <= k:
    raise ValueError(
      f"precision/recall with k={k} needs more than {k} real and fake "
      f"samples, got {len(real)} and {len(fake)}."
    )
  real_radii = _knn_radii(real, k, block)
  fake_radii = _knn_radii(fake, k, block)
  fake_inside = np.zeros(len(fake), bool)
  real_inside = np.zeros(len(real), bool)
  for start, squared in _distance_blocks(fake, real, block):  # [fake rows, real]
    fake_inside[start : start + len(squared)] = (squared <= real_radii[None, :]).any(axis=1)
    real_inside |= (squared <= fake_radii[start : start + len(squared), None]).any(axis=0)
  return float(fake_inside.mean()), float(real_inside.mean())


# ---------------------------------------------------------------- running an extractor


@dataclasses.dataclass
class Extracted:
  """What an extractor produced over a set of images (one process's share)."""

  pool: FeatureStats
  spatial: FeatureStats | None  # sFID features, when the extractor has them
  logits: np.ndarray | None  # [N, K] float32
  features: np.ndarray  # the first `keep_features` pool features [n, D], float32

  def merge(self, other: Extracted) -> Extracted:
    """Both sets together (e.g. after gathering processes' results)."""
    spatial = None
    if self.spatial is not None and other.spatial is not None:
      spatial = self.spatial.merge(other.spatial)
    logits = None
    if self.logits is not None and other.logits is not None:
      logits = np.concatenate([self.logits, other.logits])
    return Extracted(
      self.pool.merge(other.pool), spatial, logits, np.concatenate([self.features, other.features])
    )


def _batches(images, batch_size: int) -> Iterator[np.ndarray]:
  if isinstance(images, np.ndarray):
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
    for start in range(0, len(images), batch_size):
      yield images[start : start + batch_size]
  else:
    yield from images


def _as_unit_float(batch: np.ndarray) -> np.ndarray:
  """uint8 pixels (ADM's arr_0, this project's data) -> float32 in [0, 1]."""
  batch = np.asarray(batch)
  if batch.dtype == np.uint8:
    return batch.astype(np.float32) / 255.0
  return batch.astype(np.float32, copy=False)


def extract(
  extractor,
  images: np.ndarray | Iterable[np.ndarray],
  *,
  batch_size: int,
  keep_features: int = PRECISION_RECALL_SAMPLES,
) -> Extracted:
  """Runs `extractor` over `images` (an [N, H, W, C] array or an iterable of
  such batches; float in [0, 1] or uint8) and accumulates statistics.

  Every batch is padded to `batch_size`, so a jitted extractor compiles once.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be positive.")
  pool = FeatureStats(extractor.dimension)
  spatial: FeatureStats | None = None
  logits, features = [], []
  kept = 0
  for batch in _batches(images, batch_size):
    batch = _as_unit_float(batch)
    n = len(batch)
    if n == 0:
      continue
    if n > batch_size:
      raise ValueError(f"an image batch of {n} is larger than batch_size={batch_size}.")
    padded = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
    outputs = {name: np.asarray(value)[:n] for name, value in extractor(padded).items()}
    pool.add(outputs["pool"])
    if "spatial" in outputs:
      if spatial is None:
        spatial = FeatureStats(outputs["spatial"].shape[1])
      spatial.add(outputs["spatial"])
    if "logits" in outputs:
      logits.append(outputs["logits"].astype(np.float32))
    if kept < keep_features:
      features.append(outputs["pool"][: keep_features - kept].astype(np.float32))
      kept += len(features[-1])
  if pool.count == 0:
    raise ValueError("no images to evaluate: the image set is empty.")
  return Extracted(
    pool=pool,
    spatial=spatial,
    logits=np.concatenate(logits) if logits else None,
    features=np.concatenate(features),
  )


def reference_from_images(
  extractor,
  images: np.ndarray | Iterable[np.ndarray],
  batch_size: int,
  *,
  keep_features: int = PRECISION_RECALL_SAMPLES,
) -> dict:
  """Reference statistics of real images: `mu`, `sigma`, (`mu_s`, `sigma_s`)
  and up to `keep_features` real `features` for precision / recall.
  The same dict as `load_reference` returns; `save_stats(path, **ref)` stores it."""
  extracted = extract(extractor, images, batch_size=batch_size, keep_features=keep_features)
  reference = {
    "mu": extracted.pool.mu,
    "sigma": extracted.pool.sigma,
    "features": extracted.features,
  }
  if extracted.spatial is not None:
    reference.update(mu_s=extracted.spatial.mu, sigma_s=extracted.spatial.sigma)
  return reference


def check_reference(extractor, reference: dict) -> None:
  """Raises ValueError when `reference` was not computed with `extractor`'s features."""
  _check_reference(reference, "reference")
  dimension = np.shape(reference["mu"])[0]
  if dimension != extractor.dimension:
    raise ValueError(
      f"reference statistics are {dimension}-d but extractor {extractor.name!r} gives "
      f"{extractor.dimension}-d features: the reference was computed with a different "
      "feature extractor (e.g. Inception pool3 is 2048-d, a classifier's features are its "
      "width). Compute the reference with this extractor (reference_from_images) or use "
      "the extractor the reference was made with."
    )


def metrics_from(
  extracted: Extracted,
  labels: np.ndarray | None,
  reference: dict,
  *,
  num_classes: int | None = None,
  splits: int = 10,
  k: int = 3,
) -> dict:
  """The metrics of `extracted` samples against `reference` (see `sample_metrics`)."""
  results = {
    "fid": frechet_distance(
      extracted.pool.mu, extracted.pool.sigma, reference["mu"], reference["sigma"]
    )
  }
  if extracted.spatial is not None and "mu_s" in reference:
    results["sfid"] = frechet_distance(
      extracted.spatial.mu, extracted.spatial.sigma, reference["mu_s"], reference["sigma_s"]
    )
  if extracted.logits is not None:
    mean, std = inception_score(extracted.logits, splits=min(splits, len(extracted.logits)))
    results.update(inception_score=mean, inception_score_std=std)
  if "features" in reference:
    results["precision"], results["recall"] = precision_recall(
      reference["features"], extracted.features, k=k
    )
  if labels is not None and num_classes is not None and extracted.logits is not None:
    labels = np.asarray(labels)
    if labels.shape != (len(extracted.logits),):
      raise ValueError(
        f"labels must have shape [N] = ({len(extracted.logits)},), one class "
        f"per sample; got {labels.shape}."
      )
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(
        f"labels must be class ids in [0, {num_classes}), the classifier's "
        f"classes; got [{labels.min()}, {labels.max()}]."
      )
    results["accuracy"] = float((extracted.logits.argmax(axis=1) == labels).mean())
  results["count"] = extracted.pool.count
  return results


def sample_metrics(
  extractor,
  sample_images: np.ndarray | Iterable[np.ndarray],
  sample_labels: np.ndarray | None,
  reference: dict,
  *,
  batch_size: int,
  splits: int = 10,
  k: int = 3,
  keep_features: int = PRECISION_RECALL_SAMPLES,
) -> dict:
  """FID and friends of generated samples (float NHWC in [0, 1]) against `reference`.

  Returns `fid`; `sfid` when the extractor has spatial features and the
  reference `mu_s`/`sigma_s`; `inception_score` (and its std over `splits`)
  when the extractor has logits; `precision`/`recall` when the reference has
  real `features` (the first `keep_features` samples are used); `accuracy`
  (argmax of the classifier == the label a sample was generated for) when the
  extractor classifies the dataset's classes and `sample_labels` are given;
  and `count`. The reference's dimension is checked before any image is run.
  """
  check_reference(extractor, reference)
  extracted = extract(extractor, sample_images, batch_size=batch_size, keep_features=keep_features)
  return metrics_from(
    extracted, sample_labels, reference, num_classes=extractor.num_classes, splits=splits, k=k
  )
