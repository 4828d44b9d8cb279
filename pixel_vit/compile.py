r"""Compile a run for a TPU slice on any machine, and show whether it fits:
`python -m pixel_vit.compile --config=configs/X.py[:ARGS] --topology=v5p:2x2x4`.

Builds the run as `pixel_vit.main` would (model, optimizer, state shardings,
`config.mesh` laid over the slice's devices; several slices with
`--num_slices`, their DCN split by `config.mesh.dcn`) and lowers and
compiles, with the real TPU compiler (libtpu: `pip install -e '.[tpu]'`; no
TPU needed), every jitted program the task runs: the train step, the
evaluation step, and for MAE the reconstruction grid, for DiT the sampler.
It reads no data (image shape and class count come from a table of known
datasets, `sources.KNOWN_DATASETS`, or --image_shape / --num_classes) and
touches no workdir. These are compiles, not runs: nothing executes.

GPUs too, with jax's CUDA plugin (`pip install 'jax[cuda12]'`, several GB;
no GPU needed): `--topology=h100:8` compiles for 8 compile-only H100s from
a description of the GPU (`hardware.gpu_devices`); the GPU compiler refuses
nothing for memory, so the peak is checked against what JAX's allocator
takes by default (75% of the device).

It prints, per device: arguments, outputs, temporaries and generated code
against the chip's HBM with the margin, the matmul FLOPs and estimated HBM
traffic per call, the collectives (kind, count, bytes) from the compiled
HLO, what `attention=auto` / `remat=auto` chose and why, the compile time,
and an estimate of the train step's time and the chip-hours of the
config's schedule (FLOPs and traffic against the chip's peaks: a bound, not
a measurement). Exit 0 when every program fits; 1 when one does not, with
one message naming it, the bytes and the knobs that would help.

  python -m pixel_vit.compile --config=configs/dit_pixel.py:variant=L/1 --topology=v5p:2x2x2
  python -m pixel_vit.compile --config=configs/cls_pixel.py:variant=S/1,dataset=imagenet28 \
      --topology=v5litepod-16 --config.model.attention=chunked --json_out=/tmp/s1.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from pixel_vit import command_line, hardware
from pixel_vit.trainers import trainer_for

GIB = hardware.GIB

_FLAGS = {}


def define_flags() -> None:
  """The command's flags (defined only when run as a command: pixel_vit.main
  defines --config too, and a process may define each flag once)."""
  _FLAGS.update(
    config=config_flags.DEFINE_config_file(
      "config",
      None,
      "The run's config file (configs/*.py[:args]), as for pixel_vit.main.",
      lock_config=True,
    ),
    topology=flags.DEFINE_string(
      "topology",
      None,
      "The TPU slice: GENERATION:SHAPE "
      "(v5e:4x4, v5p:2x2x4, v4:2x2x1, v6e:2x4) or an "
      "accelerator type (v5litepod-16, v5p-32); or GPUs: "
      "h100:8 (one host), h100:2x8 (hosts x GPUs; needs "
      "jax's CUDA plugin).",
    ),
    num_slices=flags.DEFINE_integer(
      "num_slices",
      1,
      "Slices joined by the data-centre network (config.mesh.dcn splits the mesh over them).",
    ),
    image_shape=flags.DEFINE_list(
      "image_shape", None, "H,W,C of the data, for a source not in the table of known datasets."
    ),
    num_classes=flags.DEFINE_integer(
      "num_classes", None, "Classes of the data, for a source not in the table."
    ),
    train_examples=flags.DEFINE_integer(
      "train_examples",
      None,
      "Train split size, for a source not in the table (the schedule's length).",
    ),
    programs=flags.DEFINE_list(
      "programs",
      None,
      "Compile only these of the task's programs "
      "(train_step, eval_step; MAE reconstruct; DiT sample); "
      "default: all.",
    ),
    json_out=flags.DEFINE_string("json_out", "", "Also write the report as JSON here."),
  )


@dataclasses.dataclass(frozen=True)
class Refusal:
  """A program the compiler refused: it does not fit the device."""

  program: str
  compiler_says: str


@dataclasses.dataclass(frozen=True)
class Report:
  config: str  # what was compiled, for the header
  topology: str
  slice_name: str
  num_slices: int
  target: hardware.Target
  mesh: dict
  choices: tuple  # (program names, hardware.Choice)
  costs: tuple  # program_costs.ProgramCost, one per program that compiled
  refusals: tuple[Refusal, ...]
  total_steps: int
  advice: str  # the knobs that would help the programs that do not fit

  @property
  def chip(self) -> hardware.Chip:
    return self.target.chip

  @property
  def fits(self) -> bool:
    return not self.refusals and all(c.peak_bytes <= self.chip.usable_hbm_bytes for c in self.costs)

  def step_estimate(self) -> dict | None:
    """The train step's time bound from its FLOPs and HBM traffic against the
    chip's peaks (an estimate: perfect overlap, full matmul efficiency)."""
    train = next((c for c in self.costs if c.name == "train_step"), None)
    if train is None:
      return None
    compute_s = train.flops / self.chip.bf16_flops
    memory_s = train.hbm_traffic_bytes / self.chip.hbm_bytes_per_s
    step_s = max(compute_s, memory_s)
    hours = step_s * self.total_steps / 3600
    return dict(
      step_seconds=step_s,
      compute_seconds=compute_s,
      memory_seconds=memory_s,
      bound="compute" if compute_s >= memory_s else "memory",
      steps=self.total_steps,
      hours=hours,
      chip_hours=hours * self.target.device_count,
    )

  def to_json(self) -> dict:
    return dict(
      config=self.config,
      topology=self.topology,
      slice=self.slice_name,
      num_slices=self.num_slices,
      target=dataclasses.asdict(self.target),
      chip=dataclasses.asdict(self.chip),
      mesh=self.mesh,
      fits=self.fits,
      choices=[
        dict(programs=list(names), **dataclasses.asdict(choice)) for names, choice in self.choices
      ],
      programs=[
        dict(dataclasses.asdict(c), margin_bytes=self.chip.usable_hbm_bytes - c.peak_bytes)
        for c in self.costs
      ],
      refused=[dataclasses.asdict(r) for r in self.refusals],
      estimate=self.step_estimate(),
      advice=self.advice,
    )


def stand_in_splits(
  config, *, image_shape=None, num_classes=None, train_examples=None, process_count: int = 1
):
  """The run's train and eval splits without their data (`sources.stand_in_split`):
  from the table of known datasets, or from the flags for another source."""
  from pixel_vit.data import sources

  data = config.data
  facts = sources.KNOWN_DATASETS.get(data.source)
  if facts is None or image_shape or num_classes or train_examples:
    if facts is None and (image_shape is None or num_classes is None):
      raise ValueError(
        f"pixel_vit.compile reads no data and does not know config.data.source="
        f"{data.source!r} (it knows {', '.join(sorted(sources.KNOWN_DATASETS))}): give "
        "--image_shape=H,W,C and --num_classes=N (and --train_examples=N for a length "
        "in epochs)."
      )
    shape = tuple(int(s) for s in image_shape) if image_shape else facts.image_shape
    if shape is not None and (len(shape) != 3 or min(shape) < 1):
      raise ValueError(f"--image_shape={','.join(map(str, shape))} must be H,W,C, e.g. 32,32,3.")
    examples = dict(facts.examples) if facts else {}
    train_size = train_examples or examples.get(data.train_split) or config.batch_size
    examples.update(
      {
        data.train_split: train_size,
        data.eval_split: examples.get(data.eval_split, config.eval_batch_size),
      }
    )
    facts = sources.DatasetFacts(
      image_shape=shape,
      channels=shape[2] if shape else facts.channels,
      num_classes=num_classes or facts.num_classes,
      examples=examples,
      latent=facts.latent if facts else False,
    )
  return tuple(
    sources.stand_in_split(
      facts, split, image_size=data.get("image_size"), process_count=process_count
    )
    for split in (data.train_split, data.eval_split)
  )


def _value(config, dotted: str):
  for name in dotted.split("."):
    config = config[name]
  return config


# The batch each program runs on, by its config key.
BATCH_KEYS = {
  "train_step": "batch_size",
  "eval_step": "eval_batch_size",
  "reconstruct": "eval_batch_size",
  "sample": "fid.batch_size",
}


def knobs(config, target: hardware.Target, programs) -> str:
  """What would make `programs` fit: the config's own values and the keys to turn."""
  from pixel_vit import parallel

  mesh = dict(zip(parallel.MESH_AXES, parallel.mesh_shape(config.mesh, target.device_count)))
  batches = ", ".join(
    f"config.{key}={_value(config, key)}"
    for key in dict.fromkeys(BATCH_KEYS[name] for name in programs)
  )
  return (
    f"Knobs: a smaller per-device batch ({batches} over "
    f"{mesh['data'] * mesh['fsdp']} batch shards; or a larger slice); "
    f"config.model.remat={config.model.remat!r} ('full' keeps the least); shard the "
    f"parameters and optimizer state with FSDP (config.mesh.fsdp={mesh['fsdp']}: e.g. "
    "--config.mesh.data=1 --config.mesh.fsdp=-1); config.model.attention="
    f"{config.model.attention!r} ('splash' or 'chunked' keep attention memory linear "
    f"in the tokens); config.model.dtype={config.model.dtype!r} ('bfloat16' halves "
    "activations)."
  )


def compile_run(
  config,
  devices,
  *,
  config_name: str = "",
  topology: str = "",
  num_slices: int = 1,
  splits=None,
  programs=None,
) -> Report:
  """Validates `config` for `devices`, builds the run's programs on them and
  compiles each (all of `programs`, by name, when given). Raises ValueError
  for a config that cannot run there; a program too big for the device is
  a `Refusal` in the report."""
  from pixel_vit import parallel, program_costs
  from pixel_vit.trainers import loop

  target = hardware.Target.of(devices)
  if target.chip is None:
    raise ValueError(
      f"pixel_vit.compile compiles for TPU slices and known GPUs; these "
      f"devices are {target.device_kind!r}."
    )
  trainer = trainer_for(config)
  trainer.validate(config, target, files=False)
  splits = splits or stand_in_splits(config, process_count=target.process_count)
  plan = loop.plan(config, trainer.make_model_fn, splits=splits)
  check_data = getattr(trainer, "check_data", None)  # MAE: the mask ratio at this size
  if check_data is not None:
    check_data(config, plan)
  layout, _ = loop.lay_out(config, plan, devices)
  built = trainer.programs(layout)
  unknown = sorted(set(programs or ()) - set(built))
  if unknown:
    raise ValueError(f"programs {unknown} are not among this task's {sorted(built)}.")
  costs, refusals, choices = [], [], {}
  for name, program in built.items():
    if programs and name not in programs:
      continue
    resident = program_costs.argument_bytes(program.args)
    if resident > target.chip.usable_hbm_bytes:  # no need to ask the compiler
      refusals.append(
        Refusal(
          name,
          f"its arguments alone (the train state and batch) need "
          f"{_gib(resident)} GiB per device; not compiled",
        )
      )
      continue
    logging.info("compiling %s for %s", name, target.describe())
    start = time.perf_counter()
    with hardware.recording_choices() as made, parallel.activate(layout.mesh, layout.rules):
      traced = program.trace()
      lowered = traced.lower()
    for choice in made:
      choices.setdefault(choice, []).append(name)
    try:
      compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the compiler's JaxRuntimeError
      if not program_costs.is_out_of_memory(e):
        raise
      refusals.append(Refusal(name, program_costs.out_of_memory_summary(e)))
      continue
    costs.append(
      program_costs.program_cost(
        name,
        traced.jaxpr,
        compiled,
        device_count=target.device_count,
        compile_seconds=time.perf_counter() - start,
      )
    )
  too_big = [r.program for r in refusals] + [
    c.name for c in costs if c.peak_bytes > target.chip.usable_hbm_bytes
  ]
  return Report(
    config=config_name,
    topology=topology,
    slice_name=hardware.describe_topology(topology) if topology else "",
    num_slices=num_slices,
    target=target,
    mesh=dict(layout.mesh.shape),
    choices=tuple((tuple(names), choice) for choice, names in choices.items()),
    costs=tuple(costs),
    refusals=tuple(refusals),
    total_steps=plan.total_steps,
    advice=knobs(config, target, too_big) if too_big else "",
  )


def _gib(value: float) -> str:
  return f"{value / GIB:.2f}"


def _collectives(cost) -> str:
  return (
    ", ".join(f"{c.kind} {c.count:g}x {c.bytes / GIB:.3g} GiB" for c in cost.collectives) or "none"
  )


def format_report(report: Report) -> str:
  chip = report.chip
  slices = f" x {report.num_slices} slices" if report.num_slices > 1 else ""
  lines = [
    f"{report.config} compiled for {report.topology} ({report.slice_name}{slices}): "
    f"{report.target.describe()}; mesh "
    + ", ".join(f"{axis}={size}" for axis, size in report.mesh.items()),
    "These are compiles, not runs: no device executed anything.",
    "",
  ]
  for names, choice in report.choices:
    lines.append(f"{choice.setting} -> {choice.chose!r} ({', '.join(names)}): {choice.why}")
  if any(choice.setting == "model.remat=auto" for _, choice in report.choices):
    lines.append("(remat acts only where there is a backward pass: the train step)")
  usable = (
    "the TPU compiler lets a program use"
    if chip.platform == "tpu"
    else "JAX's allocator takes by default (75%)"
  )
  lines += [
    "",
    f"Per device, GiB: {_gib(chip.usable_hbm_bytes)} of a {chip.name}'s "
    f"{_gib(chip.hbm_bytes)} are usable ({usable}); 'peak' is what is live at once, "
    "'margin' what is left of the usable memory (temporaries are allocated, not all "
    "live at once):",
    "| program | arguments | outputs | donated | temporaries | code | peak | margin "
    "| matmul TFLOP | HBM traffic GiB (est.) | collectives | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for c in report.costs:
    lines.append(
      f"| {c.name} | {_gib(c.argument_bytes)} | {_gib(c.output_bytes)} | "
      f"{_gib(c.alias_bytes)} | {_gib(c.temp_bytes)} | {_gib(c.code_bytes)} | "
      f"{_gib(c.peak_bytes)} | {_gib(chip.usable_hbm_bytes - c.peak_bytes)} | "
      f"{c.flops / 1e12:.3g} | {c.hbm_traffic_bytes / GIB:.3g} | {_collectives(c)} | "
      f"{c.compile_seconds:.0f} |"
    )
  for refusal in report.refusals:
    lines.append(f"| {refusal.program} | refused by the compiler: {refusal.compiler_says} |")
  data_dependent = sum(c.unknown_trip_counts for c in report.costs)
  if data_dependent:
    lines.append(
      f"({data_dependent} loop(s) whose trip count is not a constant, e.g. the "
      "rejection sampling of mixup's Beta draw, counted once)"
    )
  estimate = report.step_estimate()
  if estimate:
    lines += [
      "",
      f"Estimate (not a measurement): the train step takes at least "
      f"{estimate['step_seconds'] * 1e3:.3g} ms ({estimate['bound']}-bound: "
      f"{estimate['compute_seconds'] * 1e3:.3g} ms of matmuls at {chip.bf16_flops / 1e12:g}"
      f" TFLOP/s, {estimate['memory_seconds'] * 1e3:.3g} ms of HBM traffic at "
      f"{chip.hbm_bytes_per_s / 1e9:g} GB/s); the config's {estimate['steps']:,} steps: "
      f"{estimate['hours']:.3g} h on {report.target.device_count} chips = "
      f"{estimate['chip_hours']:.3g} chip-hours, evaluation not included.",
    ]
  return "\n".join(lines)


def refusal_message(report: Report) -> str:
  """One message for every program that does not fit, with the knobs."""
  chip = report.chip
  parts = [
    f"{r.program} does not fit a {chip.name} chip ({_gib(chip.usable_hbm_bytes)} GiB "
    f"usable): the compiler says {r.compiler_says.rstrip('.')}"
    for r in report.refusals
  ]
  parts += [
    f"{c.name} needs {_gib(c.peak_bytes)} GiB per device at its peak, more than the "
    f"{_gib(chip.usable_hbm_bytes)} GiB a {chip.name} chip gives a program"
    for c in report.costs
    if c.peak_bytes > chip.usable_hbm_bytes
  ]
  return f"{report.config} on {report.topology}: " + "; ".join(parts) + ". " + report.advice


def main(argv):
  del argv
  with command_line.stops_with_one_message():
    import jax

    # Compiling needs no accelerator: keep the default backend the CPU, so
    # constants built while tracing stay on the host, and a TPU VM that is
    # training is not touched.
    jax.config.update("jax_platforms", "cpu")
    if not _FLAGS["topology"].value:
      raise ValueError(
        "--topology is required: the TPU slice (or GPUs) to compile for, "
        "e.g. --topology=v5p:2x2x4, --topology=v5litepod-16 or "
        "--topology=h100:8."
      )
    config = _FLAGS["config"].value
    topology = hardware.canonical_topology(_FLAGS["topology"].value)
    devices = hardware.compile_only_devices(topology, _FLAGS["num_slices"].value)
    splits = stand_in_splits(
      config,
      image_shape=_FLAGS["image_shape"].value,
      num_classes=_FLAGS["num_classes"].value,
      train_examples=_FLAGS["train_examples"].value,
      process_count=len({d.process_index for d in devices}),
    )
    report = compile_run(
      config,
      devices,
      topology=topology,
      config_name=command_line.config_argument(sys.argv) or "the config",
      num_slices=_FLAGS["num_slices"].value,
      splits=splits,
      programs=_FLAGS["programs"].value,
    )
    print(format_report(report), flush=True)
    if _FLAGS["json_out"].value:
      os.makedirs(os.path.dirname(_FLAGS["json_out"].value) or ".", exist_ok=True)
      with open(_FLAGS["json_out"].value, "w") as f:
        json.dump(report.to_json(), f, indent=2, default=str)
    if not report.fits:
      raise ValueError(refusal_message(report))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main, flags_parser=command_line.parse_flags)
