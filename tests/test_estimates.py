"""benchmarks/estimates.py: the on-paper GPU/TPU MFU table is consistent with
its own model (flash never moves more bytes than materialised scores, longer
sequences shift xla towards memory-bound) and names what `auto` picks."""
from benchmarks import estimates
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
