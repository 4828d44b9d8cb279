"""README.md's experiments table (between `<!-- experiments-table -->`
markers): each row's experiment and its commands, for the scripts and tests
that act on every experiment (experiments/tpu_plan.py,
tests/test_readme_commands.py)."""

from __future__ import annotations

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TABLE = re.compile(r"<!-- experiments-table -->(.*?)<!-- /experiments-table -->", re.S)
COMMAND = re.compile(r"`(python -m pixel_vit\.(?:main|sample) [^`]+)`")


def _lines(path: str) -> list[str]:
  """The table's lines: its header, then its rows (past the rule)."""
  with open(path) as f:
    match = TABLE.search(f.read())
  if not match:
    raise ValueError(f"{path} has no <!-- experiments-table --> section")
  header, _, *table = match.group(1).strip().splitlines()
  return [header, *table]


def _cells(line: str) -> list[str]:
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def rows(path: str = README) -> list[tuple[str, list[str]]]:
  """[(experiment, [its commands, in order])] of the table's rows."""
  return [(_cells(line)[0], COMMAND.findall(line)) for line in _lines(path)[1:]]


def column(header: str, path: str = README) -> dict[str, str]:
  """{experiment: its cell} of the column whose header starts with `header`."""
  head, *table = _lines(path)
  index = next(i for i, name in enumerate(_cells(head)) if name.startswith(header))
  return {_cells(line)[0]: _cells(line)[index] for line in table}
