"""benchmarks/estimates.py: the on-paper GPU MFU table is consistent with its
own model (flash never moves more bytes than materialised scores, longer
sequences shift xla towards memory-bound) and names what `auto` picks; the
compiled TPU bound is the model FLOPs over the compiled step's time bound."""

import dataclasses

from benchmarks import estimates, throughput
from pixel_vit import hardware, program_costs
from pixel_vit.models import attention, vit


def test_flash_moves_fewer_bytes_and_xla_loses_more_as_the_sequence_grows():
  size = vit.SIZES["Ti"]
  for tokens in (257, 1025, 4097):
    _, xla_bytes = estimates.per_layer(size, tokens, "xla")
    flash_flops, flash_bytes = estimates.per_layer(size, tokens, "splash")
    xla_flops, _ = estimates.per_layer(size, tokens, "xla")
    assert flash_bytes < xla_bytes and flash_flops > xla_flops  # recomputes QK^T
  a100 = estimates.ACCELERATORS[0]
  short = estimates.estimate(a100, "Ti/2", 32, 3, True, "xla")
  long = estimates.estimate(a100, "Ti/1", 32, 3, True, "xla")
  assert long["mfu"] < short["mfu"] and long["bound"] == "memory"
  assert estimates.estimate(a100, "Ti/1", 32, 3, True, "dot_product")["mfu"] > long["mfu"]


def test_table_has_every_row_and_marks_autos_pick():
  text = estimates.table()
  rows = [line for line in text.splitlines()[2:]]
  assert len(rows) == len(estimates.ACCELERATORS) * len(estimates.WORKLOADS)
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    platform = next(a.platform for a in estimates.ACCELERATORS if a.name == cells[0])
    picked = attention.choose_backend(platform=platform, length=int(cells[2]), dtype="bfloat16")
    assert cells[3] == picked
    bold = [estimates.BACKENDS[i] for i, c in enumerate(cells[4:]) if c.startswith("**")]
    assert bold == [picked]


def test_compiled_bound_is_model_flops_over_the_compiled_step_bound():
  workload = estimates.WORKLOADS[1]  # PiT-Ti/1
  chip = hardware.CHIPS["v5e"]
  model = throughput.analytic_flops(
    workload.variant, workload.image_size, workload.channels, num_classes=1000
  )["train"]
  cost = program_costs.ProgramCost(
    name="train_step",
    argument_bytes=0,
    output_bytes=0,
    alias_bytes=0,
    temp_bytes=0,
    code_bytes=0,
    peak_bytes=0,
    flops=32 * model * 1.25,
    hbm_traffic_bytes=1e9,
    collectives=(),
    unknown_trip_counts=0,
    compile_seconds=0.0,
  )
  bound = estimates.compiled_bound(workload, cost, chip, per_chip_batch=32)
  # Compute-bound: 25% more executed FLOPs than the model's (remat, padding) -> 80%.
  assert bound["bound"] == "compute" and abs(bound["mfu"] - 0.8) < 1e-9
  slow = dataclasses.replace(
    cost, hbm_traffic_bytes=cost.flops / chip.bf16_flops * chip.hbm_bytes_per_s * 2
  )
  bound = estimates.compiled_bound(workload, slow, chip, per_chip_batch=32)
  assert bound["bound"] == "memory" and abs(bound["mfu"] - 0.4) < 1e-9
