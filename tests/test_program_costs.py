"""pixel_vit/program_costs.py: what a compiled program costs, read from its
HLO text and its jaxpr. Loops count once per iteration (XLA's own cost
analysis counts a while body once), instructions may span lines, on-chip
buffers move no HBM bytes, a dynamic-update-slice writes in place, and the
matmul FLOPs of scans, conds and shard_maps are counted as they run."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from pixel_vit import program_costs

# A loop of 12 iterations: each all-reduces an [8, 16] float32 array and a
# fusion (whose configuration spans two lines) writes its result on chip.
HLO = """HloModule loop

%fused (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  ROOT %neg = f32[8,16]{1,0} negate(%x)
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %ar = f32[8,16]{1,0} all-reduce(%x), replica_groups={}, to_apply=%fused
  %y = f32[8,16]{1,0:S(1)} fusion(%ar), kind=kLoop, calls=%fused, backend_config={"a":
{"b": 1}}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%next, %y)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%zero, %a)
  %w = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%w), index=1
}
"""


def test_loops_count_once_per_iteration_and_multi_line_instructions_parse():
  entry, computations = program_costs.parse_hlo(HLO)
  assert entry == "main"
  assert [i.name for i in computations["body"]][-2:] == ["y", "t"]  # past the 2-line config
  counts, unknown = program_costs.execution_counts(entry, computations)
  assert counts == {"main": 1.0, "body": 12.0} and unknown == 0
  traffic = program_costs.hlo_traffic(HLO)
  [all_reduce] = traffic.collectives
  assert (all_reduce.kind, all_reduce.count, all_reduce.bytes) == ("all-reduce", 12, 12 * 512)
  # Per iteration: add (3 scalars), all-reduce (in + out), the fusion's HBM
  # operand (its result is on chip).
  assert traffic.hbm_bytes == 12 * (3 * 4 + 2 * 512 + 512)


def test_a_loop_whose_bound_is_not_a_constant_counts_once_and_is_reported():
  text = HLO.replace("%n = s32[] constant(12)", "%n = s32[] get-tuple-element(%p), index=0")
  counts, unknown = program_costs.execution_counts(*program_costs.parse_hlo(text))
  assert counts["body"] == 1.0 and unknown == 1


def test_a_compiled_scan_counts_its_trip_count_and_updates_in_place():
  # A scan writing one [64, 64] row block per step into a [16, 64, 64] buffer:
  # the in-place update moves the block, not the buffer.
  def f(x):
    def step(carry, _):
      carry = jnp.tanh(carry @ carry)
      return carry, carry

    return lax.scan(step, x, None, length=16)[1]

  x = jnp.ones((64, 64), jnp.float32)
  text = jax.jit(f).lower(x).compile().as_text()
  counts, unknown = program_costs.execution_counts(*program_costs.parse_hlo(text))
  assert unknown == 0 and 16.0 in counts.values()
  buffer = 16 * 64 * 64 * 4
  assert program_costs.hlo_traffic(text).hbm_bytes < 16 * buffer / 2


def test_matmul_flops_count_scans_conds_and_shard_maps():
  w = jnp.ones((32, 48), jnp.float32)
  one = 2 * 8 * 32 * 48  # an [8, 32] @ [32, 48] product

  def scanned(x):
    return lax.scan(lambda c, _: (c @ w @ w.T, None), x, None, length=5)[0]

  jaxpr = jax.make_jaxpr(scanned)(jnp.ones((8, 32)))
  assert program_costs.matmul_flops(jaxpr) == 5 * 2 * one

  def branches(x, p):
    return lax.cond(p, lambda x: x @ w @ w.T, lambda x: (x @ w).sum() * x, x)

  jaxpr = jax.make_jaxpr(branches)(jnp.ones((8, 32)), True)
  assert program_costs.matmul_flops(jaxpr) == 2 * one  # the larger branch

  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  per_device = jax.shard_map(
    lambda x: x @ w, mesh=mesh, in_specs=PartitionSpec("data"), out_specs=PartitionSpec("data")
  )
  jaxpr = jax.make_jaxpr(per_device)(jnp.ones((32, 32)))
  assert program_costs.matmul_flops(jaxpr) == 4 * one  # [8, 32] @ [32, 48] on each of 4
