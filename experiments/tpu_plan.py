r"""docs/tpu_plan.md from real compiles: a TPU slice for every README experiment.

For every row of README.md's experiments table, each of its training
commands (`python -m pixel_vit.main ...`, the paper's global batch and
schedule as the configs give them) is compiled with `python -m
pixel_vit.compile` for the slices of LADDER in order, until every program
of every command of the row fits; that is the row's slice. DiT rows
include the sampler (the `sample` program, what `pixel_vit.sample` runs).

Each compile runs in a fresh process, exactly as a user runs it, and
leaves its report (the command's --json_out) in docs/tpu_plan_runs/; a
report already there for the same command, slice and jax/libtpu versions is
read instead of compiled again, so an interrupted plan continues where it
stopped. These are compiles, not runs: no TPU has run these programs. The
step time and chip-hours are estimates from the compiled FLOPs and HBM
traffic against the chip's published peaks.

  python -m experiments.tpu_plan                  # everything (hours on 2 cores)
  python -m experiments.tpu_plan --match=DiT      # the rows whose name contains DiT
  python -m experiments.tpu_plan --report_only    # rewrite docs/tpu_plan.md from the reports
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import time

from experiments import readme_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(REPO, "docs", "tpu_plan_runs")
PLAN = os.path.join(REPO, "docs", "tpu_plan.md")

# The slices tried, in order: v5e (the cheapest chip) from 4 to 64 chips,
# then v5p (6x the HBM per chip) from 4 to 64 chips. A row that fits none
# says so, with the compiler's numbers.
LADDER = (
  "v5e:2x2",
  "v5e:2x4",
  "v5e:4x4",
  "v5e:4x8",
  "v5e:8x8",
  "v5p:2x2x1",
  "v5p:2x2x2",
  "v5p:2x2x4",
  "v5p:2x4x4",
  "v5p:4x4x4",
)


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  commands: tuple[tuple[str, ...], ...]  # each: the compile flags (--config, --config.K=V)


def readme_rows() -> list[Row]:
  """The experiments table's rows and their training commands' config flags
  (`pixel_vit.main` commands; a DiT row's sampler is one of its programs)."""
  return [
    Row(
      name,
      tuple(
        tuple(w for w in shlex.split(command) if w.startswith("--config"))
        for command in commands
        if command.startswith("python -m pixel_vit.main ")
      ),
    )
    for name, commands in readme_table.rows()
  ]


def versions() -> str:
  return "jax {} libtpu {}".format(*(importlib.metadata.version(p) for p in ("jax", "libtpu")))


def report_path(flags: tuple[str, ...], topology: str) -> str:
  text = " ".join(flags)
  key = hashlib.sha256(text.encode()).hexdigest()[:8]
  name = re.sub(r"[^A-Za-z0-9]+", "_", text.replace("--config=configs/", "").replace(".py", ""))
  return os.path.join(RUNS, f"{name.strip('_')[:70]}__{key}__{topology.replace(':', '_')}.json")


def compile_report(flags: tuple[str, ...], topology: str, *, recompile: bool) -> dict:
  """The compile command's report for `flags` on `topology` (read back if done)."""
  path = report_path(flags, topology)
  if os.path.exists(path) and not recompile:
    with open(path) as f:
      record = json.load(f)
    # Errors (not a memory refusal) are compiled again: they may have been
    # the machine's, not the config's.
    if (
      record.get("flags") == list(flags)
      and record.get("versions") == versions()
      and "error" not in record
    ):
      return record
  os.makedirs(RUNS, exist_ok=True)
  command = [
    sys.executable,
    "-m",
    "pixel_vit.compile",
    f"--topology={topology}",
    f"--json_out={path}.part",
    *flags,
  ]
  print(f"[plan] {' '.join(shlex.quote(c) for c in command[1:])}", flush=True)
  start = time.time()
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  if not os.path.exists(f"{path}.part"):  # an error before any report: keep its message
    stderr = result.stderr.strip()
    message = (
      stderr.split("\nerror: ")[-1].splitlines()[0]
      if "\nerror: " in stderr
      else " | ".join(stderr.splitlines()[-3:]) or "no output"
    )
    record = dict(error=message)
  else:
    with open(f"{path}.part") as f:
      record = json.load(f)
    os.remove(f"{path}.part")
  record.update(
    flags=list(flags),
    topology=topology,
    versions=versions(),
    exit_code=result.returncode,
    wall_seconds=round(time.time() - start, 1),
    date=datetime.date.today().isoformat(),
  )
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  print(
    f"[plan]   exit {result.returncode} in {record['wall_seconds']:.0f} s: "
    f"{'fits' if record.get('fits') else record.get('error') or 'does not fit'}",
    flush=True,
  )
  return record


def plan_row(row: Row, report_for) -> dict:
  """The first slice of LADDER on which every command of `row` fits, with
  each command's report there and the slices refused before it.
  `report_for(flags, topology)` gives a report, or None when there is none
  (--report_only): then the row is left unplanned."""
  tried = []
  for topology in LADDER:
    reports = []
    for flags in row.commands:
      record = report_for(flags, topology)
      if record is None:
        return dict(row=row, topology=None, reports=[], tried=tried, missing=True)
      reports.append(record)
      if not record.get("fits"):
        break
    tried.append((topology, reports))
    if all(r.get("fits") for r in reports) and len(reports) == len(row.commands):
      return dict(row=row, topology=topology, reports=reports, tried=tried, missing=False)
    if any("error" in r for r in reports):  # not a memory limit: bigger slices will not help
      break
  return dict(row=row, topology=None, reports=[], tried=tried, missing=False)


def stored_report(flags: tuple[str, ...], topology: str) -> dict | None:
  path = report_path(flags, topology)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------- the report

GIB = 2**30


def _refusal_note(record: dict) -> str:
  if "error" in record:
    return record["error"]
  refused = [f"{r['program']}: {r['compiler_says'].rstrip('.')}" for r in record.get("refused", [])]
  over = [
    f"{p['name']} peak {p['peak_bytes'] / GIB:.1f} GiB"
    for p in record.get("programs", [])
    if p["margin_bytes"] < 0
  ]
  return "; ".join(refused + over)


def _collectives(program: dict) -> str:
  return (
    ", ".join(
      f"{c['kind']} {c['count']:g}x {c['bytes'] / GIB:.2g} GiB" for c in program["collectives"]
    )
    or "none"
  )


def _duration(seconds: float) -> str:
  return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def _auto_choices(record: dict) -> str:
  """'remat full, attention splash' (encoder and decoder alike count once)."""
  seen = dict.fromkeys(
    f"{c['setting'].split('=')[0].split('.')[-1]} {c['chose']}"
    for c in record["choices"]
    if "train_step" in c["programs"]
  )
  return ", ".join(seen)


def slice_summary(entry: dict) -> str:
  """README's "TPU slice" cell of a row, e.g. 'v5e-4: 6.4 GiB / chip' (the
  largest peak of its programs; tests/test_tpu_plan.py holds README to it)."""
  if entry["missing"]:
    return "not compiled yet"
  if entry["topology"] is None:
    return f"fits none up to {LADDER[-1]}"
  peak = max(p["peak_bytes"] for r in entry["reports"] for p in r["programs"])
  name = entry["reports"][0]["slice"].replace("v5litepod-", "v5e-")
  return f"{name}: {peak / GIB:.1f} GiB / chip"


def format_plan(planned: list[dict]) -> str:
  lines = [
    "# The paper's experiments on TPU: slices from real compiles",
    "",
    "<!-- written by python -m experiments.tpu_plan; do not edit by hand -->",
    "",
    "**These are compiles, not runs.** No TPU has run these programs. Each row's",
    "training command(s) from README's experiments table, with the paper's global",
    "batch and the config's schedule, were compiled by `python -m pixel_vit.compile`",
    "on a 2-core CPU machine with libtpu (the real TPU compiler, Mosaic kernels",
    "included) for compile-only TPU devices, trying the slices "
    + ", ".join(f"`{t}`" for t in LADDER)
    + " in order;",
    "the first on which every program of every command fits is the row's slice",
    "(data parallel, as the configs are: `config.mesh.fsdp` would shard the state).",
    "",
    "- *train step*: its peak memory per chip (arguments, outputs and live",
    "  temporaries, the compiler's figure) and what is left of the HBM the",
    "  compiler lets a program use; its matmul FLOPs per chip, counted in the",
    "  traced program (every scan iteration and Pallas kernel block); an estimate",
    "  of its HBM traffic from the compiled HLO (each fusion reads its operands",
    "  and writes its result once); its collectives per step and chip.",
    "- *other programs*: the evaluation step, MAE's reconstruction grid, DiT's",
    "  sampler (250 steps at `config.fid.batch_size`, guidance 1.5): their peaks.",
    "- *est. step / chip-hours*: an **estimate**, not a measurement: max(FLOPs /",
    "  bf16 peak, HBM traffic / HBM bandwidth) per step, times the config's",
    "  training steps and the slice's chips; evaluation and input not included.",
    "  Real steps reach perhaps 40-70% of such a bound. The configs compute in",
    "  float32 as written (`--config.model.dtype=bfloat16` halves activations and",
    "  their traffic), which is why every row is memory-bound.",
    "",
    "| experiment | command | slice | train step: peak / left GiB | TFLOP | HBM traffic GiB "
    "| collectives | other programs: peak GiB | auto | est. step | steps | est. chip-hours "
    "| compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  notes = []
  for entry in planned:
    row = entry["row"]
    if entry["missing"] or entry["topology"] is None:
      lines.append(f"| {row.name} | | **{slice_summary(entry)}** |" + " |" * 10)
      if not entry["missing"] and entry["tried"]:
        last_topology, last_reports = entry["tried"][-1]
        notes.append(
          f"- {row.name}: on {last_topology}: "
          + "; ".join(_refusal_note(r) for r in last_reports if not r.get("fits"))
        )
      continue
    for record in entry["reports"]:
      programs = {p["name"]: p for p in record["programs"]}
      train = programs["train_step"]
      others = ", ".join(
        f"{name} {p['peak_bytes'] / GIB:.2f}"
        for name, p in programs.items()
        if name != "train_step"
      )
      estimate = record["estimate"]
      compile_s = sum(p["compile_seconds"] for p in programs.values())
      lines.append(
        f"| {row.name} | `{' '.join(record['flags'])}` | {record['slice']} | "
        f"{train['peak_bytes'] / GIB:.2f} / {train['margin_bytes'] / GIB:.2f} | "
        f"{train['flops'] / 1e12:.3g} | {train['hbm_traffic_bytes'] / GIB:.3g} | "
        f"{_collectives(train)} | {others} | {_auto_choices(record)} | "
        f"{_duration(estimate['step_seconds'])} ({estimate['bound']}) | "
        f"{estimate['steps']:,} | {estimate['chip_hours']:.3g} | {compile_s:.0f} |"
      )
    refused = [(t, r) for t, reports in entry["tried"][:-1] for r in reports if not r.get("fits")]
    if refused:
      notes.append(f"- {row.name}: " + "; ".join(f"`{t}`: {_refusal_note(r)}" for t, r in refused))
  if notes:
    lines += ["", "## Smaller slices the compiler refused", ""] + notes
  reports = [r for entry in planned for _, tried in entry["tried"] for r in tried]
  dates = sorted({r["date"] for r in reports if "date" in r}) or ["?"]
  when = f"from {dates[0]} to {dates[-1]}" if len(dates) > 1 else f"on {dates[0]}"
  built = ", ".join(sorted({r["versions"] for r in reports if "versions" in r})) or versions()
  lines += [
    "",
    f"Compiled with {built} {when} (compile "
    "seconds on 2 shared CPU cores); reports in `docs/tpu_plan_runs/`. Regenerate: "
    "`python -m experiments.tpu_plan` (about an hour on 2 cores; reports already "
    "there for the same command and versions are reused).",
    "",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.tpu_plan", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--match", default="", help="only rows whose name contains this")
  parser.add_argument(
    "--report_only",
    action="store_true",
    help="compile nothing: rewrite the plan from the reports there are",
  )
  parser.add_argument("--recompile", action="store_true", help="ignore existing reports")
  args = parser.parse_args(argv)
  if args.report_only:
    report_for = stored_report
  else:

    def report_for(flags, topology):
      return compile_report(flags, topology, recompile=args.recompile)

  planned = []
  for row in readme_rows():
    if args.match not in row.name:
      continue
    print(f"[plan] {row.name}: {len(row.commands)} command(s)", flush=True)
    planned.append(plan_row(row, report_for))
  for entry in planned:
    print(f"[plan] {entry['row'].name}: {slice_summary(entry)}")
  if args.match and not args.report_only:
    print(format_plan(planned))
    return 0
  with open(PLAN, "w") as f:
    f.write(format_plan(planned))
  print(f"[plan] wrote {PLAN}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
