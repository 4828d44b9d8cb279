"""What a compiled program costs on each device: memory, FLOPs, memory
traffic and collectives, read from the compiler's output.

- memory: `Compiled.memory_analysis()` (arguments, outputs, the donated
  part they share, temporaries, generated code), per device;
- FLOPs: the matmuls (`dot_general`) of the traced program, every loop
  iteration and Pallas kernel grid step counted, over the devices. XLA's own
  `cost_analysis()` counts a `while` body once (a 24-layer scan shows 1/24
  of its FLOPs) and cannot see into Pallas kernels (splash attention), so
  the jaxpr is counted instead;
- memory traffic and collectives: from the optimised HLO text, each
  top-level instruction (a fusion reads its operands and writes its result
  once; buffers the compiler placed in on-chip memory do not count) and
  each collective weighted by how often its computation runs (loop trip
  counts read from the loop conditions). An estimate: the reuse of data
  inside a fusion or a kernel is not modelled.

Nothing here runs a program; it works for compile-only TPU devices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable

import jax
import numpy as np
from jax.extend import core as jex_core

# HLO element types -> bytes.
_DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "s32": 4,
  "u32": 4,
  "s64": 8,
  "u64": 8,
  "f16": 2,
  "bf16": 2,
  "f32": 4,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "token": 0,
}
_ARRAY_TYPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
# A layout's memory space other than 0 (HBM): on-chip memory the compiler
# places a buffer in (TPU VMEM / CMEM), e.g. {2,1,0:T(8,128)S(1)}.
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Instructions that move no data of their own (views, bookkeeping, control).
_NO_TRAFFIC = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "while",
  "call",
  "conditional",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
  "add-dependency",
  "domain",
}


def _array_types(hlo_type: str) -> list[str]:
  """Each array type of `hlo_type` (a tuple's elements), layout included."""
  return [match.group(0) for match in _ARRAY_TYPE.finditer(hlo_type)]


def type_bytes(hlo_type: str, *, hbm_only: bool = False) -> int:
  """Bytes of an HLO type: 'bf16[256,1025]{...}' or a tuple of them;
  `hbm_only`: leaving out buffers placed in on-chip memory."""
  total = 0.0
  for dtype, dims, layout in _ARRAY_TYPE.findall(hlo_type):
    if dtype in _DTYPE_BYTES and not (hbm_only and _ON_CHIP.search(layout)):
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  result_type: str
  operands: list[str]  # names of the operand instructions
  operand_text: str  # what the parentheses hold: a constant's value
  attributes: str

  def called(self, key: str) -> list[str]:
    """Computations named by attribute `key` (body=, condition=, calls=, ...)."""
    match = re.search(rf"\b{key}=\{{?([^}},]+(?:,\s*%[^}},]+)*)\}}?", self.attributes)
    return re.findall(r"%?([\w.\-]+)", match.group(1)) if match else []


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _parse_instruction(line: str) -> Instruction | None:
  body = line.strip()
  if body.startswith("ROOT "):
    body = body[5:]
  match = re.match(r"%?([\w.\-]+)\s*=\s*", body)
  if not match:
    return None
  rest = body[match.end() :]
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    type_match = re.match(r"[a-z0-9]+\[[^\]]*\](\{[^}]*\})?", rest)
    if not type_match:
      return None
    end = type_match.end()
  result_type, rest = rest[:end], rest[end:].strip()
  op_match = re.match(r"([\w\-]+)\(", rest)
  if not op_match:
    return None
  close = _balanced(rest, op_match.end() - 1)
  inside = rest[op_match.end() : close - 1]
  operands = re.findall(r"%([\w.\-]+)", inside)
  return Instruction(match.group(1), op_match.group(1), result_type, operands, inside, rest[close:])


def parse_hlo(text: str) -> tuple[str, dict[str, list[Instruction]]]:
  """(entry computation's name, {computation name: its instructions}). An
  instruction may span lines (a kernel's configuration); a computation ends
  at a line that is only '}'."""
  computations: dict[str, list[Instruction]] = {}
  entry, current, pending = "", None, []

  def flush():
    if current is not None and pending:
      instruction = _parse_instruction(" ".join(pending))
      if instruction is not None:
        computations[current].append(instruction)
    pending.clear()

  for line in text.splitlines():
    header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$", line)
    if header and not line.startswith(" "):
      flush()
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif line.rstrip() == "}":
      flush()
      current = None
    elif re.match(r"^\s+(ROOT\s+)?%", line):
      flush()
      pending.append(line)
    elif pending:
      pending.append(line)
  flush()
  return entry, computations


def _trip_count(
  condition: list[Instruction], loop: Instruction, defined: dict[str, Instruction]
) -> int | None:
  """N of a `while` whose condition is `counter < N`, the counter starting
  at a constant (jax's scans and fori_loops); None when not of that form."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
  if known:
    return int(known.group(1))
  by_name = {i.name: i for i in condition}
  root = condition[-1] if condition else None
  if root is None or root.opcode != "compare" or "direction=LT" not in root.attributes:
    return None
  counter, bound = (by_name.get(name) for name in root.operands[:2])
  if (
    counter is None
    or bound is None
    or bound.opcode != "constant"
    or counter.opcode != "get-tuple-element"
  ):
    return None
  index = re.search(r"index=(\d+)", counter.attributes)
  if not re.fullmatch(r"-?\d+", bound.operand_text.strip()) or index is None:
    return None
  start = 0
  initial = defined.get(loop.operands[0]) if loop.operands else None
  if (
    initial is not None
    and initial.opcode == "tuple"
    and int(index.group(1)) < len(initial.operands)
  ):
    first = defined.get(initial.operands[int(index.group(1))])
    if (
      first is not None
      and first.opcode == "constant"
      and re.fullmatch(r"-?\d+", first.operand_text.strip())
    ):
      start = int(first.operand_text)
  return max(0, int(bound.operand_text) - start)


def execution_counts(
  entry: str, computations: dict[str, list[Instruction]]
) -> tuple[dict[str, float], int]:
  """How often each executed computation runs per call of the program (loop
  bodies times their trip counts), and how many loops had no readable trip
  count (counted once). Fusion bodies are not listed: their instruction is."""
  counts: dict[str, float] = {}
  unknown = 0

  def visit(name: str, times: float) -> None:
    nonlocal unknown
    counts[name] = counts.get(name, 0.0) + times
    defined = {i.name: i for i in computations.get(name, [])}
    for instruction in computations.get(name, []):
      if instruction.opcode == "while":
        body = instruction.called("body")
        condition = instruction.called("condition")
        trips = _trip_count(
          computations.get(condition[0], []) if condition else [], instruction, defined
        )
        if trips is None:
          unknown += 1
          trips = 1
        for computation in body:
          visit(computation, times * trips)
      elif (
        instruction.opcode in ("call", "async-start")
        or instruction.opcode.endswith("-start")
        and instruction.called("calls")
      ):
        for computation in instruction.called("to_apply") + instruction.called("calls"):
          if computation in computations:
            visit(computation, times)
      elif instruction.opcode == "conditional":
        for computation in instruction.called("branch_computations"):
          visit(computation, times)  # an upper bound: every branch counted

  visit(entry, 1.0)
  return counts, unknown


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
  count: float  # executions per program call
  bytes: float  # data per device over those executions


@dataclasses.dataclass(frozen=True)
class HloTraffic:
  hbm_bytes: float  # estimated bytes read + written per device per call
  collectives: tuple[Collective, ...]
  unknown_trip_counts: int  # loops counted once for want of a readable trip count


def _communicated_bytes(kind: str, opcode: str, result_type: str) -> int:
  """A collective's data per device: its result (all of a combined tuple);
  for an asynchronous start, whose result pairs inputs with outputs, the
  largest buffer (an all-reduce's outputs are all of its result)."""
  if opcode == kind or kind == "all-reduce":
    return type_bytes(result_type)
  return max((type_bytes(t) for t in _array_types(result_type)), default=0)


def _instruction_traffic(
  instruction: Instruction, sizes: dict[str, int], computations: dict[str, list[Instruction]]
) -> int:
  """Bytes one instruction reads and writes: its operands and its result,
  except where it updates or reads a slice of a buffer (a scan's stacked
  activations): a dynamic-update-slice writes its update into the buffer in
  place, a dynamic-slice reads no more than its result."""
  inner = {instruction.opcode}
  for fused in instruction.called("calls"):
    inner.update(i.opcode for i in computations.get(fused, []))
  result = sizes.get(instruction.name, 0)
  pieces = [type_bytes(t, hbm_only=True) for t in _array_types(instruction.result_type)] or [result]
  operands = [sizes.get(o, 0) for o in instruction.operands]
  if "dynamic-update-slice" in inner:
    in_place = [size for size in operands if size in pieces and size > 0]
    updates = sum(operands) - sum(in_place)
    return updates + max(0, result - sum(in_place)) + updates  # read, write the rest, write
  if "dynamic-slice" in inner:
    operands = [min(size, result) for size in operands]
  return result + sum(operands)


def hlo_traffic(text: str) -> HloTraffic:
  """Memory traffic and collectives of an optimised HLO module (see module doc)."""
  entry, computations = parse_hlo(text)
  counts, unknown = execution_counts(entry, computations)
  traffic = 0.0
  collectives: dict[str, list[float]] = {}
  for name, times in counts.items():
    instructions = computations.get(name, [])
    sizes = {i.name: type_bytes(i.result_type, hbm_only=True) for i in instructions}
    for instruction in instructions:
      opcode = instruction.opcode
      kind = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
      if kind in COLLECTIVES:
        stats = collectives.setdefault(kind, [0.0, 0.0])
        stats[0] += times
        stats[1] += times * _communicated_bytes(kind, opcode, instruction.result_type)
      if opcode in _NO_TRAFFIC or opcode.endswith("-done"):
        continue
      traffic += times * _instruction_traffic(instruction, sizes, computations)
  return HloTraffic(
    traffic,
    tuple(Collective(kind, count, size) for kind, (count, size) in sorted(collectives.items())),
    unknown,
  )


# ---------------------------------------------------------------- FLOPs


def _dot_flops(eqn) -> float:
  (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contracting)


# Fused attention kernels jax calls as one primitive (cuDNN): their matmuls,
# counted from q [B, Lq, H, D] and k [B, Lk, H, D] in units of one
# [Lq, Lk] product per example and head: the forward's QK^T and PV; the
# backward's recomputed QK^T, dV, dP, dQ and dK.
_FUSED_ATTENTION_MATMULS = {
  "dot_product_attention_fwd_wrapper": 2,
  "dot_product_attention_bwd_wrapper": 5,
}


def _fused_attention_flops(eqn, matmuls: int) -> float:
  batch, query_length, heads, dim = eqn.invars[0].aval.shape
  key_length = eqn.invars[1].aval.shape[1]
  return matmuls * 2.0 * batch * heads * query_length * key_length * dim


def _sub_jaxprs(params: dict) -> Iterable:
  for value in params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for item in values:
      if isinstance(item, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
        yield item


def matmul_flops(jaxpr) -> float:
  """FLOPs (2 per multiply-add) of the `dot_general`s in a (closed) jaxpr
  and of fused attention calls, over all devices: scan bodies times their
  length, Pallas kernels times their grid, shard_map bodies times the devices
  they run on, the larger branch of a cond; a while loop's body once (its
  trip count is not static)."""
  jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jex_core.ClosedJaxpr) else jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name in _FUSED_ATTENTION_MATMULS:
      total += _fused_attention_flops(eqn, _FUSED_ATTENTION_MATMULS[name])
    elif name == "scan":
      total += eqn.params["length"] * matmul_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(matmul_flops(branch) for branch in eqn.params["branches"])
    elif name == "pallas_call":
      grid = eqn.params["grid_mapping"].grid
      total += math.prod(grid) * matmul_flops(eqn.params["jaxpr"])
    elif name == "shard_map":
      mesh = eqn.params["mesh"]
      manual = eqn.params.get("manual_axes") or eqn.params.get("axis_names") or ()
      devices = math.prod(mesh.shape[axis] for axis in manual) if manual else mesh.size
      total += devices * matmul_flops(eqn.params["jaxpr"])
    else:
      total += sum(matmul_flops(sub) for sub in _sub_jaxprs(eqn.params))
  return total


# ---------------------------------------------------------------- one program


@dataclasses.dataclass(frozen=True)
class ProgramCost:
  """One compiled program on one device (all figures per device)."""

  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs written into donated arguments
  temp_bytes: int  # temporaries allocated (not all live at once)
  code_bytes: int
  peak_bytes: int  # live at once at the peak: what must fit the device
  flops: float  # matmul FLOPs per call
  hbm_traffic_bytes: float
  collectives: tuple[Collective, ...]
  unknown_trip_counts: int
  compile_seconds: float


def argument_bytes(abstract_args) -> int:
  """Bytes one device holds of abstract arguments (ShapeDtypeStructs with
  shardings): each leaf's shard."""
  total = 0
  for leaf in jax.tree.leaves(abstract_args):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def program_cost(
  name: str, jaxpr, compiled, *, device_count: int, compile_seconds: float
) -> ProgramCost:
  """The cost of `compiled` (its traced `jaxpr`), per device of `device_count`."""
  memory = compiled.memory_analysis()
  traffic = hlo_traffic(compiled.as_text())
  allocated = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
    + memory.generated_code_size_in_bytes
  )
  # The compiler's peak (what it checks against HBM); the sum of the parts
  # where a jax version does not report it (temporaries overstate it).
  peak = getattr(memory, "peak_memory_in_bytes", 0) or allocated
  return ProgramCost(
    name=name,
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    code_bytes=int(memory.generated_code_size_in_bytes),
    peak_bytes=int(peak),
    flops=matmul_flops(jaxpr) / device_count,
    hbm_traffic_bytes=traffic.hbm_bytes,
    collectives=traffic.collectives,
    unknown_trip_counts=traffic.unknown_trip_counts,
    compile_seconds=compile_seconds,
  )


def is_out_of_memory(error: BaseException) -> bool:
  """Whether a compile failed because the program does not fit the device."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "exceeds available" in text.lower()


def out_of_memory_summary(error: BaseException) -> str:
  """The compiler's own figures from a RESOURCE_EXHAUSTED error, on one line."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  wanted = [line for line in lines if "exceed" in line.lower() or "RESOURCE_EXHAUSTED" in line]
  return " ".join(wanted[:2] or lines[:1])[:400]
