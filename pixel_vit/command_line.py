"""The command line of `pixel_vit.main` / `pixel_vit.sample`, checked before
absl parses it: a config file that does not exist, a config argument the file
refuses, or a `--config.KEY` override naming no key is a one-paragraph error
naming the argument and the fix (with the closest existing keys), not a
traceback, and it comes in seconds (no trainer is imported yet).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import re
import sys

import ml_collections
from absl import app, flags, logging

_TRACEBACK = flags.DEFINE_bool(
  "traceback",
  False,
  "Show the traceback of an error that stops the run (by default only its message).",
)

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class CommandLineError(ValueError):
  """A --config or --config.KEY argument that cannot work, found before parsing."""


def config_argument(argv: list[str]) -> str | None:
  """The value of the last --config (`--config=V` or `--config V`) in argv."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    match = re.match(r"^--?config(?:=(.*))?$", arg)
    if match:
      value = match.group(1) if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _override_keys(argv: list[str]) -> list[str]:
  """'optimizer.lr' for every --config.optimizer.lr=... (or --noconfig.KEY) in argv."""
  keys = []
  for arg in argv[1:]:
    if arg == "--":
      break
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if match:
      keys.append(match.group(1))
  return keys


def _available_configs(path: str) -> str:
  directory = os.path.dirname(path) or "."
  for where in (directory, REPO_CONFIGS):
    if os.path.isdir(where):
      names = sorted(f for f in os.listdir(where) if f.endswith(".py") and f[0] != "_")
      if names:
        close = difflib.get_close_matches(os.path.basename(path), names, n=1)
        hint = f"Did you mean {os.path.join(where, close[0])}? " if close else ""
        return f"{hint}The configs in {where} are {', '.join(names)}."
  return "Run from the repository root, where configs/ is."


def load_config(argument: str) -> ml_collections.ConfigDict:
  """`configs/X.py[:ARGS]` -> the config, as --config would load it; a missing
  file or an argument get_config refuses is a CommandLineError."""
  path, colon, arg = argument.partition(":")
  if not os.path.isfile(path):
    raise CommandLineError(
      f"--config={argument}: there is no config file {path} (looked for "
      f"{os.path.abspath(path)}). {_available_configs(path)} Pass one of them, e.g. "
      "--config=configs/cls_pixel.py:quick."
    )
  spec = importlib.util.spec_from_file_location("pixel_vit_command_line_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module.get_config(*([arg] if colon else []))
  except ValueError as e:
    raise CommandLineError(f"--config={argument}: {e}") from None


def _dotted_keys(node, prefix: str = "") -> list[str]:
  keys = []
  for name in node.keys():
    dotted = f"{prefix}{name}"
    keys.append(dotted)
    value = node[name]
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      keys.extend(_dotted_keys(value, dotted + "."))
  return keys


def _closest_keys(config, parent: str, wrong: str, n: int = 3) -> list[str]:
  """Existing dotted keys nearest to `parent.wrong`: its siblings first, then
  keys of that name (or close) elsewhere, then by the whole dotted path."""
  node = config
  for name in filter(None, parent.split(".")):
    node = node[name]
  prefix = f"{parent}." if parent else ""
  close = [
    prefix + name for name in difflib.get_close_matches(wrong, sorted(node.keys()), n=n, cutoff=0.6)
  ]
  keys = _dotted_keys(config)
  leaves = {key: key.rsplit(".", 1)[-1] for key in keys}
  for name in difflib.get_close_matches(wrong, sorted(set(leaves.values())), n=n, cutoff=0.75):
    close.extend(key for key, leaf in leaves.items() if leaf == name)
  close.extend(difflib.get_close_matches(prefix + wrong, keys, n=n, cutoff=0.75))
  return list(dict.fromkeys(close))[:n]


def check_override_keys(config, keys: list[str], argument: str) -> None:
  """Every `--config.KEY` names a key of `config`; else a CommandLineError with
  the closest existing keys."""
  for key in keys:
    parts = re.sub(r"\[[^\]]*\]", "", key).split(".")  # a tuple element: key[0]
    node = config
    for depth, name in enumerate(parts):
      parent = ".".join(parts[:depth])
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        raise CommandLineError(
          f"--config.{key}: config.{parent}={node!r} is a single value, not a group of "
          f"keys; override it as a whole, --config.{parent}=VALUE."
        )
      if name not in node:
        wrong = ".".join(parts[: depth + 1])
        close = _closest_keys(config, parent, name)
        suggestion = (
          f"Did you mean {' or '.join(f'--config.{c}' for c in close)}? " if close else ""
        )
        siblings = sorted(node.keys())
        where = f"config.{parent}" if parent else "config"
        listing = f"The keys of {where} are {', '.join(siblings)}." if len(siblings) <= 30 else ""
        raise CommandLineError(
          f"--config.{key}: the config from --config={argument} has no key "
          f"config.{wrong}, so the override would be refused (unknown keys cannot be "
          f"added). {suggestion}{listing}"
        )
      node = node[name]


def check_command_line(argv: list[str]) -> None:
  """Loads the --config file and checks every --config.KEY against it, before
  absl parses the flags (which would end in a long traceback)."""
  argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # expands --flagfile
  argument = config_argument(argv)
  if argument is None:
    return  # absl reports the missing required flag
  keys = _override_keys(argv)
  config = load_config(argument)
  check_override_keys(config, keys, argument)


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: `check_command_line`, then absl's own parsing."""
  try:
    check_command_line(argv)
  except CommandLineError as e:
    sys.stderr.write(f"{os.path.basename(argv[0])}: error: {e}\n")
    sys.exit(2)
  return app.parse_flags_with_usage(argv)


@contextlib.contextmanager
def stops_with_one_message():
  """Errors the user must act on end the command with their message, exit 1."""
  from pixel_vit import checkpoint
  from pixel_vit import workdir as workdir_lib
  from pixel_vit.trainers import divergence

  try:
    yield
  except (
    ValueError,
    checkpoint.CheckpointSaveError,
    checkpoint.NoRestorableCheckpointError,
    divergence.TrainingDivergedError,
    workdir_lib.WorkdirInUseError,
  ) as e:
    if _TRACEBACK.value:
      raise
    logging.error("%s", e)
    sys.stderr.write(f"\nerror: {e}\n(--traceback shows where it was raised)\n")
    sys.exit(1)
