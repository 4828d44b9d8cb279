"""experiments/tpu_plan.py: a row's slice is the first of the ladder on which
every command fits, and README's "TPU slice" column is what the committed
compile reports (docs/tpu_plan_runs) say."""

from experiments import readme_table, tpu_plan


def _fits(flags, topology):
  return {"fits": True, "flags": list(flags), "topology": topology}


def test_the_slice_is_the_first_on_which_every_command_fits():
  row = tpu_plan.Row("x", (("--config=a",), ("--config=b",)))
  refused_until = {"--config=a": 2, "--config=b": 3}  # b needs the 4th slice

  def report_for(flags, topology):
    fits = tpu_plan.LADDER.index(topology) >= refused_until[flags[0]]
    return {**_fits(flags, topology), "fits": fits}

  entry = tpu_plan.plan_row(row, report_for)
  assert entry["topology"] == tpu_plan.LADDER[3]
  assert [t for t, _ in entry["tried"]] == list(tpu_plan.LADDER[:4])
  # a slice stops at its first refused command
  assert [len(reports) for _, reports in entry["tried"]] == [1, 1, 2, 2]
  none = tpu_plan.plan_row(row, lambda flags, topology: {**_fits(flags, topology), "fits": False})
  assert none["topology"] is None and not none["missing"]
  assert tpu_plan.slice_summary(none) == f"fits none up to {tpu_plan.LADDER[-1]}"
  error = tpu_plan.plan_row(row, lambda flags, topology: {"error": "no libtpu"})
  assert len(error["tried"]) == 1  # not a memory limit: bigger slices are not tried
  assert tpu_plan.plan_row(row, lambda flags, topology: None)["missing"]


def test_readme_tpu_slice_column_is_what_the_committed_reports_say():
  cells = readme_table.column("TPU slice")
  rows = tpu_plan.readme_rows()
  assert set(cells) == {row.name for row in rows}
  for row in rows:
    entry = tpu_plan.plan_row(row, tpu_plan.stored_report)
    assert cells[row.name] == tpu_plan.slice_summary(entry), row.name
