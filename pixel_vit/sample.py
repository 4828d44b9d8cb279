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

import json
import os

import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from pixel_vit import checkpoint, command_line, distributed
from pixel_vit.diffusion import generation
from pixel_vit.evaluation import pictures, sample_quality
from pixel_vit.trainers import diffusion, loop

# The command's flags, defined by `define_flags` only when run as a command:
# pixel_vit.main defines --config and --workdir too, and a process that
# imports both (tests, other tools) may define each flag only once.
_FLAGS = {}


def define_flags() -> None:
  _FLAGS.update(
    config=config_flags.DEFINE_config_file(
      "config", None, "The diffusion run's config file.", lock_config=True
    ),
    workdir=flags.DEFINE_string("workdir", None, "The trained run's workdir."),
    num_samples=flags.DEFINE_integer(
      "num_samples", 50_000, "How many samples to generate (50,000 for the paper's FID)."
    ),
    out=flags.DEFINE_string(
      "out",
      "",
      "Output path without extension (default: <workdir>/"
      "samples/<sampler><steps>_cfg<scale>_step<step>_n<N>).",
    ),
  )


def sample_and_evaluate(config, workdir: str, *, num_samples: int, out: str = "") -> dict:
  """Restores a trained workdir's EMA parameters, generates `num_samples`
  (ADM's npz: `arr_0` uint8 images, `arr_1` labels), a grid PNG, and the
  metrics of config.fid.features; writes them under `<workdir>/samples/`."""
  if not checkpoint.workdir_has_checkpoint(workdir):
    raise ValueError(
      f"{workdir} holds no checkpoint to sample from; train first with "
      f"python -m pixel_vit.main --config=<the same config> --workdir={workdir}"
    )
  plan = loop.plan(config, diffusion.make_model_fn)
  run = loop.start(config, workdir, plan, read_only=True)
  state = run.state
  params = state.ema_params if state.ema_params is not None else state.params
  step = run.start_step
  generator = diffusion.run_generator(run, cfg_scale=config.sample.cfg_scale)
  name = (
    f"{config.sample.sampler}{config.sample.steps}_cfg{config.sample.cfg_scale:g}"
    f"_step{step}_n{num_samples}"
  )
  out = out or os.path.join(workdir, "samples", name)
  extractor = sample_quality.feature_extractor(config)
  if extractor is not None:
    reference = sample_quality.reference_for(config, extractor, plan.train_split, generator.decode)
    metrics, images, labels = sample_quality.sample_metrics(
      config,
      generator,
      params,
      extractor,
      reference,
      num_samples=num_samples,
      reporter=run.reporter,
    )
  else:
    metrics = {}
    images, labels = generation.generate(
      config, generator, params, num_samples, reporter=run.reporter
    )
  if run.reporter.is_main:
    epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
    with epath.Path(out + ".npz").open("wb") as f:
      np.savez(f, arr_0=pictures.to_uint8(images), arr_1=labels.astype(np.int32))
    pictures.save_png(out + ".png", sample_quality.sample_grid_by_class(images, labels))
    epath.Path(out + ".config.json").write_text(  # the sampling config, beside its output
      config.to_json_best_effort(indent=2, sort_keys=True)
    )
    epath.Path(out + ".json").write_text(
      json.dumps(
        {
          "step": step,
          "num_samples": num_samples,
          "sampler": config.sample.sampler,
          "steps": str(config.sample.steps),
          "cfg_scale": config.sample.cfg_scale,
          "features": config.fid.features,
          **{k: float(v) for k, v in metrics.items()},
        },
        indent=2,
      )
    )
    run.reporter.log(
      f"wrote {out}.npz / .png / .json / .config.json: "
      + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    )
  run.checkpointer.close()
  run.reporter.close()
  return metrics


def main(argv):
  del argv
  with command_line.stops_with_one_message():
    distributed.initialize_from_flags()  # before any JAX backend use
    config = _FLAGS["config"].value
    num_samples = _FLAGS["num_samples"].value
    if config.task != "diffusion":
      raise ValueError(
        f"config.task={config.task!r}: pixel_vit.sample samples diffusion runs "
        "(configs/dit_pixel.py)."
      )
    if num_samples < 1:
      raise ValueError(f"--num_samples={num_samples} must be >= 1.")
    diffusion.validate(config)
    metrics = sample_and_evaluate(
      config, _FLAGS["workdir"].value, num_samples=num_samples, out=_FLAGS["out"].value
    )
    logging.info("metrics: %s", metrics)


if __name__ == "__main__":
  define_flags()
  # Required only when run as a command, so that importing this module (tests,
  # other tools) does not make every later absl flag parse demand them.
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=command_line.parse_flags)
