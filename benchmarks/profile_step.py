r"""Where a real train step's time goes: a profiler trace, summed by category.

Builds the task's real step as `benchmarks/peer.py` does (the trainer's
`make_train_step` on the config's mesh, jitted with its shardings and
donation), traces `--steps` steps with `jax.profiler` (what `config.profile`
runs in training), and reads the trace back with jax's `ProfileData`. Every
XLA:CPU thunk is an event named by its HLO instruction; the compiled HLO's
metadata (the innermost Python frame that emitted the op: file, function)
puts it in a category:

| category | what |
|---|---|
| attention matmuls / softmax & other | ops from `models/attention/` (core.py, chunked.py, dot_product.py, the registry: QK^T, AV and their gradients; softmax, the block loop's copies) |
| projection + MLP matmuls | dots elsewhere (qkv, out, fc1, fc2, tokenizer, head) |
| LayerNorm & residual | the blocks' own non-matmul ops: LayerNorm, residual adds |
| GELU & biases | the MLP's non-matmul ops |
| drop-path | stochastic depth |
| augmentation | `data/augment.py`, `data/locality.py` (on-device, inside the step) |
| optimizer | `TrainState.apply_gradients` (optax AdamW, clipping), `optimizer.py` |
| scan & layout | `BlockStack` (the layer scan's slicing and stacking), copies and transposes with no source |
| loss, metrics & other | the rest (loss, label smoothing, metrics, the step's own code) |

Thunks that contain other thunks (while, conditional, call) are not counted
themselves, so each category is exclusive time. XLA:CPU may run
independent thunks on two threads at once, so the shares are of summed
thunk time; `step s` is wall time. Needs XLA's per-thunk trace events:
the child runs with `--xla_cpu_enable_xprof_traceme=true`.

  python -m benchmarks.profile_step --variant=mu/1 --image_size=16 --batch=128 \
      --channels=1 --num_classes=10
  python -m benchmarks.profile_step --variant=Ti/1 --steps=1 [--remat=dots] [--augment=none]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks import peer, throughput
from pixel_vit.models import vit

RESULT_MARK = "PROFILE_RESULT "
CATEGORIES = (
  "attention matmuls",
  "attention softmax & other",
  "projection + MLP matmuls",
  "LayerNorm & residual",
  "GELU & biases",
  "drop-path",
  "augmentation",
  "optimizer",
  "scan & layout",
  "loss, metrics & other",
)
_LAYOUT_OPS = {
  "copy",
  "transpose",
  "slice",
  "dynamic-slice",
  "dynamic-update-slice",
  "concatenate",
  "bitcast",
  "pad",
  "reshape",
}
_CONTAINERS = {"while", "conditional", "call"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?\s([a-z][a-z0-9\-_]*)\(")
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_MODULE = re.compile(r"^HloModule ([\w.\-]+)")
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def _source_tables(lines: list[str]) -> dict[int, tuple[str, str]]:
  """stack frame id -> (file, function) of that frame, from the tables XLA
  prints before the computations (jax records the innermost user frame)."""
  tables = {name: {} for name in _TABLES}
  current = None
  for line in lines:
    if line in _TABLES:
      current = line
      continue
    if not line.strip() or current is None:
      current = None
      continue
    key, _, rest = line.partition(" ")
    if current in ("FileNames", "FunctionNames"):
      tables[current][int(key)] = rest.strip('"')
    else:
      tables[current][int(key)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
  frames = {}
  for frame_id, frame in tables["StackFrames"].items():
    location = tables["FileLocations"].get(frame.get("file_location_id"), {})
    frames[frame_id] = (
      tables["FileNames"].get(location.get("file_name_id"), ""),
      tables["FunctionNames"].get(location.get("function_name_id"), ""),
    )
  return frames


def module_name(text: str) -> str:
  """The HLO module's name (`jit_train_step`): what trace events call it."""
  match = _MODULE.match(text)
  return match.group(1) if match else ""


def parse_hlo(text: str) -> dict[str, dict]:
  """instruction name -> {opcode, source, function, computation, calls} from
  compiled HLO text."""
  lines = text.splitlines()
  frames = _source_tables(lines)
  instructions, computation = {}, None
  for line in lines:
    header = _COMPUTATION.match(line)
    if header and " = " not in line:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    frame = _FRAME.search(line)
    source, function = frames.get(int(frame.group(1)), ("", "")) if frame else ("", "")
    calls = _CALLS.search(line)
    instructions[match.group(1)] = dict(
      opcode=match.group(2),
      source=source,
      function=function,
      computation=computation,
      calls=calls.group(1) if calls else None,
    )
  return instructions


def _has_dot(computation: str | None, by_computation: dict) -> bool:
  return computation is not None and any(
    i["opcode"] in ("dot", "convolution") or _has_dot(i["calls"], by_computation)
    for i in by_computation.get(computation, ())
  )


# The modules of models/attention/ whose ops count as attention. ring.py and
# splash.py are not listed: their ops fall in the categories below.
_ATTENTION_SOURCES = ("__init__", "core", "chunked", "dot_product")


def group_by_computation(instructions: dict) -> dict:
  """{computation name: [its instructions' infos]}, what `categorise` looks into."""
  by_computation = collections.defaultdict(list)
  for info in instructions.values():
    by_computation[info["computation"]].append(info)
  return by_computation


def categorise(name: str, instructions: dict, by_computation: dict) -> str:
  info = instructions.get(name)
  if info is None:
    return "loss, metrics & other"
  source, function = info["source"], info["function"]
  if not source and info["calls"]:  # a fusion: where its ops came from
    inner = [i for i in by_computation.get(info["calls"], ()) if i["source"]]
    if inner:
      source, function = inner[-1]["source"], inner[-1]["function"]
  matmul = info["opcode"] in ("dot", "convolution") or _has_dot(info["calls"], by_computation)
  # jax keeps the innermost frame outside jax, flax and optax: the model's,
  # the trainer's or the state's method that called into them.
  if "/data/augment.py" in source or "/data/locality.py" in source:
    return "augmentation"
  if any(f"/models/attention/{module}.py" in source for module in _ATTENTION_SOURCES):
    return "attention matmuls" if matmul else "attention softmax & other"
  if function == "apply_gradients" or "/optimizer.py" in source or "/divergence.py" in source:
    return "optimizer"
  if matmul:
    return "projection + MLP matmuls"
  if function.startswith("Mlp."):
    return "GELU & biases"
  if function in ("EncoderBlock.__call__", "Encoder.encode", "DiTBlock.__call__"):
    return "LayerNorm & residual"
  if function == "drop_path":
    return "drop-path"
  if function.startswith("BlockStack.") or (not source and info["opcode"] in _LAYOUT_OPS):
    return "scan & layout"
  return "loss, metrics & other"


def breakdown(trace_dir: str, hlo_text: str) -> dict:
  """Summed exclusive thunk time (seconds) per category of the module
  `hlo_text` compiles, from the trace in `trace_dir` (any `jax.profiler`
  trace, config.profile's too: other modules' events are left out)."""
  from jax._src.profiler import ProfileData

  instructions = parse_hlo(hlo_text)
  module = module_name(hlo_text)
  by_computation = group_by_computation(instructions)
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  ops = collections.Counter()  # seconds per HLO instruction
  for path in paths:
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          op = stats.get("hlo_op")
          if op is None or stats.get("hlo_module") != module:
            continue
          if instructions.get(op, {}).get("opcode") not in _CONTAINERS:
            ops[op] += event.duration_ns / 1e9
  if not ops:  # e.g. the module name in the trace is not the compiled one's
    raise RuntimeError(f"the trace under {trace_dir} has no events of HLO module {module!r}")
  totals = collections.Counter()
  for op, seconds in ops.items():  # categorised once per instruction, not per event
    totals[categorise(op, instructions, by_computation)] += seconds
  return dict(categories=dict(totals), top_ops=ops.most_common(12))


def child(args: argparse.Namespace) -> None:
  import jax

  w = dict(
    peer.DEFAULTS,
    task=args.task,
    variant=args.variant,
    image_size=args.image_size,
    batch=args.batch,
    channels=args.channels,
    num_classes=args.num_classes,
    dtype="float32",
  )
  side = peer.jax_side(args.task, w, args)
  for _ in range(args.warmup):
    side.step()
  trace_dir = tempfile.mkdtemp(prefix="pixel_vit_profile_")
  start = time.perf_counter()
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.steps):
    side.step()
  jax.profiler.stop_trace()
  step_s = (time.perf_counter() - start) / args.steps
  result = breakdown(trace_dir, side.hlo_text())
  result.update(
    step_s=step_s,
    setting=side.setting,
    tokens=side.tokens,
    workload=w,
    steps=args.steps,
    trace_dir=trace_dir,
  )
  print(RESULT_MARK + json.dumps(result), flush=True)


def table(result: dict) -> str:
  total = sum(result["categories"].values()) or 1.0
  steps = result["steps"]
  lines = ["| category | ms / step | share of thunk time |", "|---|---|---|"]
  for name in CATEGORIES:
    seconds = result["categories"].get(name, 0.0)
    lines.append(f"| {name} | {1000 * seconds / steps:.0f} | {100 * seconds / total:.1f}% |")
  lines.append(
    f"| **summed thunk time** | {1000 * total / steps:.0f} | "
    f"(step wall time {1000 * result['step_s']:.0f} ms) |"
  )
  return "\n".join(lines)


def parse_flags(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0]
  )
  p.add_argument("--task", default="classification", choices=tuple(peer.CONFIG_FILES))
  p.add_argument("--variant", default="Ti/1")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num_classes", type=int, default=100)
  p.add_argument("--steps", type=int, default=3, help="traced steps")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--remat", default=None, choices=vit.REMAT_CHOICES)
  p.add_argument("--scan", type=throughput._bool, default=None)
  p.add_argument("--attention", default=None)
  p.add_argument("--augment", default="config", choices=("config", "none"))
  p.add_argument("--json_out", default=None)
  p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_flags(argv)
  if args._child:
    child(args)
    return 0
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
  argv = [sys.executable, "-m", "benchmarks.profile_step", "--_child"] + list(
    argv if argv is not None else sys.argv[1:]
  )
  proc = subprocess.run(argv, cwd=peer.REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
  result = next(
    (
      json.loads(line[len(RESULT_MARK) :])
      for line in proc.stdout.splitlines()
      if line.startswith(RESULT_MARK)
    ),
    None,
  )
  if result is None:
    print(f"the profiled child failed (exit {proc.returncode}); see its output above")
    return 1
  w = result["workload"]
  print(
    f"{w['task']} {w['variant']} {w['image_size']}x{w['image_size']}x{w['channels']} "
    f"batch {w['batch']}, {result['tokens']} tokens, {result['setting']}; "
    f"{result['steps']} traced step(s); trace in {result['trace_dir']}\n"
  )
  print(table(result))
  print(
    "\nlongest ops (ms / step): "
    + ", ".join(f"{name} {1000 * s / result['steps']:.0f}" for name, s in result["top_ops"][:8])
  )
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
