r"""Same-run peer benchmark: the project's real train step against PyTorch's.

For each workload one fresh process builds two sides and times them
interleaved: for `--rounds` rounds, `--steps` steps of pixel_vit, then
`--steps` steps of the peer. The table shows each side's median step.

- pixel_vit: the trainer's own step, built by `throughput.build_train_step`
  from the task's config (configs/cls_pixel.py, mae_pixel.py, dit_pixel.py)
  with only the variant, image size, batch, dtype and the flags given
  overridden (on-device augmentation, drop-path, AdamW + clipping, remat and
  scan as in training).
- torch (classification workloads): an equivalent PyTorch ViT written here,
  because timm imports torchvision, which does not load against the CPU
  torch wheel. Linear patch embedding over flattened patches, [CLS], learned
  position embedding, pre-LN blocks (fused qkv Linear,
  `F.scaled_dot_product_attention`, GELU(tanh) MLP), final LayerNorm, linear
  head; widths / depths / heads / mlp_dim from `vit.SIZES`. Same optimizer
  as the config: AdamW (lr, betas, weight decay on the matmul kernels only),
  global-norm clipping, float32 parameters; `--dtype=bfloat16` is
  `torch.autocast('cpu', torch.bfloat16)` against `model.dtype='bfloat16'`.
- pixel_vit's classification step (MAE and DiT workloads): the MAE or DiT
  step against the classification step of the same variant and shapes; no
  torch needed for those.

  python -m benchmarks.peer --variant=Ti/1 --image_size=32 --batch=32 \
      [--dtype=float32|bfloat16] [--steps=N] [--rounds=R]
  python -m benchmarks.peer --task=mae --variant=Ti/1
  python -m benchmarks.peer --suite [--json_out=peer.json]

benchmarks/README.md explains the columns and what was chosen where.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

from benchmarks import throughput
from benchmarks.throughput import REPO_ROOT, RESULT_MARK, _progress
from pixel_vit.models import vit

TORCH_HINT = (
  "the PyTorch peer needs torch, which is optional: install the CPU build "
  "with `pip install torch==2.13.0` (never unpinned: the default pulls CUDA), "
  "or the `parity` extra after it (`pip install -e '.[parity]'`)"
)

# The tasks' configs. DiT's default data are ImageNet latents (files this
# benchmark does not need): its pixel-space setting names a pixel source.
CONFIG_FILES = {
  "classification": "cls_pixel.py",
  "mae": "mae_pixel.py",
  "diffusion": "dit_pixel.py:dataset=cifar10",
}
TASK_NAMES = {"classification": "classification", "mae": "MAE", "diffusion": "DiT"}

# --suite: the rows. Per-row steps keep the slow Ti/1 steps (15-45 s)
# to one a round; --steps / --rounds / --warmup on the command line win.
SUITE = (
  dict(name="PiT-Ti/1", variant="Ti/1", image_size=32, batch=32, steps=1),
  dict(name="ViT-Ti/2", variant="Ti/2", image_size=32, batch=32),
  dict(name="mu/1", variant="mu/1", image_size=16, batch=128, channels=1, num_classes=10, steps=5),
  dict(name="mu/2", variant="mu/2", image_size=16, batch=128, channels=1, num_classes=10, steps=5),
  dict(name="mu/4", variant="mu/4", image_size=16, batch=128, channels=1, num_classes=10, steps=5),
  # bfloat16: on a CPU without bf16 instructions torch's autocast step is ~8x
  # its float32 step (Ti/1: minutes), so these rows time fewer steps.
  dict(
    name="PiT-Ti/1",
    variant="Ti/1",
    image_size=32,
    batch=32,
    dtype="bfloat16",
    steps=1,
    rounds=2,
    warmup=0,
  ),
  dict(
    name="ViT-Ti/2",
    variant="Ti/2",
    image_size=32,
    batch=32,
    dtype="bfloat16",
    steps=1,
    rounds=2,
    warmup=0,
  ),
  # MAE at 75% masking (the config's ratio) against the classification step.
  dict(name="MAE PiT-Ti/1", task="mae", variant="Ti/1", image_size=32, batch=32, steps=1),
  # The DiT of configs/dit_pixel.py:quick (mu/1), at the mu rows' shapes.
  dict(
    name="DiT mu/1",
    task="diffusion",
    variant="mu/1",
    image_size=16,
    batch=128,
    channels=1,
    num_classes=10,
    steps=5,
  ),
)
DEFAULTS = dict(
  task="classification", channels=3, num_classes=100, dtype="float32", steps=2, rounds=3, warmup=1
)


# ---------------------------------------------------------------------------
# The machine.
# ---------------------------------------------------------------------------


def cpu_info() -> dict:
  """CPU model and whether it has bf16 instructions (AVX512-BF16 or AMX-BF16)."""
  model, flags = "unknown", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
          model = value.strip()
        elif key == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
  return dict(
    model=model,
    cpus=os.cpu_count(),
    flags=vector,
    bf16_instructions=bool({"avx512_bf16", "amx_bf16"} & flags),
  )


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------
# The PyTorch ViT (timm's VisionTransformer does not import here).
# ---------------------------------------------------------------------------


def torch_vit(
  variant: str,
  *,
  image_size: int,
  channels: int,
  num_classes: int,
  pool: str = "cls",
  posemb: str = "learn",
  drop_path: float = 0.0,
):
  """pixel_vit's classifier (`vit.build_classifier`) in PyTorch, eager.

  Same parameters (shapes and count) and matmuls: patch embedding as a Linear
  over [B, N, p*p*C] flattened patches (pixel_vit's `patchify` order), [CLS]
  prepended after the position embedding (which covers the patches only),
  pre-LN blocks (LayerNorm eps 1e-6; fused qkv Linear; SDPA; output Linear;
  MLP Linear-GELU(tanh)-Linear, as `jax.nn.gelu`), stochastic depth with
  rates linspace(0, drop_path, depth), final LayerNorm, `cls` or `gap`
  pooling, zero-initialised head. Input: [B, H, W, C] float images.
  """
  import torch
  from torch import nn
  from torch.nn import functional as F

  size, patch = vit.parse_variant(variant)
  width, heads = size.width, size.heads
  if image_size % patch:
    raise ValueError(f"patch size {patch} does not divide image size {image_size}.")
  grid = image_size // patch

  def dropped(x, rate, training):
    if not training or rate == 0.0:
      return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)

  class Block(nn.Module):
    def __init__(self, rate: float):
      super().__init__()
      self.rate = rate
      self.norm1 = nn.LayerNorm(width, eps=1e-6)
      self.qkv = nn.Linear(width, 3 * width)
      self.proj = nn.Linear(width, width)
      self.norm2 = nn.LayerNorm(width, eps=1e-6)
      self.fc1 = nn.Linear(width, size.mlp_dim)
      self.fc2 = nn.Linear(size.mlp_dim, width)

    def forward(self, x):
      b, n, d = x.shape
      qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
      q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim] each, as timm's Attention
      y = F.scaled_dot_product_attention(q, k, v)
      y = self.proj(y.transpose(1, 2).reshape(b, n, d))
      x = x + dropped(y, self.rate, self.training)
      y = self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
      return x + dropped(y, self.rate, self.training)

  class ViT(nn.Module):
    def __init__(self):
      super().__init__()
      self.tokenizer = nn.Linear(patch * patch * channels, width)
      if posemb == "learn":
        self.posemb = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
      else:
        table = (
          vit.sincos2d_posemb(grid, grid, width)
          if posemb == "sincos2d"
          else torch.zeros(1, grid * grid, width)
        )
        self.register_buffer("posemb", torch.as_tensor(table), persistent=False)
      self.cls = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
      rates = torch.linspace(0.0, drop_path, size.depth).tolist()
      self.blocks = nn.ModuleList(Block(rate) for rate in rates)
      self.norm = nn.LayerNorm(width, eps=1e-6)
      self.head = nn.Linear(width, num_classes)
      nn.init.zeros_(self.head.weight)
      nn.init.zeros_(self.head.bias)

    def forward(self, images):
      b, h, w, c = images.shape
      x = images.reshape(b, h // patch, patch, w // patch, patch, c).permute(0, 1, 3, 2, 4, 5)
      x = self.tokenizer(x.reshape(b, grid * grid, patch * patch * c)) + self.posemb
      if self.cls is not None:
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
      for block in self.blocks:
        x = block(x)
      x = self.norm(x)
      return self.head(x[:, 0] if self.cls is not None else x.mean(dim=1))

  return ViT()


def torch_adamw(model, opt):
  """`optimizer.make_optimizer`'s AdamW in PyTorch: weight decay on the
  matmul kernels (Linear weights) only, as `optimizer.decay_mask`; the
  fused CPU kernel when this torch has it, else `foreach`."""
  import torch

  decay, no_decay = [], []
  for module in model.modules():
    for name, p in module.named_parameters(recurse=False):
      (decay if isinstance(module, torch.nn.Linear) and name == "weight" else no_decay).append(p)
  groups = [
    dict(params=decay, weight_decay=opt.weight_decay),
    dict(params=no_decay, weight_decay=0.0),
  ]
  common = dict(lr=opt.lr, betas=(opt.b1, opt.b2), eps=1e-8)  # optax.adamw's eps
  try:
    return torch.optim.AdamW(groups, fused=True, **common), "AdamW(fused=True)"
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.AdamW(groups, foreach=True, **common), "AdamW(foreach=True)"


def torch_matmul_peak_gflops(size: int, repeats: int) -> float:
  """Best float32 `torch.mm` GFLOP/s of a size x size product (throughput's
  `matmul_peak_gflops`, with torch's BLAS)."""
  import torch

  a, b = torch.randn(size, size), torch.randn(size, size)
  torch.mm(a, b)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9


# ---------------------------------------------------------------------------
# The two sides of a workload. A side is a `step()` that returns when the
# step is done, plus what the table reports about it.
# ---------------------------------------------------------------------------


def _host_batch(w: dict) -> dict:
  import numpy as np

  rng = np.random.default_rng(0)
  size = w["image_size"]
  return {
    "images": rng.integers(0, 256, (w["batch"], size, size, w["channels"]), dtype=np.uint8),
    "labels": rng.integers(0, w["num_classes"], (w["batch"],), dtype=np.int32),
  }


def task_config(task: str, w: dict, args: argparse.Namespace):
  """The task's config file with this workload's overrides, validated as the trainer does."""
  config = throughput.benchmark_config(
    os.path.join(REPO_ROOT, "configs", CONFIG_FILES[task]),
    variant=w["variant"],
    batch=w["batch"],
    image_size=w["image_size"],
    model_overrides=dict(
      dtype=w["dtype"], remat=args.remat, scan=args.scan, attention=args.attention
    ),
    validate=trainer(task).validate,
  )
  if args.augment == "none":  # valid values: the trainer's check above still holds
    config.augment.update(
      dict(
        crop=False,
        flip=False,
        randaugment_ops=0,
        erase_prob=0.0,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        label_smoothing=0.0,
      )
    )
  return config


def trainer(task: str):
  from pixel_vit.trainers import classification, diffusion, mae

  return {"classification": classification, "mae": mae, "diffusion": diffusion}[task]


def jax_side(task: str, w: dict, args: argparse.Namespace) -> types.SimpleNamespace:
  """The task's real train step (`throughput.build_train_step`), on a fixed
  random uint8 batch as the data pipeline hands it over."""
  import jax
  import numpy as np

  from pixel_vit import parallel
  from pixel_vit.models import mae as mae_model

  config = task_config(task, w, args)
  module = trainer(task)
  size = w["image_size"]
  # The trainers' own make_model_fn, on a stand-in for the data split.
  split = types.SimpleNamespace(
    images=np.zeros((0, size, size, w["channels"]), np.uint8), num_classes=w["num_classes"]
  )
  if task == "diffusion":
    make_step = lambda g, tx, s: module.make_train_step(config, g, tx, s)
  else:
    make_step = lambda g, tx, s: module.make_train_step(config, g, tx, s, w["num_classes"])
  _progress(f"pixel_vit {TASK_NAMES[task]}: building and compiling the step")
  built = throughput.build_train_step(
    config, module.make_model_fn(config, split), make_step, _host_batch(w)
  )
  _progress(f"pixel_vit {TASK_NAMES[task]}: compiled in {built.lower_s + built.compile_s:.1f}s")
  box = {"state": built.state, "metrics": None}

  def step():
    with parallel.activate(built.mesh, built.rules):
      state, metrics = built.compiled(box["state"], built.batch)
      jax.block_until_ready((state, metrics))
    box["state"], box["metrics"] = state, metrics

  def loss():
    return float(jax.device_get(box["metrics"]["train/loss"]))

  _, patch = vit.parse_variant(w["variant"])
  patches = (size // patch) ** 2
  flops = None
  remat = config.model.remat
  if task == "classification":
    remat = throughput.resolved_remat(config, size, w["batch"])
    flops = throughput.analytic_flops(
      w["variant"],
      size,
      w["channels"],
      w["num_classes"],
      cls_token=config.model.pool == "cls",
      remat=remat,
    )
    tokens = str(flops["tokens"])
  elif task == "mae":
    tokens = (
      f"{patches + 1} ({mae_model.num_visible(patches, config.mask_ratio) + 1} in "
      f"the encoder at mask ratio {config.mask_ratio:g})"
    )
  else:
    tokens = str(patches)
  model = config.model
  setting = (
    f"remat={throughput.remat_label(config, remat)}, scan={str(model.scan).lower()}, "
    f"attention={model.attention}, augment={args.augment}"
  )
  return types.SimpleNamespace(
    name="pixel_vit" if task == "classification" else f"pixel_vit {TASK_NAMES[task]}",
    task=task,
    step=step,
    loss=loss,
    flops=flops,
    tokens=tokens,
    setting=setting,
    params=built.num_params,
    compile_s=built.lower_s + built.compile_s,
    hlo_text=built.compiled.as_text,
  )


def torch_side(w: dict, args: argparse.Namespace) -> types.SimpleNamespace:
  """The PyTorch ViT's train step on the same images, normalised as the
  config does (no augmentation: the step is the model, loss and optimizer),
  with label-smoothed soft targets as the config's loss sees them."""
  import contextlib

  import numpy as np
  import torch
  from torch.nn import functional as F

  config = task_config("classification", w, args)
  torch.manual_seed(config.seed)
  model = torch_vit(
    w["variant"],
    image_size=w["image_size"],
    channels=w["channels"],
    num_classes=w["num_classes"],
    pool=config.model.pool,
    posemb=config.model.posemb,
    drop_path=config.model.drop_path,
  )
  model.train()
  opt = config.optimizer
  optimizer, optimizer_name = torch_adamw(model, opt)
  params = [p for p in model.parameters() if p.requires_grad]
  ema = [p.detach().clone() for p in params] if opt.ema_decay > 0 else None
  host = _host_batch(w)
  mean = torch.tensor(config.augment.mean, dtype=torch.float32)
  std = torch.tensor(config.augment.std, dtype=torch.float32)
  images = (torch.from_numpy(host["images"]).float() / 255.0 - mean) / std
  smoothing = config.augment.label_smoothing
  targets = F.one_hot(torch.from_numpy(host["labels"]).long(), w["num_classes"]).float()
  targets = targets * (1.0 - smoothing) + smoothing / w["num_classes"]
  bf16 = w["dtype"] == "bfloat16"
  box = {"loss": None}

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
      logits = model(images)
    loss = F.cross_entropy(logits.float(), targets)
    loss.backward()
    if opt.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, opt.grad_clip)
    optimizer.step()
    if ema is not None:
      with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - opt.ema_decay)
    box["loss"] = loss.detach()

  def loss():
    return float(box["loss"])

  n_params = sum(int(np.prod(p.shape)) for p in params)
  setting = (
    f"eager, {optimizer_name}, clip {opt.grad_clip:g}, "
    f"{'autocast bfloat16' if bf16 else 'float32'}, "
    f"{torch.get_num_threads()} threads"
  )
  flops = throughput.analytic_flops(
    w["variant"],
    w["image_size"],
    w["channels"],
    w["num_classes"],
    cls_token=config.model.pool == "cls",
  )
  return types.SimpleNamespace(
    name="torch",
    task="classification",
    step=step,
    loss=loss,
    flops=flops,
    tokens=str(flops["tokens"]),
    setting=setting,
    params=n_params,
    compile_s=None,
  )


# ---------------------------------------------------------------------------
# The child: one workload, both sides, interleaved.
# ---------------------------------------------------------------------------


def run_workload(w: dict, args: argparse.Namespace) -> dict:
  t_start = time.perf_counter()
  peer_is_torch = w["task"] == "classification"
  if peer_is_torch:
    import torch

    # Both sides live in this process: they run one after the other and every
    # step returns only when it is done, so at most one thread pool works at
    # a time; torch's OpenMP pool gets every core, as XLA's does.
    torch.set_num_threads(args.torch_threads or os.cpu_count())
  _progress("importing jax and the trainers")
  import jax

  sides = [jax_side(w["task"], w, args)]
  sides.append(torch_side(w, args) if peer_is_torch else jax_side("classification", w, args))
  for side in sides:
    for i in range(w["warmup"]):
      t = time.perf_counter()
      side.step()
      _progress(f"{side.name}: warmup step {i + 1}/{w['warmup']} {time.perf_counter() - t:.2f}s")
  times = {side.name: [] for side in sides}
  rounds = {side.name: [] for side in sides}
  busy = {side.name: [0.0, 0.0] for side in sides}  # cpu seconds, wall seconds
  for r in range(w["rounds"]):
    for side in sides:
      wall, cpu = time.perf_counter(), _cpu_seconds()
      these = []
      for _ in range(w["steps"]):
        t = time.perf_counter()
        side.step()
        these.append(time.perf_counter() - t)
      busy[side.name][0] += _cpu_seconds() - cpu
      busy[side.name][1] += time.perf_counter() - wall
      times[side.name] += these
      rounds[side.name].append(statistics.median(these))
      _progress(
        f"round {r + 1}/{w['rounds']} {side.name}: {w['steps']} step(s), median "
        f"{statistics.median(these):.3f}s"
      )
  _progress(f"measuring the float32 matmul peak ({args.matmul_size}^2, jax)")
  jax_peak = throughput.matmul_peak_gflops(args.matmul_size, args.matmul_repeats)
  torch_peak = (
    torch_matmul_peak_gflops(args.matmul_size, args.matmul_repeats) if peer_is_torch else None
  )
  peak = max(jax_peak, torch_peak or 0.0)  # the machine's: the better library's
  results = []
  for side in sides:
    loss = side.loss()
    if loss != loss or abs(loss) == float("inf"):
      raise FloatingPointError(f"{side.name}: train loss is {loss}")
    step_s = statistics.median(times[side.name])
    achieved = None if side.flops is None else side.flops["train"] * w["batch"] / step_s / 1e9
    results.append(
      dict(
        name=side.name,
        task=side.task,
        setting=side.setting,
        tokens=side.tokens,
        params=side.params,
        compile_s=side.compile_s,
        step_times_s=times[side.name],
        round_medians_s=rounds[side.name],
        step_s=step_s,
        images_per_s=w["batch"] / step_s,
        train_gflop_per_image=None if side.flops is None else side.flops["train"] / 1e9,
        achieved_gflops=achieved,
        peak_fraction=None if achieved is None else achieved / peak,
        cpu_cores_busy=busy[side.name][0] / busy[side.name][1],
        loss=loss,
      )
    )
  versions = dict(jax=jax.__version__)
  if peer_is_torch:
    versions["torch"] = torch.__version__
  # ratio: the peer's median step / pixel_vit's (the first side's): pixel_vit /
  # torch in throughput, or classification step / task step for MAE and DiT.
  ratio = results[1]["step_s"] / results[0]["step_s"]
  named = (
    {"pixel_vit_over_torch": ratio}
    if peer_is_torch
    else {"task_step_over_classification_step": 1.0 / ratio}
  )
  return dict(
    workload=w,
    sides=results,
    ratio=ratio,
    **named,
    matmul_peak_gflops=peak,
    jax_matmul_peak_gflops=jax_peak,
    torch_matmul_peak_gflops=torch_peak,
    versions=versions,
    wall_s=time.perf_counter() - t_start,
  )


def child_main(args: argparse.Namespace) -> int:
  try:
    result = run_workload(json.loads(args._workload), args)
  except BaseException as e:  # noqa: BLE001 - reported as an error row
    message = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
    if "RESOURCE_EXHAUSTED" in message or isinstance(e, MemoryError):
      message = "out of memory: " + message
    print(RESULT_MARK + json.dumps(dict(error=message)), flush=True)
    raise
  print(RESULT_MARK + json.dumps(result), flush=True)
  return 0


# ---------------------------------------------------------------------------
# The parent: a fresh process per workload, the tables.
# ---------------------------------------------------------------------------


def run_in_child(w: dict, args: argparse.Namespace, label: str) -> dict:
  """One workload in a fresh process (both sides in it): failures, memory and
  allocator state stay with their workload. Progress goes straight to stderr."""
  argv = [
    sys.executable,
    "-m",
    "benchmarks.peer",
    "--_child",
    f"--_workload={json.dumps(w)}",
    f"--matmul_size={args.matmul_size}",
    f"--matmul_repeats={args.matmul_repeats}",
    f"--augment={args.augment}",
  ]
  for key in ("remat", "scan", "attention", "torch_threads"):
    if getattr(args, key) is not None:
      value = getattr(args, key)
      argv.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
  print(f"{label} {describe(w)}", file=sys.stderr, flush=True)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  start = time.perf_counter()
  try:
    proc = subprocess.run(
      argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True, timeout=args.timeout
    )
    stdout, code = proc.stdout, proc.returncode
  except subprocess.TimeoutExpired as e:  # subprocess.run has killed the child
    stdout, code = e.stdout or "", None
    if isinstance(stdout, bytes):
      stdout = stdout.decode(errors="replace")
  result = None
  for line in stdout.splitlines():
    if line.startswith(RESULT_MARK):
      result = json.loads(line[len(RESULT_MARK) :])
  if code is None:
    result = dict(error=f"timeout: still running after {args.timeout:.0f}s (--timeout); killed")
  elif result is None:
    result = dict(error=f"exit code {code} without a result (see the output above)")
  result.setdefault("workload", w)
  result["child_wall_s"] = time.perf_counter() - start
  elapsed = f"{result['child_wall_s']:.0f}s"
  if "error" in result:
    print(f"  FAILED after {elapsed}: {result['error']}", file=sys.stderr, flush=True)
  else:
    a, b = result["sides"]
    print(
      f"  done in {elapsed}: {a['name']} {a['images_per_s']:.3g} img/s, {b['name']} "
      f"{b['images_per_s']:.3g} img/s",
      file=sys.stderr,
      flush=True,
    )
  return result


def describe(w: dict) -> str:
  size = w["image_size"]
  return (
    f"{w['name']} ({TASK_NAMES[w['task']]}) {size}x{size}x{w['channels']} batch "
    f"{w['batch']} {w['dtype']}, {w['rounds']} round(s) of {w['steps']} step(s)"
  )


def _pct(value) -> str:
  return "—" if value is None else f"{100 * value:.1f}%"


def _step(side: dict) -> str:
  return f"{side['step_s']:.3f} ({len(side['step_times_s'])})"


def _dtype_cell(dtype: str, cpu: dict) -> str:
  if dtype == "bfloat16" and not cpu["bf16_instructions"]:
    return "bfloat16 (no bf16 instructions on this CPU)"
  return dtype


def _table(header: list[str], results: list[dict], cpu: dict, measured) -> str:
  """A markdown table: `measured(r, a, b)` gives the cells after workload,
  dtype, tokens and batch of a row that ran; a failed row shows its error."""
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in results:
    w = r["workload"]
    if "error" in r:
      cells = [w["name"], _dtype_cell(w["dtype"], cpu), "—", str(w["batch"])]
      cells += ["—"] * (len(header) - 5) + [r["error"].replace("|", "/")]
    else:
      a, b = r["sides"]
      cells = [
        w["name"],
        _dtype_cell(w["dtype"], cpu),
        a["tokens"],
        str(w["batch"]),
        *measured(r, a, b),
        "",
      ]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def _cores(a: dict, b: dict, cpu: dict) -> str:
  return f"{a['cpu_cores_busy']:.2f} / {b['cpu_cores_busy']:.2f} of {cpu['cpus']}"


def torch_table(results: list[dict], cpu: dict) -> str:
  header = [
    "workload",
    "dtype",
    "tokens",
    "batch",
    "pixel_vit img/s",
    "torch img/s",
    "ratio (pixel_vit / torch)",
    "pixel_vit % of peak",
    "torch % of peak",
    "matmul peak GFLOP/s",
    "step s pixel_vit (median, n)",
    "step s torch (median, n)",
    "CPU cores busy (pixel_vit / torch)",
    "train GFLOP/img",
    "pixel_vit setting",
    "error",
  ]
  return _table(
    header,
    results,
    cpu,
    lambda r, a, b: [
      f"{a['images_per_s']:.3g}",
      f"{b['images_per_s']:.3g}",
      f"**{r['ratio']:.2f}x**",
      _pct(a["peak_fraction"]),
      _pct(b["peak_fraction"]),
      f"{r['matmul_peak_gflops']:.0f}",
      _step(a),
      _step(b),
      _cores(a, b, cpu),
      f"{a['train_gflop_per_image']:.2f}",
      a["setting"],
    ],
  )


def task_table(results: list[dict], cpu: dict) -> str:
  header = [
    "workload",
    "dtype",
    "tokens",
    "batch",
    "step s (median, n)",
    "classification step s (median, n)",
    "step-time ratio (task / classification)",
    "img/s",
    "classification img/s",
    "classification % of peak",
    "matmul peak GFLOP/s",
    "CPU cores busy (task / classification)",
    "setting",
    "error",
  ]
  return _table(
    header,
    results,
    cpu,
    lambda r, a, b: [
      _step(a),
      _step(b),
      f"**{1 / r['ratio']:.2f}**",
      f"{a['images_per_s']:.3g}",
      f"{b['images_per_s']:.3g}",
      _pct(b["peak_fraction"]),
      f"{r['matmul_peak_gflops']:.0f}",
      _cores(a, b, cpu),
      a["setting"],
    ],
  )


# ---------------------------------------------------------------------------
# Flags and main.
# ---------------------------------------------------------------------------


def parse_flags(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.peer",
    description="pixel_vit's real train step against a PyTorch ViT's (or MAE / DiT against "
    "classification), interleaved in one process per workload.",
  )
  p.add_argument(
    "--task",
    default=None,
    choices=tuple(CONFIG_FILES),
    help="classification (peer: torch) | mae | diffusion (peer: pixel_vit's "
    "classification step of the same variant)",
  )
  p.add_argument("--variant", default="Ti/1", help="SIZE/PATCH, e.g. Ti/1 (pixels), Ti/2")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--batch", type=int, default=32, help="global batch size")
  p.add_argument("--channels", type=int, default=None, help="default 3")
  p.add_argument("--num_classes", type=int, default=None, help="default 100")
  p.add_argument(
    "--dtype",
    default=None,
    choices=("float32", "bfloat16"),
    help="pixel_vit model.dtype / torch autocast; default float32",
  )
  p.add_argument(
    "--steps",
    type=int,
    default=None,
    help="timed steps per side per round (default 2; suite rows set their own)",
  )
  p.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
  p.add_argument(
    "--warmup", type=int, default=None, help="untimed steps per side after compiling (default 1)"
  )
  p.add_argument(
    "--remat", default=None, choices=vit.REMAT_CHOICES, help="pixel_vit; default: the config's"
  )
  p.add_argument(
    "--scan",
    type=throughput._bool,
    default=None,
    help="pixel_vit, true|false; default: the config's",
  )
  p.add_argument("--attention", default=None, help="pixel_vit backend; default: the config's")
  p.add_argument(
    "--augment",
    default="config",
    choices=("config", "none"),
    help="pixel_vit's on-device augmentation: the config's recipe (the real "
    "step) or none (crop, flip, RandAugment, erasing, mixup/cutmix and "
    "label smoothing off), to see what it costs",
  )
  p.add_argument("--torch_threads", type=int, default=None, help="default: os.cpu_count()")
  p.add_argument("--suite", action="store_true", help="run the issue's rows (SUITE)")
  p.add_argument("--matmul_size", type=int, default=2048)
  p.add_argument("--matmul_repeats", type=int, default=20)
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per workload")
  p.add_argument("--json_out", default=None, help="also write the results as JSON here")
  p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--_workload", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for name in (
    "image_size",
    "batch",
    "channels",
    "num_classes",
    "steps",
    "rounds",
    "matmul_size",
    "matmul_repeats",
    "torch_threads",
  ):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  if args.warmup is not None and args.warmup < 0:
    p.error(f"--warmup={args.warmup} must be >= 0")
  return args


def workloads(args: argparse.Namespace) -> list[dict]:
  """The rows to run, every field filled in. With --suite, --task and --dtype
  pick the suite's rows of that task / dtype (`--suite --dtype=float32` skips
  the bfloat16 rows) and --steps / --rounds / --warmup replace the rows' own;
  otherwise the flags describe the one row."""
  if args.suite:
    rows = [dict(DEFAULTS, **row) for row in SUITE]
    rows = [
      row for row in rows if args.task in (None, row["task"]) and args.dtype in (None, row["dtype"])
    ]
    overrides = ("steps", "rounds", "warmup")
  else:
    task = args.task or "classification"
    name = args.variant if task == "classification" else f"{TASK_NAMES[task]} {args.variant}"
    rows = [
      dict(
        DEFAULTS,
        name=name,
        task=task,
        variant=args.variant,
        image_size=args.image_size,
        batch=args.batch,
      )
    ]
    overrides = ("channels", "num_classes", "dtype", "steps", "rounds", "warmup")
  for row in rows:
    row.update({key: getattr(args, key) for key in overrides if getattr(args, key) is not None})
  return rows


def main(argv=None) -> int:
  args = parse_flags(argv)
  if args._child:
    return child_main(args)
  rows = workloads(args)
  if any(row["task"] == "classification" for row in rows):
    try:
      import torch  # noqa: F401 - only whether it imports
    except Exception as e:  # noqa: BLE001 - ImportError, or a wheel that does not load
      print(f"skipped (torch does not import: {type(e).__name__}): {TORCH_HINT}.")
      return 0
  cpu = cpu_info()
  load = os.getloadavg()
  print(
    f"{len(rows)} workload(s), each in a fresh process with both sides in it; "
    f"{cpu['model']}, {cpu['cpus']} CPUs, load average {load[0]:.2f}",
    file=sys.stderr,
    flush=True,
  )
  start = time.perf_counter()
  results = []
  for i, row in enumerate(rows):
    results.append(run_in_child(row, args, f"[{i + 1}/{len(rows)}]"))
    print(f"  total elapsed {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
  ok = [r for r in results if "error" not in r]
  versions = next(
    (r["versions"] for r in ok if "torch" in r["versions"]), ok[0]["versions"] if ok else {}
  )
  print()
  print(
    f"Peer benchmark, {datetime.date.today().isoformat()}: {cpu['model']}, {cpu['cpus']} "
    f"CPUs ({', '.join(cpu['flags']) or 'no AVX2'}"
    f"{'' if cpu['bf16_instructions'] else '; no bf16 instructions'})"
    + "".join(f", {k} {v}" for k, v in versions.items())
    + f"; load average at start {load[0]:.2f}; total {time.perf_counter() - start:.0f}s"
  )
  if ok:
    span = lambda values: (
      f"{min(values):.0f}"
      if round(min(values)) == round(max(values))
      else f"{min(values):.0f}-{max(values):.0f}"
    )
    torch_peaks = [r["torch_matmul_peak_gflops"] for r in ok if r["torch_matmul_peak_gflops"]]
    print(
      f"float32 matmul peak ({args.matmul_size}^2, best of {args.matmul_repeats}, measured "
      f"in each workload's process after its steps): jnp.matmul "
      f"{span([r['jax_matmul_peak_gflops'] for r in ok])} GFLOP/s"
      + (f", torch.mm {span(torch_peaks)}" if torch_peaks else "")
      + "; a row's % of peak is against the better of the two in its process"
    )
  peer_rows = [r for r in results if r["workload"]["task"] == "classification"]
  task_rows = [r for r in results if r["workload"]["task"] != "classification"]
  if peer_rows:
    print()
    print(
      "pixel_vit's classification train step against an equivalent PyTorch ViT (written "
      "in benchmarks/peer.py: timm does not import here), interleaved in one process; "
      "ratio > 1: pixel_vit is faster."
    )
    print()
    print(torch_table(peer_rows, cpu))
    torch_settings = {r["sides"][1]["setting"] for r in peer_rows if "error" not in r}
    if torch_settings:
      print()
      print("torch: " + "; ".join(sorted(torch_settings)))
  if task_rows:
    print()
    print(
      "MAE / DiT train steps against pixel_vit's classification step of the same variant "
      "and shapes, interleaved in one process; the MAE target is a ratio <= 0.35."
    )
    print()
    print(task_table(task_rows, cpu))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(dict(cpu=cpu, load_average=load[0], results=results), f, indent=2)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
