"""The trainers of the three tasks, by `config.task`.

Only names here: a trainer module (JAX, Flax, TensorFlow) is imported when
`trainer_for` asks for it, so a command checks its command line first and
such an error comes in seconds.
"""

from __future__ import annotations

import importlib

# config.task -> the trainer module.
TRAINERS = {
  "classification": "pixel_vit.trainers.classification",
  "mae": "pixel_vit.trainers.mae",
  "diffusion": "pixel_vit.trainers.diffusion",
}


def trainer_for(config):
  """The trainer module of `config.task` (validate, make_model_fn, programs, ...)."""
  if config.task not in TRAINERS:
    raise ValueError(
      f"config.task={config.task!r} is not a task; choose one of {sorted(TRAINERS)}."
    )
  return importlib.import_module(TRAINERS[config.task])
