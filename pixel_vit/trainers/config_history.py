"""Every start's config, kept in the workdir, and what a resume changes.

The first start writes `config.json`; each resume writes its own as
`configs/start_<STEP>.json` (the step it resumed from), so the workdir says
how every stretch of steps was trained. A resume lists the keys that differ
from the last start. Keys that change what the trained steps mean for exact
resume (the seed, the global batch, the data: its source, split, size or
permutation) are refused unless `config.resume_with_changes=True`; the rest
(learning rate, length, periods, ...) are applied and reported.
"""

from __future__ import annotations

import json
import re

import jax
from etils import epath

FIRST = "config.json"
LATER = "configs"
# Keys whose change makes the resumed steps differ from the uninterrupted
# run's order or meaning (exact resume is a function of these).
DATA_ORDER_KEYS = ("seed", "batch_size", "data.")
# Keys that say how a run is operated, not how it trains: never reported.
OPERATIONAL_KEYS = ("take_over_lock", "resume_with_changes", "data.workers")


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _as_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def last_start(workdir: str) -> dict | None:
  """The config of the workdir's last start (None: no record)."""
  directory = epath.Path(workdir)
  later = [
    (int(m.group(1)), path)
    for path in (directory / LATER).glob("start_*.json")
    if (m := re.fullmatch(r"start_(\d+)\.json", path.name))
  ]
  path = max(later)[1] if later else directory / FIRST
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError:
    return None  # an unreadable record is no reason to refuse a resume


def changes(previous: dict, config) -> dict[str, tuple]:
  """{dotted key: (last start's value, this one's)} for every key both record
  that differs (a key only one side has came or went with a code version)."""
  before, now = _flat(previous), _flat(_as_json(config))
  return {
    key: (before[key], now[key])
    for key in sorted(set(before) & set(now))
    if before[key] != now[key] and not key.startswith(OPERATIONAL_KEYS)
  }


def check_resume(workdir: str, config, start_step: int) -> dict[str, tuple]:
  """Before a resume from `start_step` restores anything: the keys that
  differ from the last start; a data-order change is refused (ValueError)
  unless config.resume_with_changes. {} for a fresh start."""
  previous = last_start(workdir) if start_step > 0 else None
  if previous is None:
    return {}
  changed = changes(previous, config)
  order = [key for key in changed if key.startswith(DATA_ORDER_KEYS)]
  if order and not config.get("resume_with_changes", False):
    listed = "; ".join(f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in order)
    raise ValueError(
      f"resuming {workdir} at step {start_step} with {listed}: that changes the data "
      "order or what a step means, so the run would no longer be the uninterrupted one "
      "its first steps belong to. Set them back, use a fresh --workdir, or accept it "
      "with --config.resume_with_changes=True (every start's config is kept in the "
      "workdir)."
    )
  return changed


def record(workdir: str, config, start_step: int, changed: dict[str, tuple], log) -> None:
  """Logs what `check_resume` found changed, then keeps this start's config
  (process 0): config.json for the first start, configs/start_<STEP>.json after."""
  for key, (before, now) in changed.items():
    log(f"resumed at step {start_step} with config.{key} changed: {before!r} -> {now!r}")
  if jax.process_index() != 0:
    return
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  if start_step > 0 and (directory / FIRST).exists():
    path = directory / LATER / f"start_{start_step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
  else:
    path = directory / FIRST
  path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
