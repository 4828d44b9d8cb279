"""The wording of a config check, shared by every subsystem's `validate_*`.

Each subsystem checks its own keys beside its code (models/vit.py,
models/mae.py, models/dit.py, models/attention, data/sources.py,
data/augment.py, data/locality.py, optimizer.py, parallel.py,
diffusion/sampling.py, evaluation/sample_quality.py, trainers/loop.py); a
trainer's `validate` calls them in turn before anything loads or compiles. A
failed check is a ValueError that names the key, the value and what is allowed.
"""

from __future__ import annotations


def require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def check_choice(key: str, value, allowed) -> None:
  require(
    value in allowed, f"config.{key}={value!r} is not allowed; choose one of {list(allowed)}."
  )


def check_positive(key: str, value, *, allow_zero=False) -> None:
  ok = value >= 0 if allow_zero else value > 0
  require(ok, f"config.{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}.")


def named(key: str, check, *args):
  """Runs `check(*args)`, prefixing its ValueError with the config key."""
  try:
    return check(*args)
  except ValueError as e:
    raise ValueError(f"config.{key}: {e}") from None
