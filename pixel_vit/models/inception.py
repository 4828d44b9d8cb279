"""The FID Inception-v3 (Flax NNX, NHWC): the network FID, sFID and IS are defined with.

FID numbers are only comparable when computed with one specific network: the
TensorFlow Inception graph of 2015-12-05 (`classify_image_graph_def.pb`, used
by TTUR's FID and by ADM's evaluator). pytorch-fid ported it to PyTorch
(`pt_inception-2015-12-05-6726825d.pth`); this module rebuilds that port:
torchvision's Inception-v3 with the FID patches

  * `FIDInceptionA`, `FIDInceptionC`, `FIDInceptionE_1`: the 3x3 average pool
    of the pool branch does not count the zero padding (TF's behaviour),
  * `FIDInceptionE_2` (Mixed_7c): a 3x3 *max* pool in the pool branch,
  * a 1008-way classifier (`fc`), no auxiliary head.

Input: float images [B, H, W, C] in [0, 1], C = 1 (repeated to 3) or 3, any
size; resized bilinearly to 299x299 (half-pixel centres, no antialiasing:
torch's `F.interpolate(..., align_corners=False)`, as pytorch-fid does) and
scaled to [-1, 1]. Output dict:

  * `pool`    [B, 2048]  pool3, the final average pool: FID features,
  * `logits`  [B, 1008]  `fc(pool)`: the Inception Score's classifier,
  * `spatial` [B, 2023]  sFID features: ADM takes the first 7 channels of the
    TF tensor `mixed_6/conv` (17x17), flattened in (h, w, c) order. In the TF
    graph `mixed`, `mixed_1`, ... `mixed_10` are Mixed_5b, 5c, 5d, 6a, 6b, 6c,
    6d, 6e, 7a, 7b, 7c, and each block's `conv` is its 1x1 branch, so
    `mixed_6/conv` is `Mixed_6d.branch1x1` (after BatchNorm and ReLU, as the
    TF op is). NHWC flattening gives ADM's (h, w, c) order.

Numbers match pytorch-fid's; against ADM's TensorFlow evaluator they differ
slightly (its graph resizes images its own way), as pytorch-fid's do.

Weights: `load_inception(path)` reads pytorch-fid's `.pth` (needs torch) or an
`.npz` with the same key names; convert once with

  python -m pixel_vit.models.inception --convert pt_inception-2015-12-05-6726825d.pth OUT.npz

Parameters are not annotated with logical axes: this is a frozen 24M
parameter evaluation network, always replicated.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
NUM_LOGITS = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM's sFID: the first 7 channels of mixed_6/conv
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE
BN_EPSILON = 1e-3  # torchvision's BasicConv2d (TF's batch norm epsilon)
# FID depends on the network's exact numbers; full float32 matmuls on every
# backend (TPU's default would round conv inputs to bfloat16).
PRECISION = jax.lax.Precision.HIGHEST


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nnx.Module):
  """Conv (no bias) + BatchNorm (running statistics, eps 1e-3) + ReLU."""

  def __init__(
    self, in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=0, rngs: nnx.Rngs
  ):
    pad_h, pad_w = _pair(padding)
    self.conv = nnx.Conv(
      in_channels,
      out_channels,
      _pair(kernel_size),
      strides=_pair(stride),
      padding=((pad_h, pad_h), (pad_w, pad_w)),
      use_bias=False,
      precision=PRECISION,
      rngs=rngs,
    )
    self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=BN_EPSILON, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
  """3x3, stride 1, padding 1, averaging over the real pixels only (TF's
  pooling; torch's `count_include_pad=False`)."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x, stride: int = 1):
  padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class FIDInceptionA(nnx.Module):
  """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and pool branches (35x35)."""

  def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate(
      [
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool_3x3(x)),
      ],
      axis=-1,
    )


class InceptionB(nnx.Module):
  """Mixed_6a: 35x35 -> 17x17 (strided 3x3, double 3x3, max pool)."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate(
      [
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        max_pool_3x3(x, stride=2),
      ],
      axis=-1,
    )


class FIDInceptionC(nnx.Module):
  """Mixed_6b-6e: factorised 7x7 branches (17x17)."""

  def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

  def branches(self, x) -> list[jax.Array]:
    """The four branch outputs (the first is sFID's `mixed_6/conv` in Mixed_6d)."""
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    dbl = self.branch7x7dbl_1(x)
    for layer in (
      self.branch7x7dbl_2,
      self.branch7x7dbl_3,
      self.branch7x7dbl_4,
      self.branch7x7dbl_5,
    ):
      dbl = layer(dbl)
    return [self.branch1x1(x), b7, dbl, self.branch_pool(avg_pool_3x3(x))]

  def __call__(self, x):
    return jnp.concatenate(self.branches(x), axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a: 17x17 -> 8x8."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate(
      [self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool_3x3(x, stride=2)], axis=-1
    )


class _InceptionE(nnx.Module):
  """Mixed_7b/7c (8x8): expanded 1x3 / 3x1 branches; the pool differs."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

  def pool(self, x):
    raise NotImplementedError

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    return jnp.concatenate(
      [
        self.branch1x1(x),
        self.branch3x3_2a(b3),
        self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(dbl),
        self.branch3x3dbl_3b(dbl),
        self.branch_pool(self.pool(x)),
      ],
      axis=-1,
    )


class FIDInceptionE_1(_InceptionE):  # noqa: N801  (pytorch-fid's name)
  """Mixed_7b: average pool without counting padding."""

  def pool(self, x):
    return avg_pool_3x3(x)


class FIDInceptionE_2(_InceptionE):  # noqa: N801  (pytorch-fid's name)
  """Mixed_7c: max pool (a quirk of the TF graph that FID is defined with)."""

  def pool(self, x):
    return max_pool_3x3(x)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """[B, H, W, 1 or 3] in [0, 1] -> [B, size, size, 3] in [-1, 1], as pytorch-fid."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
      f"Inception takes images [B, H, W, C] with C = 1 or 3, got shape {tuple(images.shape)}."
    )
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear", antialias=False)
  return 2.0 * x - 1.0


class FIDInceptionV3(nnx.Module):
  """pytorch-fid's FID Inception-v3; attribute names are torch's module names,
  so a state-dict key maps to a parameter path directly."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = FIDInceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = FIDInceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = FIDInceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = FIDInceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = FIDInceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = FIDInceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = FIDInceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = FIDInceptionE_1(1280, rngs=rngs)
    self.Mixed_7c = FIDInceptionE_2(2048, rngs=rngs)
    self.fc = nnx.Linear(POOL_DIM, NUM_LOGITS, precision=PRECISION, rngs=rngs)

  def __call__(self, images) -> dict[str, jax.Array]:
    x = preprocess(images)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147x147x64
    x = max_pool_3x3(x, stride=2)  # 73x73
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71x71x192
    x = max_pool_3x3(x, stride=2)  # 35x35
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # 35x35x288
    x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # 17x17x768
    branches = self.Mixed_6d.branches(x)
    spatial = branches[0][..., :SPATIAL_CHANNELS]  # mixed_6/conv, see the module doc
    x = self.Mixed_6e(jnp.concatenate(branches, axis=-1))
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # 8x8x2048
    pool = x.mean(axis=(1, 2))
    return {"pool": pool, "logits": self.fc(pool), "spatial": spatial.reshape(spatial.shape[0], -1)}


# ---------------------------------------------------------------- torch state dicts

# (module, leaf) of an NNX parameter path -> the torch state-dict leaf name.
_TORCH_NAMES = {
  ("conv", "kernel"): "conv.weight",
  ("bn", "scale"): "bn.weight",
  ("bn", "bias"): "bn.bias",
  ("bn", "mean"): "bn.running_mean",
  ("bn", "var"): "bn.running_var",
  ("fc", "kernel"): "fc.weight",
  ("fc", "bias"): "fc.bias",
}
# Axis orders between NNX and torch layouts: conv HWIO <-> OIHW, linear [in, out] <-> [out, in].
_TO_TORCH_AXES = {"conv.weight": (3, 2, 0, 1), "fc.weight": (1, 0)}
_FROM_TORCH_AXES = {"conv.weight": (2, 3, 1, 0), "fc.weight": (1, 0)}
# BatchNorm's step counter: in newer torch state dicts, not a weight.
IGNORED_SUFFIX = ".num_batches_tracked"


def _torch_key(path) -> tuple[str, str]:
  """NNX parameter path -> (torch key, torch leaf name such as 'conv.weight')."""
  *parents, module, leaf = (str(getattr(p, "key", p)) for p in path)
  if (module, leaf) not in _TORCH_NAMES:
    raise ValueError(f"parameter {'/'.join(parents + [module, leaf])} has no torch counterpart.")
  name = _TORCH_NAMES[(module, leaf)]
  return ".".join(parents + [name]), name


def torch_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """{torch state-dict key: torch shape} of a (possibly abstract) module."""
  shapes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(module))):
    key, name = _torch_key(path)
    axes = _TO_TORCH_AXES.get(name, tuple(range(len(leaf.shape))))
    shapes[key] = tuple(leaf.shape[a] for a in axes)
  return shapes


def check_state_dict(expected: dict[str, tuple], state_dict: dict, where: str) -> None:
  """ValueError naming every missing, unexpected and wrong-shape key."""
  given = {k: tuple(np.shape(v)) for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIX)}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  wrong = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
  problems = []
  if missing:
    problems.append(f"missing keys {missing}")
  if unexpected:
    problems.append(f"unexpected keys {unexpected}")
  if wrong:
    problems.append(
      "wrong shapes " + ", ".join(f"{k}: {given[k]} (expected {expected[k]})" for k in wrong)
    )
  if problems:
    raise ValueError(
      f"{where} does not hold the FID Inception-v3 weights: "
      + "; ".join(problems)
      + ". Use pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its conversion with "
      "python -m pixel_vit.models.inception --convert IN.pth OUT.npz."
    )


def from_state_dict(
  make_module: Callable[[], nnx.Module], state_dict: dict, *, where: str = "the state dict"
) -> nnx.Module:
  """Builds `make_module()`'s structure (shapes only) and fills it from a torch
  state dict {key: array}; raises ValueError naming bad keys."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make_module))
  check_state_dict(torch_shapes(nnx.merge(graphdef, abstract)), state_dict, where)

  def load(path, leaf):
    key, name = _torch_key(path)
    array = np.asarray(state_dict[key], np.float32)
    if name in _FROM_TORCH_AXES:
      array = np.transpose(array, _FROM_TORCH_AXES[name])
    return jnp.asarray(np.ascontiguousarray(array), leaf.dtype)

  pure = jax.tree_util.tree_map_with_path(load, nnx.to_pure_dict(abstract))
  nnx.replace_by_pure_dict(abstract, pure)
  return nnx.merge(graphdef, abstract)


def _import_torch():
  try:
    import torch  # noqa: PLC0415  (optional dependency, only for .pth files)
  except ImportError as e:
    raise ImportError(
      "reading a PyTorch .pth checkpoint needs torch (pip install torch). Without it, "
      "convert the file once where torch is installed: python -m "
      "pixel_vit.models.inception --convert IN.pth OUT.npz, and load the .npz."
    ) from e
  return torch


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: float32 array} from a torch `.pth` state dict or an `.npz` of the same keys."""
  if not os.path.exists(path):
    raise ValueError(
      f"Inception weights {path!r} do not exist. Download pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid releases) "
      "and pass its path, or a .npz converted from it."
    )
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  torch = _import_torch()
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict.")
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def load_inception(path: str) -> FIDInceptionV3:
  """The FID Inception-v3 with pytorch-fid's weights from `path` (.pth or .npz)."""
  return from_state_dict(
    lambda: FIDInceptionV3(rngs=nnx.Rngs(0)), read_state_dict(path), where=repr(path)
  )


def convert(torch_path: str, npz_path: str) -> None:
  """Writes the checked `.pth` weights as an `.npz` (same keys, torch layouts)."""
  state_dict = read_state_dict(torch_path)
  expected = torch_shapes(nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0))))
  check_state_dict(expected, state_dict, repr(torch_path))
  os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
  np.savez(npz_path, **{k: np.asarray(state_dict[k], np.float32) for k in expected})


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m pixel_vit.models.inception",
    description="Convert pytorch-fid's Inception weights (.pth) to .npz (no torch needed "
    "to read it).",
  )
  parser.add_argument("--convert", nargs=2, metavar=("IN.pth", "OUT.npz"), required=True)
  args = parser.parse_args(argv)
  convert(*args.convert)
  print(f"wrote {args.convert[1]}")


if __name__ == "__main__":
  main(sys.argv[1:])
