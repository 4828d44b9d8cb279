"""Sampling and evaluation of a trained diffusion run:
`python -m pixel_vit.sample --config=configs/dit_pixel.py[:ARGS] --workdir=DIR --num_samples=N`.

Restores the workdir's newest checkpoint (EMA parameters), generates N
class-balanced samples over all devices with `config.sample` (sampler,
steps, guidance scale), and writes `<workdir>/samples/<name>.npz` (ADM's
format: `arr_0` uint8 images, `arr_1` labels, so ADM's evaluator can read
it), a grid `.png` (one row per class, any number of samples), the metrics
of `config.fid.features` as `.json` and the sampling config as
`.config.json`; the run's own `config.json` (how it was trained) is left as
it is, and sampling takes no workdir lock, so it may run while training goes on.
Pass the config the run was trained with; overrides such as
`--config.sample.cfg_scale=1.0` or `--config.sample.steps=ddim50` change only
the sampling. Multi-process: the same distributed flags as `pixel_vit.main`.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from pixel_vit import command_line, distributed
from pixel_vit.trainers import diffusion

_CONFIG = config_flags.DEFINE_config_file("config", None, "The diffusion run's config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's workdir.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 50_000, "How many samples to generate "
                                    "(50,000 for the paper's FID).")
_OUT = flags.DEFINE_string("out", "", "Output path without extension (default: "
                           "<workdir>/samples/<sampler><steps>_cfg<scale>_step<step>_n<N>).")


def main(argv):
  del argv
  with command_line.stops_with_one_message():
    distributed.initialize_from_flags()  # before any JAX backend use
    config = _CONFIG.value
    if config.task != "diffusion":
      raise ValueError(f"config.task={config.task!r}: pixel_vit.sample samples diffusion runs "
                       "(configs/dit_pixel.py).")
    if _NUM_SAMPLES.value < 1:
      raise ValueError(f"--num_samples={_NUM_SAMPLES.value} must be >= 1.")
    diffusion.validate(config)
    metrics = diffusion.sample_and_evaluate(config, _WORKDIR.value,
                                            num_samples=_NUM_SAMPLES.value, out=_OUT.value)
    logging.info("metrics: %s", metrics)


if __name__ == "__main__":
  # Required only when run as a command, so that importing this module (tests,
  # other tools) does not make every later absl flag parse demand them.
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=command_line.parse_flags)
