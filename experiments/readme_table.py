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


def rows(path: str = README) -> list[tuple[str, list[str]]]:
  """[(experiment, [its commands, in order])] of the table's rows."""
  with open(path) as f:
    match = TABLE.search(f.read())
  if not match:
    raise ValueError(f"{path} has no <!-- experiments-table --> section")
  table = match.group(1).strip().splitlines()[2:]  # past the header and its rule
  return [(line.split("|")[1].strip(), COMMAND.findall(line)) for line in table]
