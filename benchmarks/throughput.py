r"""Throughput, FLOPs, MFU, compile time and peak memory of the REAL train step.

The step measured is the classification trainer's own: the config comes from
`configs/cls_pixel.py` (augmentation, AdamW + clipping, drop-path, remat and
scan exactly as in training, only the flags below overridden), the state is
built by `state_lib.sharded_state` on the config's mesh (`data=-1`: one data
axis over all devices), and `classification.make_train_step` is jitted with
the trainer's in/out shardings and state donation. Batches are random uint8
images, as the data pipeline hands them over (augmentation runs in the step).

Every measurement runs in a FRESH subprocess, so its peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`) is the memory that configuration needs;
XLA's `memory_analysis()` is shown beside it and underestimates CPU peak.

  python -m benchmarks.throughput --variant=Ti/1 --image_size=32 --batch=32 \
      --attention=chunked --remat=dots
  python -m benchmarks.throughput --variant=Ti/2 --remat=dots --scan=false --steps=10
  python -m benchmarks.throughput --sweep                 # the README table

Columns are explained in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import queue
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time

from pixel_vit.models import vit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_MARK = "BENCH_RESULT "
PROGRESS_MARK = "[bench] "
GIB = 1024**3

# The --sweep table: one dict of flags per row. The PiT-Ti/1 rows compare
# attention backends on the real train step at the paper's 32x32, then pixel
# tokens at 64x64 (4,096 tokens) and 128x128 (16,384, batch 1: must fit
# 24 GiB) with `chunked`. The whole sweep took 14 min on the 2-core CPU.
SWEEP = (
  dict(variant="Ti/1", image_size=32, batch=32, remat="full", scan=True, attention="xla"),
  dict(variant="Ti/1", image_size=32, batch=32, remat="dots", scan=True, attention="xla"),
  dict(variant="Ti/1", image_size=32, batch=32, remat="full", scan=True, attention="chunked"),
  dict(variant="Ti/1", image_size=32, batch=32, remat="dots", scan=True, attention="chunked"),
  dict(variant="Ti/1", image_size=64, batch=4, remat="full", scan=True, attention="xla"),
  dict(variant="Ti/1", image_size=64, batch=4, remat="dots", scan=True, attention="chunked"),
  # ~2 min a step: one untimed step would double the row's time.
  dict(
    variant="Ti/1",
    image_size=128,
    batch=1,
    remat="dots",
    scan=True,
    attention="chunked",
    warmup=0,
    steps=2,
    min_steps=2,
  ),
  dict(variant="Ti/2", image_size=32, batch=32, remat="full", scan=True, attention="xla"),
  dict(variant="mu/1", image_size=8, batch=128, remat="full", scan=True, attention="auto"),
)


# ---------------------------------------------------------------------------
# Analytic FLOPs (from the model size table; importing jax creates no backend).
# ---------------------------------------------------------------------------


def block_flops(size: vit.EncoderSize, tokens: int) -> dict:
  """Forward matmul FLOPs (2 per multiply-add) of one Transformer block on
  one example of `tokens` tokens."""
  width = size.width
  return {
    "qkv": 2 * tokens * width * 3 * width,
    "attn_scores": 2 * tokens * tokens * width,
    "attn_weighted_sum": 2 * tokens * tokens * width,
    "out_proj": 2 * tokens * width * width,
    "mlp": 2 * 2 * tokens * width * size.mlp_dim,
  }


def analytic_flops(
  variant: str,
  image_size: int,
  channels: int,
  num_classes: int,
  cls_token: bool = True,
  remat: str = "none",
) -> dict:
  """Matmul FLOPs (2 per multiply-add) of the classifier, per image.

  Forward: tokenizer, and per layer qkv projection, attention scores (QK^T),
  attention-weighted sum (AV), output projection, MLP (two matmuls); then the
  head. Train = 3 x forward (backward = 2 x forward), the usual "model FLOPs"
  convention that MFU is based on. `executed_train` adds what remat
  recomputes in the backward pass (full: every block's forward again; dots:
  the attention matmuls, whose outputs have batch dimensions and are not
  saved by `dots_with_no_batch_dims_saveable`). Elementwise work (softmax,
  LayerNorm, GELU, optimizer, augmentation) is not counted.
  """
  size, patch = vit.parse_variant(variant)
  patches = (image_size // patch) ** 2
  seq = patches + (1 if cls_token else 0)
  parts = {
    "tokenizer": 2 * patches * (patch * patch * channels) * size.width,
    **{name: size.depth * f for name, f in block_flops(size, seq).items()},
    "head": 2 * size.width * num_classes,
  }
  forward = sum(parts.values())
  block = forward - parts["tokenizer"] - parts["head"]
  recompute = {"none": 0, "full": block, "dots": parts["attn_scores"] + parts["attn_weighted_sum"]}[
    remat
  ]
  return dict(
    parts=parts,
    tokens=seq,
    forward=forward,
    train=3 * forward,
    executed_train=3 * forward + recompute,
  )


def remat_label(config, resolved: str) -> str:
  """How a result table shows the remat that ran: 'auto: dots' when `auto` chose it."""
  return resolved if resolved == config.model.remat else f"auto: {resolved}"


def resolved_remat(config, image_size: int, batch: int) -> str:
  """The classifier's remat policy, with `auto` resolved as its blocks will
  resolve it (`vit.auto_remat`) on this machine's devices and mesh."""
  if config.model.remat != "auto":
    return config.model.remat
  import jax

  from pixel_vit import parallel
  from pixel_vit.models import attention

  size, patch = vit.parse_variant(config.model.variant)
  tokens = (image_size // patch) ** 2 + (config.model.pool == "cls")
  shards = parallel.batch_shards(config.mesh, jax.device_count())
  dtype = vit.DTYPES[config.model.dtype]
  attention_bytes = attention.remat_saved_bytes(
    config.model.attention,
    batch=batch,
    length=tokens,
    heads=size.heads,
    head_dim=size.width // size.heads,
    dtype=dtype,
  )
  return vit.auto_remat(
    size,
    batch_per_device=-(-batch // shards),
    tokens=tokens,
    dtype=dtype,
    attention_bytes=attention_bytes,
  )


# ---------------------------------------------------------------------------
# Flags.
# ---------------------------------------------------------------------------


def _bool(text: str) -> bool:
  value = text.strip().lower()
  if value in ("true", "1", "yes"):
    return True
  if value in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_flags(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.throughput",
    description="Train-step throughput / FLOPs / MFU / compile time / peak RSS of the "
    "classification trainer's real step (each run in a fresh subprocess).",
  )
  p.add_argument("--variant", default="Ti/1", help="SIZE/PATCH, e.g. Ti/1 (pixels), Ti/2")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--batch", type=int, default=32, help="global batch size")
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num_classes", type=int, default=100, help="head size (CIFAR-100: 100)")
  p.add_argument(
    "--remat", default=None, choices=vit.REMAT_CHOICES, help="default: the config's (auto)"
  )
  p.add_argument("--scan", type=_bool, default=None, help="true|false; default: the config's")
  p.add_argument("--attention", default=None, help="attention backend; default: the config's")
  p.add_argument("--dtype", default=None, help="float32|bfloat16; default: the config's")
  p.add_argument(
    "--config",
    default=os.path.join(REPO_ROOT, "configs", "cls_pixel.py"),
    help="config file; ':ARGS' after it as for pixel_vit.main",
  )
  p.add_argument("--steps", type=int, default=5, help="timed steps (after warmup)")
  p.add_argument(
    "--min_steps",
    type=int,
    default=3,
    help="stop timing after --max_timing_s once this many steps are timed",
  )
  p.add_argument(
    "--max_timing_s",
    type=float,
    default=60.0,
    help="time budget for the timed steps of one configuration",
  )
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  p.add_argument("--matmul_size", type=int, default=2048)
  p.add_argument("--matmul_repeats", type=int, default=20)
  p.add_argument("--sweep", action="store_true", help="run the README table of configurations")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
  p.add_argument(
    "--mem_limit_gb",
    type=float,
    default=None,
    help="kill a child whose RSS exceeds this (default: 90%% of MemAvailable), "
    "so a config that would OOM becomes an error row, not a machine OOM",
  )
  p.add_argument("--json_out", default=None, help="also write the results as JSON here")
  p.add_argument("--verbose", action="store_true", help="stream all child stderr")
  p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for name in (
    "image_size",
    "batch",
    "channels",
    "num_classes",
    "steps",
    "min_steps",
    "matmul_size",
    "matmul_repeats",
  ):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  if args.warmup < 0:
    p.error(f"--warmup={args.warmup} must be >= 0")
  return args


def _child_argv(args: argparse.Namespace, overrides: dict) -> list[str]:
  values = dict(
    variant=args.variant,
    image_size=args.image_size,
    batch=args.batch,
    channels=args.channels,
    num_classes=args.num_classes,
    remat=args.remat,
    scan=args.scan,
    attention=args.attention,
    dtype=args.dtype,
    config=args.config,
    steps=args.steps,
    min_steps=args.min_steps,
    max_timing_s=args.max_timing_s,
    warmup=args.warmup,
    matmul_size=args.matmul_size,
    matmul_repeats=args.matmul_repeats,
  )
  values.update(overrides)
  argv = [sys.executable, "-m", "benchmarks.throughput", "--_child"]
  for key, value in values.items():
    if value is None:
      continue
    if isinstance(value, bool):
      value = "true" if value else "false"
    argv.append(f"--{key}={value}")
  return argv


# ---------------------------------------------------------------------------
# The child: one configuration, measured in a fresh process.
# ---------------------------------------------------------------------------


def _progress(message: str) -> None:
  print(PROGRESS_MARK + message, file=sys.stderr, flush=True)


def _maxrss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _load_config(spec: str):
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def benchmark_config(
  spec: str, *, variant: str, batch: int, image_size: int, model_overrides: dict, validate
):
  """The config file `spec` set up for one benchmark workload: variant, batch,
  image size and `model_overrides` (None: the config's own), validated by
  `validate` (the task's trainer) as a run would be, before anything compiles."""
  config = _load_config(spec)
  config.model.variant = variant
  for key, value in model_overrides.items():
    if value is not None:
      config.model[key] = value
  config.batch_size = batch
  config.data.image_size = image_size
  config.total_steps = 10_000  # only shapes the lr schedule
  validate(config)
  vit.validate_image_size(config.model, image_size)
  return config


def matmul_peak_gflops(size: int, repeats: int) -> float:
  """Best float32 `jnp.matmul` GFLOP/s of a size x size product on this machine."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
  jnp.matmul(a, b).block_until_ready()  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jnp.matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9


def _cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _xla_memory_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  return int(
    m.temp_size_in_bytes
    + m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.generated_code_size_in_bytes
  )


def build_train_step(config, make_model, make_train_step, host_batch: dict):
  """The trainer's sharded state and jitted train step, compiled for `host_batch`.

  Built the way the trainers build them: the config's mesh and sharding rules,
  `config.optimizer`'s schedule (over `config.total_steps`, 100 warmup steps)
  and optimizer, the state from `state_lib.sharded_state`, the host batch put
  on the mesh, and `jax.jit` with the trainer's in/out shardings and state
  donation, lowered and compiled once. `make_model()` builds the task's model
  and `make_train_step(graphdef, tx, schedule)` returns its step function
  (e.g. `classification.make_train_step` with the config bound). Also used by
  benchmarks/peer.py for the classification, MAE and DiT steps.

  Returns a namespace: mesh, rules, state, batch, compiled, num_params,
  baseline_rss (bytes, after building the state and batch), lower_s, compile_s.
  """
  import types

  import jax
  import numpy as np
  from flax import nnx

  from pixel_vit import optimizer as optimizer_lib
  from pixel_vit import parallel
  from pixel_vit.trainers import state as state_lib

  mesh = parallel.make_mesh(config.mesh)
  rules = config.sharding_rules
  abstract_params = nnx.to_pure_dict(nnx.split(nnx.eval_shape(make_model))[1])
  total_steps, warmup_steps = config.total_steps, 100
  schedule = optimizer_lib.make_schedule(config.optimizer, total_steps, warmup_steps)
  tx = optimizer_lib.make_optimizer(config.optimizer, schedule, abstract_params)
  described, create_state = state_lib.sharded_state(
    make_model, tx, mesh=mesh, rules=rules, seed=config.seed, ema=config.optimizer.ema_decay > 0
  )
  _progress(
    f"creating the state on mesh {dict(mesh.shape)} "
    f"({len(jax.devices())} {jax.devices()[0].platform} device(s))"
  )
  state = create_state()
  jax.block_until_ready(state)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

  batch = parallel.host_to_global(host_batch, mesh, rules)
  jax.block_until_ready(batch)
  baseline_rss = _maxrss_bytes()
  _progress(
    f"state built ({num_params / 1e6:.2f}M params), baseline RSS "
    f"{baseline_rss / GIB:.2f} GiB; lowering + compiling"
  )

  batch_shardings = {
    name: parallel.batch_sharding(mesh, rules, value.ndim) for name, value in host_batch.items()
  }
  replicated = parallel.replicated(mesh)
  with parallel.activate(mesh, rules):
    train_step = jax.jit(
      make_train_step(described.graphdef, tx, schedule),
      in_shardings=(described.shardings, batch_shardings),
      out_shardings=(described.shardings, replicated),
      donate_argnums=0,
    )
    t0 = time.perf_counter()
    lowered = train_step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  return types.SimpleNamespace(
    mesh=mesh,
    rules=rules,
    state=state,
    batch=batch,
    compiled=compiled,
    num_params=num_params,
    baseline_rss=baseline_rss,
    lower_s=t1 - t0,
    compile_s=t2 - t1,
  )


def run_child(args: argparse.Namespace) -> dict:
  t_start = time.perf_counter()
  _progress("importing jax and the trainer")
  import jax
  import numpy as np
  from flax import nnx

  from pixel_vit import parallel
  from pixel_vit.trainers import classification

  config = benchmark_config(
    args.config,
    variant=args.variant,
    batch=args.batch,
    image_size=args.image_size,
    model_overrides={key: getattr(args, key) for key in ("remat", "scan", "attention", "dtype")},
    validate=classification.validate,
  )

  num_classes = args.num_classes

  # As classification.make_model_fn / train_and_evaluate, minus the data files.
  def make_model():
    return vit.build_classifier(
      config.model,
      image_size=args.image_size,
      channels=args.channels,
      num_classes=num_classes,
      rngs=nnx.Rngs(config.seed),
      pixel_stats=(config.augment.mean, config.augment.std),
    )

  rng = np.random.default_rng(0)
  host_batch = {
    "images": rng.integers(
      0, 256, (args.batch, args.image_size, args.image_size, args.channels), dtype=np.uint8
    ),
    "labels": rng.integers(0, num_classes, (args.batch,), dtype=np.int32),
  }
  built = build_train_step(
    config,
    make_model,
    lambda graphdef, tx, schedule: classification.make_train_step(
      config, graphdef, tx, schedule, num_classes
    ),
    host_batch,
  )
  mesh, rules, state, batch, compiled = (
    built.mesh,
    built.rules,
    built.state,
    built.batch,
    built.compiled,
  )
  num_params, baseline_rss = built.num_params, built.baseline_rss
  lower_s, compile_s = built.lower_s, built.compile_s
  compile_rss = _maxrss_bytes()
  xla_flops = _cost_flops(compiled)
  xla_memory = _xla_memory_bytes(compiled)
  _progress(
    f"lowered in {lower_s:.1f}s, compiled in {compile_s:.1f}s; RSS high-water "
    f"{compile_rss / GIB:.2f} GiB"
  )

  with parallel.activate(mesh, rules):
    for i in range(args.warmup):
      t = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      _progress(f"warmup step {i + 1}/{args.warmup}: {time.perf_counter() - t:.2f}s")
    times = []
    timing_start = time.perf_counter()
    cpu_start = _cpu_seconds()
    for i in range(args.steps):
      t = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t)
      _progress(f"timed step {i + 1}/{args.steps}: {times[-1]:.2f}s")
      if len(times) >= args.min_steps and time.perf_counter() - timing_start > args.max_timing_s:
        _progress(f"time budget {args.max_timing_s:.0f}s reached after {len(times)} steps")
        break
    cpu_cores = (_cpu_seconds() - cpu_start) / (time.perf_counter() - timing_start)
  loss = float(jax.device_get(metrics["train/loss"]))
  if not np.isfinite(loss):
    raise FloatingPointError(f"train loss is {loss} after {int(state.step)} steps")
  peak_rss = _maxrss_bytes()  # read before the matmul probe allocates anything
  _progress(f"measuring the float32 matmul peak ({args.matmul_size}^2)")
  peak_gflops = matmul_peak_gflops(args.matmul_size, args.matmul_repeats)

  remat = resolved_remat(config, args.image_size, args.batch)
  flops = analytic_flops(
    args.variant,
    args.image_size,
    args.channels,
    num_classes,
    cls_token=config.model.pool == "cls",
    remat=remat,
  )
  step_s = statistics.median(times)
  achieved = flops["train"] * args.batch / step_s / 1e9
  return dict(
    variant=args.variant,
    image_size=args.image_size,
    channels=args.channels,
    batch=args.batch,
    tokens=flops["tokens"],
    remat=remat_label(config, remat),
    scan=bool(config.model.scan),
    attention=config.model.attention,
    dtype=config.model.dtype,
    params=num_params,
    step_times_s=times,
    step_s=step_s,
    images_per_s=args.batch / step_s,
    flops_per_image=flops,
    xla_flops_per_image=(None if xla_flops is None else xla_flops / args.batch),
    achieved_gflops=achieved,
    matmul_peak_gflops=peak_gflops,
    mfu=achieved / peak_gflops,
    hfu=flops["executed_train"] * args.batch / step_s / 1e9 / peak_gflops,
    lower_s=lower_s,
    compile_s=compile_s,
    baseline_rss_bytes=baseline_rss,
    compile_rss_bytes=compile_rss,
    peak_rss_bytes=peak_rss,
    xla_memory_bytes=xla_memory,
    loss=loss,
    cpu_cores_busy=cpu_cores,
    cpu_count=os.cpu_count(),
    load_average=os.getloadavg()[0],
    jax_version=jax.__version__,
    devices=len(jax.devices()),
    wall_s=time.perf_counter() - t_start,
  )


def child_main(args: argparse.Namespace) -> int:
  try:
    result = run_child(args)
  except BaseException as e:  # noqa: BLE001 - reported as an error row
    message = f"{type(e).__name__}: {e}".strip()
    if "RESOURCE_EXHAUSTED" in message or isinstance(e, MemoryError):
      message = "out of memory: " + message
    result = dict(error=message.splitlines()[0][:300], peak_rss_bytes=_maxrss_bytes())
    print(RESULT_MARK + json.dumps(result), flush=True)
    raise
  print(RESULT_MARK + json.dumps(result), flush=True)
  return 0


# ---------------------------------------------------------------------------
# The parent: fresh subprocess per configuration, progress, the table.
# ---------------------------------------------------------------------------


def proc_kib_field(path: str, field: str) -> int | None:
  """A `Field:  N kB` line of a /proc file, in bytes (None where unreadable).

  Also benchmarks/attention.py's peak-memory reader (VmHWM).
  """
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _mem_available_bytes() -> int | None:
  return proc_kib_field("/proc/meminfo", "MemAvailable")


def _rss_bytes(pid: int) -> int | None:
  return proc_kib_field(f"/proc/{pid}/status", "VmRSS")


def _pump(stream, tag: str, out: queue.Queue) -> None:
  for line in iter(stream.readline, ""):
    out.put((tag, line.rstrip("\n")))
  out.put((tag, None))


def describe(cfg: dict) -> str:
  size = cfg["image_size"]
  parts = [cfg["variant"], f"{size}x{size}", f"batch {cfg['batch']}"]
  for key in ("remat", "scan", "attention", "dtype"):
    if cfg.get(key) is not None:
      parts.append(f"{key}={str(cfg[key]).lower()}")
  return " ".join(parts)


def run_config(args: argparse.Namespace, cfg: dict, mem_limit: int, label: str) -> dict:
  """Runs one configuration in a fresh child; returns its result (or error) dict."""
  argv = _child_argv(args, cfg)
  print(f"{label} {describe(cfg)}", file=sys.stderr, flush=True)
  if args.verbose:
    print("  $ " + shlex.join(argv[1:]), file=sys.stderr, flush=True)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  start = time.perf_counter()
  proc = subprocess.Popen(
    argv,
    cwd=REPO_ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    bufsize=1,
  )
  lines: queue.Queue = queue.Queue()
  threads = [
    threading.Thread(target=_pump, args=(proc.stdout, "out", lines), daemon=True),
    threading.Thread(target=_pump, args=(proc.stderr, "err", lines), daemon=True),
  ]
  for t in threads:
    t.start()
  tail: collections.deque = collections.deque(maxlen=40)
  result, killed_for, max_rss, open_streams = None, None, 0, 2
  last_output = start

  def say(message):
    print(f"  [{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

  while open_streams or proc.poll() is None:
    try:
      tag, line = lines.get(timeout=0.25)
    except queue.Empty:
      tag, line = None, None
    if tag is not None and line is None:
      open_streams -= 1
    elif line is not None:
      if tag == "out" and line.startswith(RESULT_MARK):
        result = json.loads(line[len(RESULT_MARK) :])
      elif tag == "err" and line.startswith(PROGRESS_MARK):
        say(line[len(PROGRESS_MARK) :])
        last_output = time.perf_counter()
      else:
        tail.append(line)
        if args.verbose:
          say(line)
    if proc.poll() is None and killed_for is None:
      rss = _rss_bytes(proc.pid) or 0
      max_rss = max(max_rss, rss)
      elapsed = time.perf_counter() - start
      if rss > mem_limit:
        killed_for = (
          f"out of memory: RSS {rss / GIB:.1f} GiB exceeded the "
          f"{mem_limit / GIB:.1f} GiB limit (--mem_limit_gb); killed"
        )
      elif elapsed > args.timeout:
        killed_for = f"timeout: still running after {args.timeout:.0f}s (--timeout); killed"
      if killed_for:
        say(killed_for)
        proc.send_signal(signal.SIGKILL)  # our own child, by pid
      elif time.perf_counter() - last_output > 15:
        say(f"... running, RSS {rss / GIB:.2f} GiB")
        last_output = time.perf_counter()
  proc.wait()
  elapsed = time.perf_counter() - start
  if killed_for:
    result = dict(error=killed_for, peak_rss_bytes=max_rss)
  elif result is None or (proc.returncode != 0 and "error" not in result):
    if proc.returncode == -signal.SIGKILL:
      reason = "killed by SIGKILL (likely the kernel OOM killer)"
    else:
      useful = [line for line in tail if line.strip()]
      reason = f"exit code {proc.returncode}: " + (useful[-1] if useful else "no output")
    result = dict(error=reason[:300], peak_rss_bytes=max_rss or None)
  if "error" in result:
    say(f"FAILED: {result['error']}")
    if not args.verbose and not killed_for:
      for line in list(tail)[-8:]:
        print("    | " + line, file=sys.stderr)
  else:
    say(
      f"done: {result['images_per_s']:.1f} img/s, peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB"
    )
  result["config"] = cfg
  result["child_wall_s"] = elapsed
  return result


def fmt_or_dash(value, spec: str, scale: float = 1.0) -> str:
  """`value / scale` formatted, or a dash for a missing figure (also attention.py's)."""
  return "—" if value is None else format(value / scale, spec)


def _tokens(cfg: dict) -> str:
  size_name, _, patch = cfg["variant"].partition("/")
  if (
    size_name not in vit.SIZES
    or not patch.isdigit()
    or int(patch) < 1
    or cfg["image_size"] % int(patch)
  ):
    return "—"
  return str((cfg["image_size"] // int(patch)) ** 2 + 1)  # + [CLS]


def _setting(value, default="config") -> str:
  return default if value is None else str(value).lower()


def markdown_table(results: list[dict]) -> str:
  header = [
    "variant",
    "image",
    "tokens",
    "batch",
    "remat",
    "scan",
    "attn, dtype",
    "img/s",
    "step s (median, n)",
    "train GFLOP/img (analytic)",
    "XLA GFLOP/img",
    "achieved GFLOP/s",
    "matmul peak GFLOP/s",
    "MFU",
    "HFU",
    "CPU cores busy",
    "compile s",
    "baseline RSS GiB",
    "peak RSS GiB",
    "XLA mem GiB",
    "error",
  ]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in results:
    cfg = r["config"]
    image = f"{cfg['image_size']}x{cfg['image_size']}x{cfg.get('channels') or 3}"
    if "error" in r:
      cells = [
        cfg["variant"],
        image,
        _tokens(cfg),
        str(cfg["batch"]),
        _setting(cfg.get("remat")),
        _setting(cfg.get("scan")),
        f"{_setting(cfg.get('attention'))}, {_setting(cfg.get('dtype'))}",
      ]
      cells += ["—"] * 11 + [
        fmt_or_dash(r.get("peak_rss_bytes"), ".2f", GIB),
        "—",
        r["error"].replace("|", "/"),
      ]
    else:
      xla = r["xla_flops_per_image"]
      xla_cell = fmt_or_dash(xla, ".2f", 1e9) + (" (1 layer: scan)" if r["scan"] and xla else "")
      cells = [
        r["variant"],
        image,
        str(r["tokens"]),
        str(r["batch"]),
        r["remat"],
        str(r["scan"]).lower(),
        f"{r['attention']}, {r['dtype']}",
        f"{r['images_per_s']:.3g}",
        f"{r['step_s']:.3f} ({len(r['step_times_s'])})",
        f"{r['flops_per_image']['train'] / 1e9:.2f}",
        xla_cell,
        f"{r['achieved_gflops']:.1f}",
        f"{r['matmul_peak_gflops']:.1f}",
        f"{100 * r['mfu']:.1f}%",
        f"{100 * r['hfu']:.1f}%",
        f"{r['cpu_cores_busy']:.2f}/{r['cpu_count']}",
        f"{r['lower_s'] + r['compile_s']:.1f}",
        fmt_or_dash(r["baseline_rss_bytes"], ".2f", GIB),
        fmt_or_dash(r["peak_rss_bytes"], ".2f", GIB),
        fmt_or_dash(r["xla_memory_bytes"], ".2f", GIB),
        "",
      ]
    assert len(cells) == len(header)
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main(argv=None) -> int:
  args = parse_flags(argv)
  if args._child:
    return child_main(args)
  available = _mem_available_bytes()
  mem_limit = (
    int(args.mem_limit_gb * GIB)
    if args.mem_limit_gb
    else int(0.9 * available)
    if available
    else 22 * GIB
  )
  if args.sweep:
    configs = [dict(cfg) for cfg in SWEEP]
  else:
    configs = [
      dict(
        variant=args.variant,
        image_size=args.image_size,
        batch=args.batch,
        remat=args.remat,
        scan=args.scan,
        attention=args.attention,
        dtype=args.dtype,
      )
    ]
  for cfg in configs:
    cfg.setdefault("channels", args.channels)
    cfg.setdefault("num_classes", args.num_classes)
  load = os.getloadavg()
  print(
    f"{len(configs)} configuration(s), each in a fresh process; child memory limit "
    f"{mem_limit / GIB:.1f} GiB; {os.cpu_count()} CPUs, load average "
    f"{load[0]:.2f}",
    file=sys.stderr,
    flush=True,
  )
  sweep_start = time.perf_counter()
  results = []
  for i, cfg in enumerate(configs):
    results.append(run_config(args, cfg, mem_limit, f"[{i + 1}/{len(configs)}]"))
    print(f"  total elapsed {time.perf_counter() - sweep_start:.0f}s", file=sys.stderr, flush=True)
  table = markdown_table(results)
  ok = [r for r in results if "error" not in r]
  print()
  best_peak = max((r["matmul_peak_gflops"] for r in ok), default=None)
  print(
    f"Train-step benchmark, {datetime.date.today().isoformat()}, {os.cpu_count()} CPUs, "
    f"jax {ok[0]['jax_version'] if ok else '?'}, load average at start "
    f"{load[0]:.2f}, total {time.perf_counter() - sweep_start:.0f}s"
    + (f"; best float32 matmul peak of all rows {best_peak:.0f} GFLOP/s" if best_peak else "")
  )
  print()
  print(table)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=2)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
