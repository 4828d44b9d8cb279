"""Entry point: `python -m pixel_vit.main --config=configs/X.py[:ARGS] --workdir=DIR`.

Joins a multi-process run when asked (`--coordinator_address/--num_processes/
--process_id`, or `--distributed=auto`; see `pixel_vit/distributed.py` and
launch/README.md), validates the config, then hands over to the trainer
named by `config.task`.

The command line is checked before absl parses it (`command_line.py`), and
the trainers are imported only then, so such an error comes in seconds. A
run that stops for a reason the user must act on (divergence, a failed save,
a workdir in use, no readable checkpoint, bad input) ends with that one
message and exit code 1; `--traceback` shows where it came from.
"""

from __future__ import annotations

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from pixel_vit import command_line, distributed
from pixel_vit import workdir as workdir_lib
from pixel_vit.trainers import trainer_for

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:args]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Directory for checkpoints, logs and pictures; a run resumes from it automatically.",
)


class _HideLibraryChatter(std_logging.Filter):
  """Keeps orbax's per-save INFO lines out of the run log (warnings still show)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_HideLibraryChatter())
  with command_line.stops_with_one_message():
    # First: JAX fixes its device set when a backend starts (validation below
    # asks for the device count).
    distributed.initialize_from_flags()
    config = _CONFIG.value
    workdir_lib.check_writable(_WORKDIR.value)
    trainer = trainer_for(config)
    trainer.validate(config)
    logging.info("config:\n%s", config.to_json_best_effort(indent=2))
    trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  # Required only when run as a command, so that importing this module (tests,
  # other tools) does not make every later absl flag parse demand them.
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=command_line.parse_flags)
