r"""Time and peak memory of attention alone (forward + backward), per backend.

Ti-sized heads (3 heads x 64, float32), self-attention at the sequence
lengths pixel tokens reach: 1,024 (32x32, batch 32), 4,096 (64x64, batch 2),
16,384 (128x128, batch 1) and 65,536 (256x256, batch 1, `chunked` only: the
others would need ~50 GiB per score matrix). What is timed is one jitted
call returning the output and the q / k / v gradients for a given output
cotangent: the attention part of a training step.

Every (backend, length) runs in a FRESH subprocess, so its peak RSS (VmHWM
of /proc/self/status) is that case's alone. "extra MiB" subtracts the peak
of an idle child that imported the same modules and started the CPU client.
Each child runs under RLIMIT_AS (--mem_limit_gb: default 20 GiB, or 90% of
MemAvailable if that is less) and a timeout, so a backend that cannot fit
becomes an "out of memory" row instead of freezing the machine.

  python -m benchmarks.attention                       # the README table (~20 min)
  python -m benchmarks.attention --cases=1024:32 --backends=xla,chunked \
      --query_block=256 --key_block=128                # one case, other blocks

Columns are explained in benchmarks/README.md.
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

from benchmarks.throughput import fmt_or_dash, matmul_peak_gflops, proc_kib_field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_MARK = "BENCH_RESULT "
MIB = 1024**2
GIB = 1024**3
BACKENDS = ("xla", "dot_product", "chunked")
# (length, batch, backends). 65,536 is chunked only: one [1, 3, N, N] float32
# score matrix alone would be 48 GiB. The batch-1 rows at 1,024 and 4,096 put
# chunked's memory at 1k / 4k / 16k / 64k on one batch size.
CASES = (
  (1024, 32, BACKENDS),
  (4096, 2, BACKENDS),
  (16384, 1, BACKENDS),
  (65536, 1, ("chunked",)),
  (1024, 1, ("chunked",)),
  (4096, 1, ("chunked",)),
)
HEADS, HEAD_DIM = 3, 64  # ViT-Ti / PiT-Ti


def attention_flops(batch: int, length: int) -> int:
  """Model FLOPs of forward + backward: QK^T and PV forward (2 x 2BHN^2D),
  backward = 2 x forward. chunked also recomputes QK^T in the backward pass
  (14 instead of 12 BHN^2D executed); that is not counted, as for MFU."""
  return 12 * batch * HEADS * length**2 * HEAD_DIM


# ---------------------------------------------------------------------------
# Flags.
# ---------------------------------------------------------------------------


def _cases(text: str) -> list[tuple[int, int]]:
  cases = []
  for item in text.split(","):
    length, sep, batch = item.partition(":")
    if not sep or not length.isdigit() or not batch.isdigit() or not int(length) or not int(batch):
      raise argparse.ArgumentTypeError(
        f"case {item!r} is not LENGTH:BATCH with positive integers, e.g. 4096:2"
      )
    cases.append((int(length), int(batch)))
  return cases


def _backends(text: str) -> list[str]:
  names = [name.strip() for name in text.split(",")]
  for name in names:
    if name not in BACKENDS:
      raise argparse.ArgumentTypeError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
  return names


def parse_flags(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.attention",
    description="Forward+backward time and peak memory of attention alone, per backend "
    "and sequence length (each in a fresh subprocess).",
  )
  p.add_argument(
    "--cases",
    type=_cases,
    default=None,
    help="LENGTH:BATCH,... (default: 1024:32,4096:2,16384:1 for every backend "
    "and 65536:1 for chunked)",
  )
  p.add_argument(
    "--backends",
    type=_backends,
    default=list(BACKENDS),
    help="comma-separated subset of " + ",".join(BACKENDS),
  )
  p.add_argument(
    "--query_block",
    type=int,
    default=None,
    help="chunked's query block (default: attention.QUERY_BLOCK)",
  )
  p.add_argument(
    "--key_block", type=int, default=None, help="chunked's key block (default: attention.KEY_BLOCK)"
  )
  p.add_argument("--steps", type=int, default=5, help="timed calls (after one warmup)")
  p.add_argument(
    "--min_steps",
    type=int,
    default=2,
    help="stop timing after --max_timing_s once this many calls are timed",
  )
  p.add_argument("--max_timing_s", type=float, default=60.0)
  p.add_argument("--matmul_size", type=int, default=2048)
  p.add_argument("--matmul_repeats", type=int, default=20)
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
  p.add_argument(
    "--mem_limit_gb",
    type=float,
    default=None,
    help="RLIMIT_AS of every child (GiB): past it allocations fail cleanly. "
    "Default: 20 GiB or 90%% of MemAvailable, whichever is less, so a "
    "child that fills its limit cannot push the machine into the OOM "
    "killer",
  )
  p.add_argument("--json_out", default=None, help="also write the results as JSON here")
  p.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # backend or 'idle'
  p.add_argument("--_length", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--_batch", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for name in ("steps", "min_steps", "matmul_size", "matmul_repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  for name in ("query_block", "key_block"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  return args


# ---------------------------------------------------------------------------
# The child: one (backend, length) in a fresh process.
# ---------------------------------------------------------------------------


def _progress(message: str) -> None:
  print("[bench] " + message, file=sys.stderr, flush=True)


def _peak_rss() -> int | None:
  return proc_kib_field("/proc/self/status", "VmHWM")


def run_child(args: argparse.Namespace, facts: dict) -> dict:
  """Measures one case; `facts` collects what is known so far (for error rows)."""
  import functools

  import jax
  import jax.numpy as jnp

  from pixel_vit.models import attention

  jnp.zeros(()).block_until_ready()  # start the CPU client: part of the baseline
  if args._child == "idle":
    return dict(peak_rss_bytes=_peak_rss())

  fn = attention.get_backend(args._child)
  blocks = {}
  if args._child == "chunked":
    blocks = dict(
      query_block=args.query_block or attention.QUERY_BLOCK,
      key_block=args.key_block or attention.KEY_BLOCK,
    )
    fn = functools.partial(fn, **blocks)
  batch, length = args._batch, args._length
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, d_out = (
    jax.random.normal(key, (batch, length, HEADS, HEAD_DIM), jnp.float32) for key in keys
  )

  @jax.jit
  def forward_backward(q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(d_out)

  _progress("compiling")
  t0 = time.perf_counter()
  compiled = forward_backward.lower(q, k, v, d_out).compile()
  compile_s = time.perf_counter() - t0
  try:  # XLA's own estimate of the temporaries (not every backend has one)
    xla_temp = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001
    xla_temp = None
  facts["xla_temp_bytes"] = xla_temp
  _progress(f"compiled in {compile_s:.1f}s; warmup call")
  jax.block_until_ready(compiled(q, k, v, d_out))
  times = []
  timing_start = time.perf_counter()
  for _ in range(args.steps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v, d_out))
    times.append(time.perf_counter() - t)
    _progress(f"call {len(times)}: {times[-1] * 1e3:.0f} ms")
    if len(times) >= args.min_steps and time.perf_counter() - timing_start > args.max_timing_s:
      break
  peak = _peak_rss()  # before the matmul probe allocates anything
  _progress("measuring the float32 matmul peak")
  peak_gflops = matmul_peak_gflops(args.matmul_size, args.matmul_repeats)
  step_s = statistics.median(times)
  achieved = attention_flops(batch, length) / step_s / 1e9
  return dict(
    times_s=times,
    step_s=step_s,
    compile_s=compile_s,
    peak_rss_bytes=peak,
    xla_temp_bytes=xla_temp,
    achieved_gflops=achieved,
    matmul_peak_gflops=peak_gflops,
    blocks=blocks,
    jax_version=jax.__version__,
    load_average=os.getloadavg()[0],
  )


def child_main(args: argparse.Namespace) -> int:
  facts = {}
  try:
    result = run_child(args, facts)
  except BaseException as e:  # noqa: BLE001 - reported as an error row
    message = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    address_peak = proc_kib_field("/proc/self/status", "VmPeak")
    if "RESOURCE_EXHAUSTED" in message or "Out of memory" in message or isinstance(e, MemoryError):
      message = "out of memory: " + message
    elif address_peak and limit != resource.RLIM_INFINITY and address_peak > 0.9 * limit:
      # A kernel's own allocation failing (e.g. "YNNPACK operation failed")
      # once the address space is at RLIMIT_AS is running out of memory too.
      message = (
        f"out of memory (address space {address_peak / GIB:.1f} GiB at the "
        f"{limit / GIB:.1f} GiB RLIMIT_AS): {message}"
      )
    print(
      RESULT_MARK + json.dumps(dict(error=message, peak_rss_bytes=_peak_rss(), **facts)), flush=True
    )
    return 1
  print(RESULT_MARK + json.dumps(result), flush=True)
  return 0


# ---------------------------------------------------------------------------
# The parent: a fresh child per case, the table.
# ---------------------------------------------------------------------------


def mem_limit_gb(args: argparse.Namespace) -> float:
  if args.mem_limit_gb:
    return args.mem_limit_gb
  available = proc_kib_field("/proc/meminfo", "MemAvailable")
  return min(20.0, 0.9 * available / GIB) if available else 20.0


def run_case(args: argparse.Namespace, backend: str, length: int, batch: int) -> dict:
  """Runs one case in a fresh child under RLIMIT_AS and a timeout."""
  argv = [
    sys.executable,
    "-m",
    "benchmarks.attention",
    f"--_child={backend}",
    f"--_length={length}",
    f"--_batch={batch}",
    f"--steps={args.steps}",
    f"--min_steps={args.min_steps}",
    f"--max_timing_s={args.max_timing_s}",
    f"--matmul_size={args.matmul_size}",
    f"--matmul_repeats={args.matmul_repeats}",
  ]
  for name in ("query_block", "key_block"):
    if getattr(args, name) is not None:
      argv.append(f"--{name}={getattr(args, name)}")
  limit = int(mem_limit_gb(args) * GIB)

  def limit_memory():  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  start = time.perf_counter()
  try:
    proc = subprocess.run(
      argv,
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=args.timeout,
      preexec_fn=limit_memory,
    )
  except subprocess.TimeoutExpired:  # subprocess.run has killed the child
    return dict(
      error=f"timeout: still running after {args.timeout:.0f}s (--timeout); killed",
      wall_s=time.perf_counter() - start,
    )
  result = None
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_MARK):
      result = json.loads(line[len(RESULT_MARK) :])
  if result is None:
    tail = [line for line in proc.stderr.splitlines() if line.strip()]
    reason = f"exit code {proc.returncode}: " + (tail[-1] if tail else "no output")
    if proc.returncode < 0 or "bad_alloc" in proc.stderr or "Out of memory" in proc.stderr:
      reason = "out of memory / killed: " + reason
    result = dict(error=reason[:300])
  result["wall_s"] = time.perf_counter() - start
  return result


def markdown_table(rows: list[dict], baseline: int | None) -> str:
  header = [
    "backend",
    "length",
    "batch",
    "ms / fwd+bwd (median, n)",
    "speedup vs xla",
    "GFLOP/s",
    "matmul peak GFLOP/s",
    "% of peak",
    "compile s",
    "peak MiB",
    "extra MiB",
    "XLA temp MiB",
    "error",
  ]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  xla_ms = {
    (r["length"], r["batch"]): r["step_s"]
    for r in rows
    if r["backend"] == "xla" and "error" not in r
  }
  for r in rows:
    peak = r.get("peak_rss_bytes")
    extra = None if peak is None or baseline is None else peak - baseline
    backend = r["backend"]
    if r.get("blocks"):
      backend += f" ({r['blocks']['query_block']}/{r['blocks']['key_block']})"
    if "error" in r:
      cells = (
        [backend, str(r["length"]), str(r["batch"])]
        + ["—"] * 6
        + [
          fmt_or_dash(peak, ".0f", MIB),
          fmt_or_dash(extra, ".0f", MIB),
          fmt_or_dash(r.get("xla_temp_bytes"), ".0f", MIB),
          r["error"].replace("|", "/"),
        ]
      )
    else:
      reference = xla_ms.get((r["length"], r["batch"]))
      cells = [
        backend,
        str(r["length"]),
        str(r["batch"]),
        f"{r['step_s'] * 1e3:.0f} ({len(r['times_s'])})",
        f"{reference / r['step_s']:.2f}x" if reference else "—",
        f"{r['achieved_gflops']:.0f}",
        f"{r['matmul_peak_gflops']:.0f}",
        f"{100 * r['achieved_gflops'] / r['matmul_peak_gflops']:.0f}%",
        f"{r['compile_s']:.1f}",
        fmt_or_dash(peak, ".0f", MIB),
        fmt_or_dash(extra, ".0f", MIB),
        fmt_or_dash(r.get("xla_temp_bytes"), ".0f", MIB),
        "",
      ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_flags(argv)
  if args._child:
    return child_main(args)
  if args.cases is None:
    plan = [
      (b, length, batch) for length, batch, allowed in CASES for b in args.backends if b in allowed
    ]
  else:
    plan = [(b, length, batch) for length, batch in args.cases for b in args.backends]
  load = os.getloadavg()[0]
  args.mem_limit_gb = mem_limit_gb(args)  # fixed for the whole run
  print(
    f"{len(plan)} case(s) + 1 idle baseline, each in a fresh process under RLIMIT_AS "
    f"{args.mem_limit_gb:.1f} GiB; {os.cpu_count()} CPUs, load average {load:.2f}",
    file=sys.stderr,
    flush=True,
  )
  start = time.perf_counter()
  idle = run_case(args, "idle", 0, 0)
  baseline = idle.get("peak_rss_bytes")
  print(
    f"idle child (jax + pixel_vit imported, CPU client started): peak "
    f"{fmt_or_dash(baseline, '.0f', MIB)} MiB",
    file=sys.stderr,
    flush=True,
  )
  rows = []
  for i, (backend, length, batch) in enumerate(plan):
    print(
      f"[{i + 1}/{len(plan)}] {backend} length {length} batch {batch}",
      file=sys.stderr,
      end=" ... ",
      flush=True,
    )
    row = dict(
      backend=backend, length=length, batch=batch, **run_case(args, backend, length, batch)
    )
    rows.append(row)
    print(
      row["error"]
      if "error" in row
      else f"{row['step_s'] * 1e3:.0f} ms, peak {row['peak_rss_bytes'] / MIB:.0f} MiB "
      f"({row['wall_s']:.0f}s)",
      file=sys.stderr,
      flush=True,
    )
  ok = [r for r in rows if "error" not in r]
  best_peak = max((r["matmul_peak_gflops"] for r in ok), default=None)
  print()
  print(
    f"Attention forward+backward, {datetime.date.today().isoformat()}, "
    f"{os.cpu_count()} CPUs, jax {ok[0]['jax_version'] if ok else '?'}, float32, "
    f"{HEADS} heads x {HEAD_DIM}; RLIMIT_AS {args.mem_limit_gb:.1f} GiB; load average "
    f"at start {load:.2f}; idle-child baseline "
    f"{fmt_or_dash(baseline, '.0f', MIB)} MiB; best matmul peak "
    f"{fmt_or_dash(best_peak, '.0f')} GFLOP/s; total {time.perf_counter() - start:.0f}s"
  )
  print()
  print(markdown_table(rows, baseline))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(dict(baseline_rss_bytes=baseline, rows=rows), f, indent=2)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
