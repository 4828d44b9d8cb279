r"""The measured study behind docs/results.md: the paper's findings on real data, 2 CPU cores.

Every run is `python -m pixel_vit.main` (or `pixel_vit.sample`, or
`benchmarks.throughput`) in a fresh process, exactly as a user runs it, with
its workdir under --root; the tables are read back from each workdir's
metrics.jsonl, and docs/results.md plus its plots are rewritten from them.

Groups (--only picks some). The converged study (8x8 Fashion-MNIST, every
run 30 epochs to a plateau, evaluated after every epoch; CONV_RECIPE):
  conv_tune     the peak learning rate of each patch size, on a held-out fifth
                of the train file (the cells below wait for it)
  conv_patch    /1 vs /2 vs /4, --seeds seeds each: learning curves, final table
  conv_posemb   position embedding sincos2d / none at /1 and /2
  conv_permute  a fixed pixel permutation, local (delta 1) and global (delta 8),
                at /1 and /2
The early-learning study (16x16, 200 steps; RECIPE):
  patch     patch 1 vs 2 vs 4, Fashion-MNIST and MNIST, --seeds seeds each
  posemb    position embedding learn / sincos2d / none at /1 (Fashion-MNIST)
  permute   pixel permutation: accuracy against (T swaps, delta) for /1 and /2
  mae       MAE pre-training + fine-tune vs the same fine-tune from scratch vs
            a linear probe, /1 and /2 (Fashion-MNIST)
  dit       DiT /1 vs /2 on the 8x8 digits: FID and accuracy of the samples
            with the project's own digits classifier as the feature extractor
  speed     train-step images/s of each patch size (benchmarks/throughput.py)

Early-learning recipe: the `mu` model (64 wide, 4 blocks, 4 heads) of configs/*:quick, the
28x28 images resized to 16x16 (256 pixel tokens: at 28x28, 784 tokens, one
PiT step was ~5x slower and the study would not fit a day on 2 cores; 16
also lets 4x4 patches tile the image), batch 128, AdamW lr 1e-3 with 50
warmup steps and cosine decay, no augmentation, global average pooling.

  python -m experiments.paper_study    # everything that is missing
  python -m experiments.paper_study --only=patch --seeds=3
  python -m experiments.paper_study --report_only       # rewrite docs/ from the workdirs
  python -m experiments.paper_study --dry_run           # print the commands

--only / --match split the study between processes that share --root (the
report, --report_only once they are done, reads every workdir).

docs/study_runs/ keeps each run's records (study.json, metrics.jsonl,
samples / throughput JSON, the last picture; no checkpoints), copied there
as each run finishes (--records). They name no absolute path (a job's argv
says $ROOT for --root) and carry their machine and date, so
`--report_only --root=ANY_COPY` rewrites the same report; with the copy as
the root, a plain run runs only what is missing (an MAE fine-tune or probe
still needs its pre-training's checkpoint).

A finished run (its study.json records the same command) is not run again,
so an interrupted study continues where it stopped; an unfinished one
resumes from its checkpoint (exact resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
DATASETS = {  # relative to the repo root, as the printed commands use them
  "fashion_mnist": "../shared/data/fashion_mnist_debian_{split}.npz",
  "mnist": "../shared/data/mnist_rasbt_{split}.npz",
}
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}
IMAGE_SIZE = 16
PATCHES = (1, 2, 4)
# Permutation cells (T swaps, delta). /2 gets the whole grid; /1, five times
# dearer a step, the strongest global cell (it should not care: with
# learned position embeddings from random init a fixed permutation is a
# relabelling of the tokens).
PERMUTE_GRID = tuple((t, d) for d in (1, 4, 16) for t in (256, 2048))
PERMUTE_GRID_P1 = ((2048, 16),)
# The converged study (8x8 Fashion-MNIST, trained to a plateau); see CONV_*.
CONV_GROUPS = ("conv_tune", "conv_patch", "conv_posemb", "conv_permute")
GROUPS = ("patch", "posemb", "permute", "mae", "dit", "speed") + CONV_GROUPS
# Stands for --root in a job's argv, so a run's record names no absolute path
# and a copy of the records anywhere reads back as finished.
ROOT = "$ROOT"

# ---- the converged study: 8x8 Fashion-MNIST, every run to a plateau
CONV_SIZE = 8  # /1 = 64 pixel tokens, /2 = 16, /4 = 4
CONV_BATCH = 128
FASHION_TRAIN = 60_000  # examples in the train file
CONV_EPOCHS = 30
# Tuning: each patch size gets the learning rate that scores best on a
# held-out fifth of the train file (the single-file npz split: 48,000 /
# 12,000), after CONV_TUNE_EPOCHS with the same recipe; ties go to the
# smaller rate. Never the test split.
CONV_TUNE_LRS = (5e-4, 1e-3, 2e-3, 4e-3)
CONV_TUNE_EPOCHS = 10
CONV_TUNE_DATA = "../shared/data/fashion_mnist_debian_train.npz"
# Permutation strengths at 8x8: T = 64 swaps (one per pixel on average)
# within delta = 1 (local) or delta = 8, the whole image (global).
CONV_SWAPS = 64
CONV_DELTAS = (1, CONV_SIZE)


@dataclasses.dataclass(frozen=True)
class Job:
  name: str  # its workdir under --root
  group: str
  argv: tuple[str, ...]  # after `python -m`, without --workdir
  workdir_flag: bool = True  # else benchmarks.throughput's --json_out, or argv has it
  labels: tuple = ()  # what the report groups it by, e.g. (('patch', 1), ('seed', 0))
  needs: tuple[str, ...] = ()  # jobs that must finish first (an init_from, a classifier)

  def command(self, root: str) -> list[str]:
    path = os.path.join(root, self.name)
    if self.workdir_flag:
      extra = [f"--workdir={path}"]
    elif self.argv[0] == "benchmarks.throughput":
      extra = [f"--json_out={os.path.join(path, 'throughput.json')}"]
    else:
      extra = []
    return [sys.executable, "-m", *(a.replace(ROOT, root) for a in self.argv), *extra]

  def label(self, key):
    return dict(self.labels).get(key)


def _cls_argv(dataset: str, patch: int, seed: int, steps: int, **args) -> tuple[str, ...]:
  args = {"posemb": "learn", **args}
  arg = ",".join(
    [f"quick,variant=mu/{patch},dataset=npz:{DATASETS[dataset]}"]
    + [f"{k}={v}" for k, v in args.items()]
  )
  return ("pixel_vit.main", f"--config=configs/cls_pixel.py:{arg}", *_common(steps, seed))


def _common(steps: int, seed: int, warmup: int = 50) -> tuple[str, ...]:
  return (
    f"--config.data.image_size={IMAGE_SIZE}",
    f"--config.total_steps={steps}",
    f"--config.optimizer.warmup_steps={warmup}",
    "--config.eval_batch_size=1000",
    f"--config.eval_every={steps}",
    f"--config.checkpoint_every={steps}",
    f"--config.seed={seed}",
  )


def jobs_for(args) -> list[Job]:
  jobs = []
  seeds = range(args.seeds)
  steps = args.steps
  # patch (seed-major, so early results cover every cell once)
  for seed in seeds:
    for dataset in DATASETS:
      for patch in PATCHES:
        jobs.append(
          Job(
            f"cls_{dataset}_p{patch}_seed{seed}",
            "patch",
            _cls_argv(dataset, patch, seed, steps),
            labels=(("dataset", dataset), ("patch", patch), ("seed", seed)),
          )
        )
  for seed in seeds:
    for posemb in ("sincos2d", "none"):
      jobs.append(
        Job(
          f"cls_fashion_mnist_p1_{posemb}_seed{seed}",
          "posemb",
          _cls_argv("fashion_mnist", 1, seed, steps, posemb=posemb),
          labels=(("posemb", posemb), ("seed", seed)),
        )
      )
  for patch, grid in ((2, PERMUTE_GRID), (1, PERMUTE_GRID_P1)):
    for swaps, delta in grid:
      jobs.append(
        Job(
          f"cls_fashion_mnist_p{patch}_swaps{swaps}_d{delta}",
          "permute",
          _cls_argv("fashion_mnist", patch, 0, steps, swaps=swaps, swap_distance=delta),
          labels=(("patch", patch), ("swaps", swaps), ("delta", delta)),
        )
      )
  jobs += _mae_jobs(args)
  jobs += _dit_jobs(args)
  jobs += _conv_jobs(args)
  for patch in PATCHES:
    jobs.append(
      Job(
        f"speed_p{patch}",
        "speed",
        (
          "benchmarks.throughput",
          "--config=configs/cls_pixel.py:quick,posemb=learn",
          f"--variant=mu/{patch}",
          f"--image_size={IMAGE_SIZE}",
          "--batch=128",
          "--channels=1",
          "--num_classes=10",
          "--steps=10",
          "--min_steps=5",
          "--max_timing_s=60",
        ),
        workdir_flag=False,
        labels=(("patch", patch),),
      )
    )
  return [j for j in jobs if j.group in args.only and args.match in j.name]


def _conv_argv(
  patch: int,
  seed: int,
  lr: float,
  *,
  epochs: int = CONV_EPOCHS,
  data: str = DATASETS["fashion_mnist"],
  train_examples: int = FASHION_TRAIN,
  **args,
) -> tuple[str, ...]:
  """The converged recipe: AdamW, one warmup epoch, cosine decay to ~0 over
  the whole run, weight decay 0.05, padded crop (1 pixel) and flip; the test
  split evaluated after every epoch, a checkpoint every epoch."""
  args = {"posemb": "learn", **args}
  arg = ",".join(
    [f"quick,variant=mu/{patch},dataset=npz:{data}"] + [f"{k}={v}" for k, v in args.items()]
  )
  per_epoch = train_examples // CONV_BATCH  # the pipeline drops the last partial batch
  return (
    "pixel_vit.main",
    f"--config=configs/cls_pixel.py:{arg}",
    f"--config.data.image_size={CONV_SIZE}",
    f"--config.batch_size={CONV_BATCH}",
    f"--config.total_steps={epochs * per_epoch}",
    f"--config.optimizer.warmup_steps={per_epoch}",
    f"--config.optimizer.lr={lr:g}",
    "--config.optimizer.weight_decay=0.05",
    "--config.augment.crop=True",
    "--config.augment.crop_padding=1",
    "--config.augment.flip=True",
    "--config.eval_batch_size=1000",
    f"--config.eval_every={per_epoch}",
    f"--config.checkpoint_every={per_epoch}",
    f"--config.log_every={per_epoch}",
    f"--config.seed={seed}",
  )


def _conv_tune_job(patch: int, lr: float) -> Job:
  return Job(
    f"conv8_tune_p{patch}_lr{lr:g}",
    "conv_tune",
    _conv_argv(
      patch,
      0,
      lr,
      epochs=CONV_TUNE_EPOCHS,
      data=CONV_TUNE_DATA,
      train_examples=FASHION_TRAIN * 4 // 5,
    ),
    labels=(("patch", patch), ("lr", lr)),
  )


def conv_tuned_lr(root: str, patch: int) -> float | None:
  """The rate of `patch` with the best held-out top-1 once every tuning run
  of it has finished (ties: the smaller), else None."""
  scores = {}
  for lr in CONV_TUNE_LRS:
    job = _conv_tune_job(patch, lr)
    if finished(root, job) is None:
      return None
    top1 = last_metrics(os.path.join(root, job.name)).get("eval/top1")
    scores[lr] = -1.0 if top1 is None else top1
  return max(CONV_TUNE_LRS, key=lambda lr: (scores[lr], -lr))


def _conv_jobs(args) -> list[Job]:
  """Tuning first (cheap patch sizes first), then the cells of every patch
  size whose tuning has finished (see conv_waiting)."""
  lrs = {patch: conv_tuned_lr(args.root, patch) for patch in PATCHES}
  return [_conv_tune_job(patch, lr) for patch in (4, 2, 1) for lr in CONV_TUNE_LRS] + _conv_cells(
    args.seeds, {p: lr for p, lr in lrs.items() if lr}
  )


def _conv_cells(seeds: int, lrs: dict[int, float]) -> list[Job]:
  """The converged cells of the patch sizes in `lrs`, at their rates, seed-major."""
  jobs = []
  for seed in range(seeds):
    jobs += [
      Job(
        f"conv8_p{patch}_seed{seed}",
        "conv_patch",
        _conv_argv(patch, seed, lrs[patch]),
        labels=(("patch", patch), ("seed", seed)),
      )
      for patch in (4, 2, 1)
      if patch in lrs
    ]
  # The ablations, seed-major, the paper's sharpest predictions first: no
  # position embedding and the global permutation, then sincos2d and the
  # local permutation.
  for seed in range(seeds):
    for posemb, delta in (("none", None), (None, CONV_SIZE), ("sincos2d", None), (None, 1)):
      for patch in (2, 1):
        if patch not in lrs:
          continue
        if posemb:
          jobs.append(
            Job(
              f"conv8_p{patch}_{posemb}_seed{seed}",
              "conv_posemb",
              _conv_argv(patch, seed, lrs[patch], posemb=posemb),
              labels=(("patch", patch), ("posemb", posemb), ("seed", seed)),
            )
          )
        else:
          jobs.append(
            Job(
              f"conv8_p{patch}_swaps{CONV_SWAPS}_d{delta}_seed{seed}",
              "conv_permute",
              _conv_argv(patch, seed, lrs[patch], swaps=CONV_SWAPS, swap_distance=delta),
              labels=(("patch", patch), ("delta", delta), ("seed", seed)),
            )
          )
  return jobs


def conv_waiting(args) -> int:
  """How many converged cells wait for their patch size's tuning."""
  untuned = [patch for patch in PATCHES if conv_tuned_lr(args.root, patch) is None]
  return len(_conv_cells(args.seeds, dict.fromkeys(untuned, 1.0)))


def _mae_jobs(args) -> list[Job]:
  jobs = []
  data = f"dataset=npz:{DATASETS['fashion_mnist']}"
  for patch in (1, 2):
    model = f"variant=mu/{patch},{data},posemb=learn"
    pretrain = f"mae_fashion_mnist_p{patch}_pretrain"
    jobs.append(
      Job(
        pretrain,
        "mae",
        (
          "pixel_vit.main",
          f"--config=configs/mae_pixel.py:quick,{model}",
          *_common(args.mae_steps, 0),
          "--config.mask_ratio=0.75",
          "--config.model.norm_pix_loss=True",
          "--config.model.norm_pix_window=2",
          "--config.optimizer.base_lr=1.5e-3",
        ),
        labels=(("patch", patch), ("stage", "pretrain")),
      )
    )
    init = f"{ROOT}/{pretrain}"
    for stage, mode, init_from, base_lr in (
      ("finetune", "finetune", init, 4e-3),
      ("scratch", "finetune", "", 4e-3),
      ("probe", "probe", init, 2e-2),
    ):
      config = f"configs/mae_finetune.py:quick,mode={mode},{model}" + (
        f",init_from={init_from}" if init_from else ""
      )
      jobs.append(
        Job(
          f"mae_fashion_mnist_p{patch}_{stage}",
          "mae",
          (
            "pixel_vit.main",
            f"--config={config}",
            *_common(args.finetune_steps, 0, warmup=50),
            f"--config.optimizer.base_lr={base_lr}",
          ),
          labels=(("patch", patch), ("stage", stage)),
          needs=(pretrain,) if init_from else (),
        )
      )
  return jobs


def _dit_jobs(args) -> list[Job]:
  classifier = f"{ROOT}/dit_digits_classifier"
  jobs = [
    Job(
      "dit_digits_classifier",
      "dit",
      ("pixel_vit.main", "--config=configs/cls_pixel.py:quick"),
      labels=(("stage", "classifier"),),
    )
  ]
  for patch in (1, 2):
    config = f"--config=configs/dit_pixel.py:quick,variant=mu/{patch},classifier={classifier}"
    jobs.append(
      Job(
        f"dit_digits_p{patch}",
        "dit",
        ("pixel_vit.main", config),
        labels=(("patch", patch), ("stage", "train")),
        needs=("dit_digits_classifier",),
      )
    )
    # The trained run's workdir; the samples go to this job's own directory.
    jobs.append(
      Job(
        f"dit_digits_p{patch}_samples",
        "dit",
        (
          "pixel_vit.sample",
          config,
          f"--num_samples={args.dit_samples}",
          f"--workdir={ROOT}/dit_digits_p{patch}",
          f"--out={ROOT}/dit_digits_p{patch}_samples/samples",
        ),
        workdir_flag=False,
        labels=(("patch", patch), ("stage", "samples")),
        needs=(f"dit_digits_p{patch}",),
      )
    )
  return jobs


# ------------------------------------------------------------------ running


def _record_path(root: str, job: Job) -> str:
  return os.path.join(root, job.name, "study.json")


def finished(root: str, job: Job) -> dict | None:
  """The run's record if it finished with this very command, else None."""
  try:
    with open(_record_path(root, job)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if record.get("argv") == list(job.argv) else None


def run(root: str, job: Job, core: int | None = None) -> dict:
  """Runs the job to its end (resuming its checkpoint if it has one); with
  `core`, on that CPU core alone (one XLA thread), beside the other runs."""
  workdir = os.path.join(root, job.name)
  previous = _read_json(_record_path(root, job))
  if previous and previous.get("argv") != list(job.argv):
    shutil.rmtree(workdir)  # another command: start afresh, never resume it
  os.makedirs(workdir, exist_ok=True)
  command = job.command(root)
  print(f"[study] {job.name}: {' '.join(command[1:])}", flush=True)
  log_path = os.path.join(workdir, "log.txt")
  earlier = _earlier_invocations_wall(log_path)
  start = time.time()
  env, pin = dict(os.environ), None
  if core is not None:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    pin = functools.partial(os.sched_setaffinity, 0, {core})
  with open(log_path, "a") as log:
    result = subprocess.run(
      command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pin
    )
  wall = time.time() - start
  if result.returncode:
    raise SystemExit(f"[study] {job.name} failed (exit {result.returncode}); see {workdir}/log.txt")
  reached, total = _last_step(workdir), _total_steps(job)
  if total is not None and reached != total:  # a SIGTERM saves, then exits 0
    raise SystemExit(
      f"[study] {job.name} stopped at step {reached} of {total} (stopped from "
      "outside?); run the study again to resume it from its checkpoint"
    )
  record = {
    "argv": list(job.argv),
    # A resumed run's earlier invocations count too (they trained its first steps).
    "wall_s": earlier + wall,
    "finished": time.time(),
    "load_average": os.getloadavg()[0],
    "machine": machine(),
    "cores": 1 if core is not None else os.cpu_count(),
  }
  with open(_record_path(root, job), "w") as f:
    json.dump(record, f, indent=2)
  print(f"[study] {job.name}: done in {wall / 60:.1f} min", flush=True)
  return record


def _earlier_invocations_wall(log_path: str) -> float:
  """Seconds the run's earlier invocations (stopped, then resumed) spent,
  from the `uptime=` clu's progress writes into log.txt: it restarts at each
  invocation, so each drop ends one; 0 for a fresh run."""
  try:
    with open(log_path, "rb") as f:
      uptimes = [float(v) for v in re.findall(rb"\] uptime=([0-9.]+)", f.read())]
  except OSError:
    return 0.0
  total, last = 0.0, 0.0
  for uptime in uptimes:
    if uptime < last:
      total += last
    last = uptime
  return total + last


# What a finished run's records are: enough for --report_only, no checkpoints.
RECORD_FILES = ("study.json", "metrics.jsonl", "samples.json", "samples.png", "throughput.json")


def keep_records(root: str, job: Job, records: str) -> None:
  """Copies the run's records (and its newest picture of each kind) to
  records/<name>/, the committed docs/study_runs by default."""
  source, target = os.path.join(root, job.name), os.path.join(records, job.name)
  if os.path.abspath(source) == os.path.abspath(target):
    return
  os.makedirs(target, exist_ok=True)
  for name in RECORD_FILES:
    if os.path.exists(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
  for prefix in ("reconstructions_", "samples_"):
    picture = _newest_picture(source, prefix)
    if picture:
      os.makedirs(os.path.join(target, "pictures"), exist_ok=True)
      shutil.copyfile(picture, os.path.join(target, "pictures", os.path.basename(picture)))


def _total_steps(job: Job) -> int | None:
  """The run's length when its argv sets it (--config.total_steps=N)."""
  for arg in job.argv:
    if arg.startswith("--config.total_steps="):
      return int(arg.split("=", 1)[1])
  return None


def _last_step(workdir: str) -> int | None:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return max((json.loads(line)["step"] for line in f if line.strip()), default=None)
  except OSError:
    return None


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def last_metrics(workdir: str) -> dict:
  """The last value of every key in metrics.jsonl."""
  values = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      values.update(json.loads(line))
  return values


# ------------------------------------------------------------------ report


def mean_std(values: list[float]) -> tuple[float, float]:
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_pct(values: list[float]) -> str:
  if not values:
    return "—"
  mean, std = mean_std([100 * v for v in values])
  return f"{mean:.2f} ± {std:.2f} (n={len(values)})" if len(values) > 1 else f"{mean:.2f}"


class Results:
  """The finished jobs' metrics, looked up by labels."""

  def __init__(self, root: str, jobs: list[Job]):
    self.root = root
    self._metrics = {}
    self.records = {}
    for job in jobs:
      record = finished(root, job)
      if record is not None:
        self.records[job.name] = (job, record)

  def select(self, group: str, **labels) -> list[tuple[Job, dict]]:
    return [
      (job, record)
      for job, record in self.records.values()
      if job.group == group and all(job.label(k) == v for k, v in labels.items())
    ]

  def metric(self, job: Job, key: str):
    if job.name not in self._metrics:  # every section reads the same files
      self._metrics[job.name] = last_metrics(os.path.join(self.root, job.name))
    return self._metrics[job.name].get(key)

  def top1(self, group: str, **labels) -> list[float]:
    return [self.metric(job, "eval/top1") for job, _ in self.select(group, **labels)]

  def wall(self, group: str) -> float:
    return sum(record["wall_s"] for _, record in self.select(group))


def compare(a: list[float], b: list[float], name_a: str, name_b: str) -> str:
  """A sentence on whether mean(a) - mean(b) exceeds the seed noise."""
  if not a or not b:
    return ""
  diff = 100 * (statistics.mean(a) - statistics.mean(b))
  noise = 100 * max(mean_std(a)[1], mean_std(b)[1])
  if len(a) < 2 or len(b) < 2:
    verdict = "one run each, no error bar"
  elif abs(diff) > 2 * noise:
    verdict = f"more than twice the larger seed std ({noise:.2f})"
  else:
    verdict = f"within twice the larger seed std ({noise:.2f}): not a resolved difference"
  return f"{name_a} − {name_b} = {diff:+.2f} points ({verdict})"


def machine() -> str:
  model = platform.processor() or "?"
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    model = names[0] if names else model
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith("flags")), "")
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
  except OSError:
    isa = "?"
  import jax  # noqa: PLC0415  (only for its version; no backend is started)

  return (
    f"{model} ({isa}), {os.cpu_count()} cores, "
    f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
    f"Python {platform.python_version()}, jax {jax.__version__}"
  )


def write_report(args, jobs: list[Job]) -> str:
  os.makedirs(DOCS, exist_ok=True)  # the sections write their plots and pictures there
  results = Results(args.root, jobs)
  waiting = conv_waiting(args)
  lines = [
    "# Measured study: pixels vs patches on real data, 2 CPU cores",
    "",
    "Written by `python -m experiments.paper_study` from the runs' records "
    f"({_provenance(results)}). Every number below is read from the runs' `metrics.jsonl`; "
    "`python -m experiments.paper_study --report_only --root=DIR` rewrites this file and "
    "its plots from any copy of [study_runs/](study_runs/). The paper's own numbers "
    "(ImageNet, CIFAR-100, GPUs) are in the README; this is a small-scale check of the "
    "same comparisons, not a reproduction of them.",
    "",
    f"**Runs.** {len(results.records)} of {len(jobs) + waiting} finished"
    + (f" ({waiting} converged cells wait for their patch size's tuning)" if waiting else "")
    + "; a cell marked — was not run yet (`python -m experiments.paper_study` runs only "
    "what is missing).",
    "",
  ]
  lines += _converged_sections(args, results)
  lines += [
    '<a id="early"></a>',
    "",
    "# Early learning: 0.4 epochs at 16x16",
    "",
    "The first study, kept as it was: every run stops after 200 steps, far from "
    "convergence, so it measures how fast each tokenisation learns, not the paper's "
    "converged claim (the sections above). How the order changes with the budget is "
    "said there.",
    "",
    "**Recipe (all classification runs of this part).** " + RECIPE,
    "",
  ]
  lines += _patch_section(args, results)
  lines += _posemb_section(args, results)
  lines += _permute_section(args, results)
  lines += _mae_section(args, results)
  lines += _dit_section(args, results)
  lines += _wall_section(results)
  text = "\n".join(lines) + "\n"
  with open(os.path.join(DOCS, "results.md"), "w") as f:
    f.write(text)
  return text


RECIPE = (
  "the `mu` model (width 64, 4 blocks, 4 heads, MLP 256; ~0.2M parameters) from "
  "`configs/cls_pixel.py:quick`, learned position embeddings from random init (the "
  "paper's choice), global average pooling; 28x28 images resized to 16x16 (256 pixel "
  "tokens at /1, 64 at /2, 16 at /4) because a 784-token PiT step here was ~5x dearer "
  "and the study would not fit; batch 128, AdamW lr 1e-3, 50 warmup steps, cosine "
  "decay, weight decay 0.05, no augmentation, test accuracy on the whole 10,000-image "
  "test split."
)


def _provenance(results: "Results") -> str:
  """When and on what the finished runs ran, from their records."""
  records = [record for _, record in results.records.values()]
  if not records:
    return "no run finished yet"
  days = sorted(
    datetime.datetime.fromtimestamp(r["finished"], datetime.timezone.utc).date().isoformat()
    for r in records
    if "finished" in r
  )
  machines = sorted({r["machine"] for r in records if "machine" in r})
  unrecorded = sum("machine" not in r for r in records)
  said = f"runs finished {days[0]} to {days[-1]}" if days else "run dates not recorded"
  if machines:
    said += "; machines: " + "; ".join(machines)
  if unrecorded:
    said += f"; {unrecorded} runs did not record their machine"
  return said


CONV_RECIPE = (
  "The `mu` model (width 64, 4 blocks, 4 heads, MLP 256; ~0.2M parameters) with learned "
  "position embeddings from random init (the paper's choice) and global average pooling; "
  "Fashion-MNIST's 28x28 images resized to 8x8 (antialiased), so /1 has 64 pixel tokens, "
  "/2 16 and /4 4; batch 128; AdamW (b2 0.999, weight decay 0.05, gradient clip 1), one "
  "warmup epoch, then cosine decay to ~0 over the whole run, so each run ends at a small "
  f"learning rate instead of being cut mid-schedule; {CONV_EPOCHS} epochs; light "
  "augmentation: the CIFAR recipe's padded crop (1 pixel of black padding at 8x8, the "
  "same 1/8 of the side as 4 pixels at 32x32) and horizontal flips (clothes are "
  "mirror-symmetric), no mixup, RandAugment, erasing or label smoothing, which a 0.2M "
  "model on 60,000 images does not need to stay off the train set; no dropout or drop "
  "path. The whole 10,000-image test split is evaluated after every epoch. *Tuning*, the "
  "same for every patch size: the peak learning rate of "
  f"{{{', '.join(f'{v:g}' for v in CONV_TUNE_LRS)}}} "
  f"that scores best after {CONV_TUNE_EPOCHS} epochs of the same recipe on a held-out "
  "fifth of the train file (48,000 train / 12,000 held out; seed 0), never the test split. "
  "The ablations use their patch size's tuned rate."
)


def eval_curve(workdir: str) -> list[tuple[int, float]]:
  """(step, eval/top1) of every evaluation in the run's metrics.jsonl."""
  curve = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      values = json.loads(line)
      if values.get("eval/top1") is not None:
        curve.append((values["step"], values["eval/top1"]))
  return curve


def _conv_curves(results: "Results", group: str, **labels) -> list[list[tuple[int, float]]]:
  return [
    eval_curve(os.path.join(results.root, job.name)) for job, _ in results.select(group, **labels)
  ]


def _plateau(curve: list[tuple[int, float]]) -> float | None:
  """Spread (points) of the last 5 evaluations: the plateau test (< 0.3)."""
  last = [v for _, v in curve[-5:]]
  return 100 * (max(last) - min(last)) if len(last) == 5 else None


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
  """(step, mean, min, max) over runs, at the steps every run evaluated."""
  by_step = [dict(curve) for curve in curves]
  steps = sorted(set.intersection(*map(set, by_step))) if by_step else []
  out = []
  for step in steps:
    values = [curve[step] for curve in by_step]
    out.append((step, statistics.mean(values), min(values), max(values)))
  return out


def _crossings(a: list, b: list, per_epoch: int) -> list[str]:
  """Epochs at which mean curve a's lead over b changes sign."""
  b_at = {step: mean for step, mean, _, _ in b}
  said, sign = [], 0
  for step, mean, _, _ in a:
    if step not in b_at or mean == b_at[step]:
      continue
    new = 1 if mean > b_at[step] else -1
    if sign and new != sign:
      said.append(f"{step / per_epoch:.0f}")
    sign = new
  return said


def _converged_sections(args, results: "Results") -> list[str]:
  per_epoch = FASHION_TRAIN // CONV_BATCH
  lines = [
    '<a id="converged"></a>',
    "",
    "# Pixels vs patches at convergence (8x8 Fashion-MNIST)",
    "",
    "**Recipe.** " + CONV_RECIPE,
    "",
  ]
  # tuning
  lines += [
    "**Tuning** (held-out top-1 % after "
    f"{CONV_TUNE_EPOCHS} epochs; bold: the rate each patch size then trains with):",
    "",
    "| patch | " + " | ".join(f"lr {v:g}" for v in CONV_TUNE_LRS) + " |",
    "|---|" + "---|" * len(CONV_TUNE_LRS),
  ]
  lrs = {}
  for patch in PATCHES:
    chosen = conv_tuned_lr(args.root, patch)
    lrs[patch] = chosen
    cells = []
    for lr in CONV_TUNE_LRS:
      top1 = results.top1("conv_tune", patch=patch, lr=lr)
      cell = f"{100 * top1[0]:.2f}" if top1 and top1[0] is not None else "—"
      cells.append(f"**{cell}**" if lr == chosen else cell)
    lines.append(f"| /{patch} | " + " | ".join(cells) + " |")
  edge = [f"/{p}" for p, lr in lrs.items() if lr in (CONV_TUNE_LRS[0], CONV_TUNE_LRS[-1])]
  if edge:
    lines += [
      "",
      f"The best rate of {', '.join(edge)} is at the edge of the grid: a wider grid "
      "might find a better one.",
    ]
  # the patch table
  lines += [
    "",
    '<a id="converged-patch"></a>',
    "",
    f"## Patch size at convergence: /1 vs /2 vs /4 ({args.seeds} seeds)",
    "",
    "Final test top-1 after the last epoch, mean ± std over seeds (model init, data "
    "order and augmentation); *plateau*: the largest spread of a run's last 5 epochs "
    "(the issue's test: under 0.3 points); *train FLOPs*: model FLOPs of one run "
    "(3 x forward, `benchmarks.throughput.analytic_flops`); *wall*: minutes per run "
    "on the 2 shared cores.",
    "",
    "| patch | tokens | lr | test top-1 % | best epoch's top-1 % | plateau (points) "
    "| train PFLOP | wall min / run |",
    "|---|---|---|---|---|---|---|---|",
  ]
  curves = {}
  for patch in PATCHES:
    runs = _conv_curves(results, "conv_patch", patch=patch)
    curves[patch] = runs
    final = results.top1("conv_patch", patch=patch)
    best = [max(v for _, v in c) for c in runs if c]
    plateaus = [p for p in map(_plateau, runs) if p is not None]
    walls = [r["wall_s"] for _, r in results.select("conv_patch", patch=patch)]
    flops = _train_flops(patch) * CONV_EPOCHS * per_epoch * CONV_BATCH
    lines.append(
      f"| /{patch} | {(CONV_SIZE // patch) ** 2} | {lrs[patch]:g} | "
      if lrs[patch]
      else f"| /{patch} | {(CONV_SIZE // patch) ** 2} | — | "
    )
    lines[-1] += (
      " | ".join(
        [
          fmt_pct(final),
          fmt_pct(best),
          f"{max(plateaus):.2f}" if plateaus else "—",
          f"{flops / 1e15:.2f}",
          f"{statistics.mean(walls) / 60:.0f}" if walls else "—",
        ]
      )
      + " |"
    )
  lines.append("")
  p1, p2, p4 = (results.top1("conv_patch", patch=p) for p in PATCHES)
  said = [
    s
    for s in (compare(p1, p2, "/1", "/2"), compare(p2, p4, "/2", "/4"), compare(p1, p4, "/1", "/4"))
    if s
  ]
  lines += [f"* {s}." for s in said]
  lines += ["", _converged_verdict(results, p1, p2, p4, curves, per_epoch)]
  lines += [
    "",
    "![test accuracy against epochs and training FLOPs](results_converged_curves.png)",
    "",
    "Command of one cell (the others change `variant`, `seed` and the tuned lr):",
    "",
    "```",
    _example(jobs_for_report(args), "conv_patch", fallback="conv_tune"),
    "```",
    "",
  ]
  _plot_converged(curves, per_epoch)
  lines += _converged_locality(args, results)
  lines += _converged_budget(args, results)
  return lines


# A tuning run trains CONV_TUNE_EPOCHS on 4/5 of the train file: this many
# times fewer images than a converged cell.
_TUNE_SHARE = CONV_EPOCHS * 5 / (CONV_TUNE_EPOCHS * 4)


def _converged_budget(args, results: "Results") -> list[str]:
  """The plan from measured costs: minutes per cell of each patch size (its
  finished cells, else its tuning runs scaled by the images they saw)."""
  lines = [
    '<a id="converged-budget"></a>',
    "",
    "## Budget of the converged study",
    "",
    "Cost per run as measured here (wall minutes of the finished runs, which ran two at "
    "a time, each on one core; a patch size with no finished cell yet is estimated from "
    f"its tuning runs x {_TUNE_SHARE:.2f}, the ratio of images seen), and the plan it "
    "gives for every cell of the study:",
    "",
    "| patch | min / cell | how measured | cells (finished / all) | tuning min | est. total h |",
    "|---|---|---|---|---|---|",
  ]
  all_cells = _conv_cells(args.seeds, dict.fromkeys(PATCHES, 1.0))
  total, unmeasured = 0.0, []
  for patch in PATCHES:
    cells = [job for job in all_cells if job.label("patch") == patch]
    done = [results.records[job.name][1]["wall_s"] for job in cells if job.name in results.records]
    tuning = [record["wall_s"] for _, record in results.select("conv_tune", patch=patch)]
    if done:
      per_cell, how = statistics.mean(done) / 60, f"{len(done)} finished cell(s)"
    elif tuning:
      per_cell, how = statistics.mean(tuning) * _TUNE_SHARE / 60, f"{len(tuning)} tuning run(s)"
    else:
      lines.append(f"| /{patch} | — | not measured yet | 0 / {len(cells)} | — | — |")
      unmeasured.append(f"/{patch}")
      continue
    tune_min = sum(tuning) / 60 + (len(CONV_TUNE_LRS) - len(tuning)) * per_cell / _TUNE_SHARE
    hours = (len(cells) * per_cell + tune_min) / 60
    total += hours
    lines.append(
      f"| /{patch} | {per_cell:.0f} | {how} | {len(done)} / {len(cells)} | "
      f"{tune_min:.0f} | {hours:.1f} |"
    )
  lines += [
    "",
    f"Summed compute for the plan: about {total:.1f} hours of runs"
    + (f" without {' and '.join(unmeasured)}, not measured yet" if unmeasured else "")
    + " (two run at once on the 2 cores, so the wall time is about half). Cut first "
    "if it must be: "
    "16x16 and MAE at convergence were not started; the seeds and epochs are "
    "not cut.",
    "",
  ]
  return lines


@functools.cache
def _train_flops(patch: int) -> float:
  """Model FLOPs of one training image (3 x forward) of mu/patch at CONV_SIZE."""
  from benchmarks import throughput  # noqa: PLC0415  (imports the model: only for reports)

  return throughput.analytic_flops(f"mu/{patch}", CONV_SIZE, 1, 10, cls_token=False)["train"]


def _converged_verdict(results: "Results", p1, p2, p4, curves: dict, per_epoch: int) -> str:
  if not (p1 and p2 and p4):
    return ""
  means = {1: statistics.mean(p1), 2: statistics.mean(p2), 4: statistics.mean(p4)}
  order = sorted(means, key=lambda p: -means[p])
  noise = 200 * max(mean_std(v)[1] for v in (p1, p2))  # twice the larger std, in points
  gap = 100 * (means[1] - means[2])
  if gap > noise:
    verdict = "agrees with the paper: pixels beat 2x2 patches at equal model and recipe"
  elif gap < -noise:
    verdict = "disagrees with the paper: 2x2 patches beat pixels at equal model and recipe"
  else:
    verdict = (
      "neither agrees nor disagrees: /1 and /2 are within twice their seed std, "
      "which the paper's claim (/1 matches or beats /2) allows"
    )
  mean_curves = {p: _mean_curve(c) for p, c in curves.items() if c}
  cross = []
  for a, b in ((1, 2), (2, 4), (1, 4)):
    if a in mean_curves and b in mean_curves:
      epochs = _crossings(mean_curves[a], mean_curves[b], per_epoch)
      cross.append(
        f"/{a} and /{b} " + (f"cross at epoch {', '.join(epochs)}" if epochs else "never cross")
      )
  early = _early_order(results, "fashion_mnist")
  return (
    "**Against the paper.** At convergence the order is "
    + " > ".join(f"/{p}" for p in order)
    + f", and /1 − /2 = {gap:+.2f} points: this "
    + verdict
    + ". Mean curves: "
    + "; ".join(cross)
    + "."
    + (
      " After 0.4 epochs at 16x16 (the early-learning section below) the order on "
      "Fashion-MNIST was " + " > ".join(f"/{p}" for p in early) + "."
      if early
      else ""
    )
  )


def _converged_locality(args, results: "Results") -> list[str]:
  lines = [
    '<a id="converged-locality"></a>',
    "",
    f"## Locality at convergence: position embedding and pixel permutation ({args.seeds} seeds)",
    "",
    "The same recipe and tuned rate per patch size; `learn` and *unpermuted* are the "
    f"patch table's runs. Permutation: one fixed permutation (T = {CONV_SWAPS} swaps of "
    "pixel pairs, one per pixel on average) of every image, applied after augmentation "
    f"and before tokenisation, within δ = {CONV_DELTAS[0]} (neighbours: local) or δ = "
    f"{CONV_DELTAS[1]} (anywhere in the {CONV_SIZE}x{CONV_SIZE} image: global). Final "
    "test top-1 %, mean ± std.",
    "",
    "| cell | /1 | /2 | /2 − /1 |",
    "|---|---|---|---|",
  ]
  rows = [("learn (unpermuted)", "conv_patch", {})]
  rows += [(f"posemb {k}", "conv_posemb", {"posemb": k}) for k in ("sincos2d", "none")]
  rows += [(f"permuted, δ = {d}", "conv_permute", {"delta": d}) for d in CONV_DELTAS]
  cells = {}
  for name, group, labels in rows:
    a, b = (results.top1(group, patch=p, **labels) for p in (1, 2))
    cells[name] = (a, b)
    diff = f"{100 * (statistics.mean(b) - statistics.mean(a)):+.2f}" if a and b else "—"
    lines.append(f"| {name} | {fmt_pct(a)} | {fmt_pct(b)} | {diff} |")
  lines.append("")
  base1, base2 = cells["learn (unpermuted)"]
  for name, (a, b) in cells.items():
    if name.startswith("learn"):
      continue
    for patch, values, base in ((1, a, base1), (2, b, base2)):
      sentence = compare(values, base, f"{name} at /{patch}", "learn/unpermuted")
      if sentence:
        lines.append(f"* {sentence}.")
  lines += [
    "",
    _locality_verdict(cells),
    "",
    "```",
    _example(jobs_for_report(args), "conv_permute", fallback="conv_tune"),
    "```",
    "",
  ]
  return lines


def _locality_verdict(cells: dict) -> str:
  """The paper's two predictions against the cells that finished."""
  base1, base2 = cells["learn (unpermuted)"]
  said = []
  for delta in CONV_DELTAS:
    a, b = cells[f"permuted, δ = {delta}"]
    if a and b and base1 and base2:
      drop1 = 100 * (statistics.mean(base1) - statistics.mean(a))
      drop2 = 100 * (statistics.mean(base2) - statistics.mean(b))
      noise = 200 * max(mean_std(v)[1] for v in (a, b, base1, base2))
      more = (
        "hurts /2 more than /1, as the paper predicts"
        if drop2 - drop1 > noise
        else "hurts /1 more than /2, against the paper"
        if drop1 - drop2 > noise
        else "hurts /1 and /2 alike (the difference of the drops is within twice the "
        "largest seed std)"
      )
      said.append(
        f"δ = {delta}: the drop is {drop1:+.2f} points at /1 and {drop2:+.2f} at "
        f"/2, so permutation {more}"
      )
  for kind in ("sincos2d", "none"):
    a, b = cells[f"posemb {kind}"]
    if a and base1 and b and base2:
      said.append(
        f"posemb {kind} moves /1 by {100 * (statistics.mean(a) - statistics.mean(base1)):+.2f} "
        f"and /2 by {100 * (statistics.mean(b) - statistics.mean(base2)):+.2f} points "
        "against learned"
      )
  if not said:
    return ""
  return (
    "**Against the paper.** It predicts that a fixed permutation hurts a ViT/2 more "
    "than a PiT/1 and that removing the position embedding costs little. Here: "
    + "; ".join(said)
    + "."
  )


def _plot_converged(curves: dict, per_epoch: int) -> None:
  plt = _pyplot()
  if plt is None or not any(curves.values()):
    return
  figure, (by_epoch, by_flops) = plt.subplots(1, 2, figsize=(10, 3.8))
  for patch, runs in sorted(curves.items()):
    mean = _mean_curve([c for c in runs if c])
    if not mean:
      continue
    steps = [s for s, *_ in mean]
    epochs = [s / per_epoch for s in steps]
    flops = [s * CONV_BATCH * _train_flops(patch) for s in steps]
    seeds = f"{len(runs)} seed" + ("s" if len(runs) != 1 else "")
    label = f"/{patch} ({(CONV_SIZE // patch) ** 2} tokens, {seeds})"
    for axis, xs in ((by_epoch, epochs), (by_flops, flops)):
      (line,) = axis.plot(xs, [100 * m for _, m, _, _ in mean], label=label)
      axis.fill_between(
        xs,
        [100 * lo for *_, lo, _ in mean],
        [100 * hi for *_, hi in mean],
        alpha=0.25,
        color=line.get_color(),
      )
  by_epoch.set_xlabel("epoch")
  by_flops.set_xlabel("training FLOPs (model FLOPs, 3 x forward)")
  by_flops.set_xscale("log")
  for axis in (by_epoch, by_flops):
    axis.set_ylabel("test top-1 % (mean; band: min-max over seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  figure.suptitle("mu on 8x8 Fashion-MNIST, equal recipe, trained to a plateau")
  figure.tight_layout()
  figure.savefig(os.path.join(DOCS, "results_converged_curves.png"), dpi=120)
  plt.close(figure)


def _example(jobs, group, fallback: str | None = None):
  """One job's command line: of `group`, else of `fallback`'s (not listed yet)."""
  job = next((j for j in jobs if j.group == group), None)
  job = job or next(j for j in jobs if j.group == fallback)
  return "python -m " + " ".join(job.argv) + f" --workdir=RUNS/{job.name}"


def _patch_section(args, results: Results) -> list[str]:
  lines = [
    '<a id="patch"></a>',
    "",
    "## Patch size: 1 (PiT) vs 2 vs 4 (ViT)",
    "",
    f"Equal model, recipe and steps ({args.steps} steps of batch 128 ≈ "
    f"{args.steps * 128 / 60000:.1f} epochs); mean ± std over seeds (model init and "
    "data order). Train images/s: the real train step in a fresh process, one "
    "benchmark run of each (the `speed` group).",
    "",
    "| patch | tokens | "
    + " | ".join(DATASET_NAMES[d] + " top-1 %" for d in DATASETS)
    + " | train img/s | MFU |",
    "|---|---|" + "---|" * len(DATASETS) + "---|---|",
  ]
  plot = {}
  for patch in PATCHES:
    row = [f"/{patch}", str((IMAGE_SIZE // patch) ** 2)]
    for dataset in DATASETS:
      values = results.top1("patch", dataset=dataset, patch=patch)
      row.append(fmt_pct(values))
      plot.setdefault(dataset, []).append((patch, values))
    speed = results.select("speed", patch=patch)
    bench = (
      _read_json(os.path.join(args.root, speed[0][0].name, "throughput.json")) if speed else None
    )
    bench = bench[0] if bench and "error" not in bench[0] else None
    row += [
      f"{bench['images_per_s']:.0f}" if bench else "—",
      f"{100 * bench['mfu']:.1f}%" if bench else "—",
    ]
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  for dataset in DATASETS:
    p1, p2, p4 = (results.top1("patch", dataset=dataset, patch=p) for p in PATCHES)
    sentences = [s for s in (compare(p1, p2, "/1", "/2"), compare(p2, p4, "/2", "/4")) if s]
    if sentences:
      lines.append(f"* {DATASET_NAMES[dataset]}: " + "; ".join(sentences) + ".")
  lines += ["", _paper_direction(args, results)]
  lines += [
    "",
    "![accuracy against patch size](results_patch_size.png)",
    "",
    "Command of one cell (the others change `variant`, `dataset`, `seed`):",
    "",
    "```",
    _example(jobs_for_report(args), "patch"),
    "```",
    "",
  ]
  _plot_patch(plot)
  return lines


def _early_order(results: "Results", dataset: str) -> list[int] | None:
  """The early study's patch sizes on `dataset`, best mean first (None until
  every size has a finished run)."""
  means = {
    p: statistics.mean(v) for p in PATCHES if (v := results.top1("patch", dataset=dataset, patch=p))
  }
  return sorted(PATCHES, key=lambda p: -means[p]) if len(means) == len(PATCHES) else None


def _paper_direction(args, results: Results) -> str:
  """Whether the smaller patch won here, as the paper finds on CIFAR and ImageNet."""
  orders = {dataset: order for dataset in DATASETS if (order := _early_order(results, dataset))}
  if not orders:
    return ""
  verdicts = [
    f"{DATASET_NAMES[d]} ranks " + " > ".join(f"/{p}" for p in order) for d, order in orders.items()
  ]
  agree = all(order[0] == 1 for order in orders.values())
  return (
    "**Against the paper.** The paper finds smaller patches better (/1 ≥ /2 at "
    "convergence, after hundreds of epochs). Here " + "; ".join(verdicts) + f", after "
    f"{args.steps * 128 / 60000:.1f} epochs, far from convergence: this measures how "
    "fast each tokenisation learns at a fixed small budget, not the paper's converged "
    "claim. "
    + (
      "At this budget the order is the paper's."
      if agree
      else "At this budget the order is not the paper's: fewer, richer tokens "
      "learn faster (and /1 must learn 4x as many position embeddings from "
      "random init)."
    )
  )


def jobs_for_report(args):
  return jobs_for(argparse.Namespace(**{**vars(args), "only": GROUPS, "match": ""}))


def _posemb_section(args, results: Results) -> list[str]:
  learned = results.top1("patch", dataset="fashion_mnist", patch=1)
  rows = [("learn (random init)", learned)]
  rows += [(kind, results.top1("posemb", posemb=kind)) for kind in ("sincos2d", "none")]
  lines = [
    '<a id="posemb"></a>',
    "",
    "## Position embedding at /1 (Fashion-MNIST)",
    "",
    "Same recipe as above; `learn` is the patch table's /1 row.",
    "",
    "| position embedding | top-1 % |",
    "|---|---|",
  ]
  lines += [f"| {name} | {fmt_pct(values)} |" for name, values in rows]
  lines += [""] + [
    f"* {s}."
    for s in (
      compare(rows[1][1], learned, "sincos2d", "learn"),
      compare(rows[2][1], learned, "none", "learn"),
    )
    if s
  ]
  lines += [
    "",
    "```",
    "python -m " + " ".join(_cls_argv("fashion_mnist", 1, 0, args.steps, posemb="none")),
    "```",
    "",
  ]
  return lines


def _permute_section(args, results: Results) -> list[str]:
  lines = [
    '<a id="permute"></a>',
    "",
    "## Pixel permutation (Fashion-MNIST)",
    "",
    "T swaps of pixel pairs at most δ apart (Chebyshev distance; δ = 16 is anywhere "
    "in the 16x16 image), one fixed permutation (seed 0) for every image, applied "
    "after augmentation and before tokenisation, so /1 and /2 see the same scrambled "
    "pixels. One seed per cell; T = 0 is the patch table's mean over seeds.",
    "",
    "| δ \\ T | " + " | ".join(f"{t}" for t in sorted({t for t, _ in PERMUTE_GRID})) + " |",
    "|---|" + "---|" * len({t for t, _ in PERMUTE_GRID}),
  ]
  plot = {}
  for patch in (2, 1):
    base = results.top1("patch", dataset="fashion_mnist", patch=patch)
    for delta in sorted({d for _, d in PERMUTE_GRID}):
      cells, points = [], [(0, statistics.mean(base))] if base else []
      for swaps in sorted({t for t, _ in PERMUTE_GRID}):
        values = results.top1("permute", patch=patch, swaps=swaps, delta=delta)
        cells.append(f"{100 * values[0]:.2f}" if values else "—")
        if values:
          points.append((swaps, values[0]))
      lines.append(f"| /{patch}, δ={delta} | " + " | ".join(cells) + " |")
      plot[(patch, delta)] = points
    if base:
      lines.append(
        f"| /{patch}, T=0 | {fmt_pct(base)} |" + " |" * (len({t for t, _ in PERMUTE_GRID}) - 1)
      )
  lines += ["", _permutation_verdict(plot, results)]
  lines += [
    "",
    "![accuracy against permutation strength](results_permutation.png)",
    "",
    "```",
    "python -m "
    + " ".join(_cls_argv("fashion_mnist", 2, 0, args.steps, swaps=512, swap_distance=4)),
    "```",
    "",
  ]
  _plot_permutation(plot)
  return lines


def _permutation_verdict(plot: dict, results: Results) -> str:
  """Per patch size: how many permuted cells fall below / rise above the
  unpermuted mean by more than twice its seed std, against the paper."""
  parts, lowered, raised = [], 0, 0
  for patch in (2, 1):
    base = results.top1("patch", dataset="fashion_mnist", patch=patch)
    cells = [v for (p, _), points in plot.items() if p == patch for t, v in points if t]
    if not base or not cells:
      continue
    mean = statistics.mean(base)
    noise = 2 * (statistics.stdev(base) if len(base) > 1 else 0.0)
    lower = sum(v < mean - noise for v in cells)
    higher = sum(v > mean + noise for v in cells)
    lowered, raised = lowered + lower, raised + higher
    parts.append(
      f"/{patch}: {lower} of {len(cells)} permuted cells below the unpermuted "
      f"mean ({100 * mean:.2f}) by more than twice its seed std, {higher} above it, "
      f"{len(cells) - lower - higher} within"
    )
  if not parts:
    return ""
  if raised > lowered:
    effect = "mostly raised accuracy instead of lowering it"
  elif lowered > raised:
    effect = "mostly lowered accuracy"
  else:
    effect = "moved accuracy both ways"
  return (
    "**Against the paper.** The paper finds that scrambling pixel locality costs a "
    "ViT/2 more than a PiT/1, which is close to permutation-invariant. Here, after 0.4 "
    "epochs and one seed per cell: " + "; ".join(parts) + ". At this budget a fixed "
    f"permutation {effect}"
    " (one seed per cell, against the seed spread of the unpermuted runs)."
  )


def _mae_verdict(rows: dict) -> str:
  """rows: patch -> {stage: top-1 or None}."""
  said = []
  for patch, row in sorted(rows.items()):
    if row.get("finetune") is not None and row.get("scratch") is not None:
      gain = 100 * (row["finetune"] - row["scratch"])
      said.append(
        f"at /{patch} fine-tuning from MAE {'beats' if gain > 0 else 'trails'} "
        f"the same recipe from scratch by {abs(gain):.1f} points"
      )
  if all(rows.get(p, {}).get("finetune") is not None for p in (1, 2)):
    diff = 100 * (rows[1]["finetune"] - rows[2]["finetune"])
    said.append(
      f"/1 fine-tuned is {abs(diff):.1f} points {'above' if diff > 0 else 'below'} /2 fine-tuned"
    )
  if not said:
    return ""
  gains = [
    r["finetune"] > r["scratch"]
    for r in rows.values()
    if r.get("finetune") is not None and r.get("scratch") is not None
  ]
  pit_ahead = (rows.get(1, {}).get("finetune") or 0) >= (rows.get(2, {}).get("finetune") or 1)
  return (
    "**Against the paper.** The paper finds MAE pre-training helps and PiT/1 slightly "
    "ahead of ViT/2 after fine-tuning (CIFAR-100, 86.0 vs 85.7 for Tiny). Here (one seed, "
    "400 + 200 steps): " + "; ".join(said) + ". The pre-training gain "
    f"{'agrees with the paper' if gains and all(gains) else 'does not hold everywhere'}; "
    "the /1 vs /2 order "
    + (
      "agrees too." if pit_ahead else "does not (it is the fixed-budget order of the patch table)."
    )
  )


def _mae_section(args, results: Results) -> list[str]:
  lines = [
    '<a id="mae"></a>',
    "",
    "## MAE pre-training (Fashion-MNIST, 16x16)",
    "",
    f"MAE pre-training for {args.mae_steps} steps (75% of the tokens masked, targets "
    "normalised over 2x2 windows so /1 and /2 learn the same targets, decoder 64 wide "
    f"and 2 deep), then {args.finetune_steps} steps of each of: fine-tuning the "
    "pre-trained encoder, the same fine-tune recipe from random init, and a linear "
    "probe of the frozen encoder (configs/mae_finetune.py:quick's recipes). One seed.",
    "",
    "| patch | MAE eval masked MSE | fine-tuned from MAE | same recipe from scratch "
    "| linear probe |",
    "|---|---|---|---|---|",
  ]
  rows = {}
  for patch in (1, 2):
    pre = results.select("mae", patch=patch, stage="pretrain")
    mse = results.metric(pre[0][0], "eval/loss") if pre else None
    cells = [f"{mse:.4f}" if mse is not None else "—"]
    rows[patch] = {}
    for stage in ("finetune", "scratch", "probe"):
      top1 = [
        results.metric(job, "eval/top1")
        for job, _ in results.select("mae", patch=patch, stage=stage)
      ]
      cells.append(fmt_pct(top1))
      rows[patch][stage] = top1[0] if top1 and top1[0] is not None else None
    lines.append(f"| /{patch} | " + " | ".join(cells) + " |")
  lines += ["", _mae_verdict(rows)]
  pictures = []
  for patch in (1, 2):
    source = _newest_picture(
      os.path.join(args.root, f"mae_fashion_mnist_p{patch}_pretrain"), "reconstructions_"
    )
    if source:
      target = f"results_mae_reconstructions_p{patch}.png"
      shutil.copyfile(source, os.path.join(DOCS, target))
      pictures.append(f"![MAE /{patch} reconstructions]({target})")
  lines += [
    "",
    "Reconstructions at the end of pre-training (columns: original, masked input, "
    "reconstruction, reconstruction with the visible tokens pasted back; /1 left, /2 "
    "right):",
    "",
    " ".join(pictures),
    "",
    "```",
    _example(jobs_for_report(args), "mae"),
    "```",
    "",
  ]
  return lines


def _dit_section(args, results: Results) -> list[str]:
  lines = [
    '<a id="dit"></a>',
    "",
    "## DiT: /1 vs /2 (8x8 digits)",
    "",
    "`configs/dit_pixel.py:quick` (3,000 steps, EMA 0.995) with `variant=mu/1` (64 "
    "pixel tokens) and `mu/2` (16 tokens of 2x2), then "
    f"`pixel_vit.sample` of {args.dit_samples} class-balanced samples (50 DDPM steps, "
    "guidance 1.5). Features for FID / precision / recall and the accuracy of the "
    "samples' labels come from the project's own digits classifier "
    "(`cls_pixel.py:quick`, trained by this group); the reference is its features of "
    "the 1,437 train digits. The digits are 8x8 because a DiT step on 16x16 MNIST was "
    "too slow for this machine (the sampler runs the model 100 times per sample).",
    "",
    "| patch | tokens | FID | accuracy on samples | IS | precision / recall |",
    "|---|---|---|---|---|---|",
  ]
  pictures = []
  for patch in (1, 2):
    metrics = (
      _read_json(os.path.join(args.root, f"dit_digits_p{patch}_samples", "samples.json"))
      if results.select("dit", patch=patch, stage="samples")
      else None
    )
    if metrics:
      lines.append(
        f"| /{patch} | {(8 // patch) ** 2} | {metrics['fid']:.2f} | "
        f"{100 * metrics['accuracy']:.1f}% | {metrics['inception_score']:.2f} | "
        f"{metrics['precision']:.2f} / {metrics['recall']:.2f} |"
      )
      source = os.path.join(args.root, f"dit_digits_p{patch}_samples", "samples.png")
      target = f"results_dit_samples_p{patch}.png"
      if os.path.exists(source):
        shutil.copyfile(source, os.path.join(DOCS, target))
        pictures.append(f"![DiT /{patch} samples]({target})")
    else:
      lines.append(f"| /{patch} | {(8 // patch) ** 2} | — | — | — | — |")
  lines += [
    "",
    "Samples (rows: classes 0-9; /1 left, /2 right):",
    "",
    " ".join(pictures),
    "",
    "```",
    *(
      "python -m " + " ".join(j.argv)
      for j in jobs_for_report(args)
      if j.group == "dit" and j.label("patch") == 1
    ),
    "```",
    "",
  ]
  return lines


def _wall_section(results: Results) -> list[str]:
  lines = [
    '<a id="wall"></a>',
    "",
    "## Wall time",
    "",
    "| group | runs | wall time (min) |",
    "|---|---|---|",
  ]
  total = 0.0
  for group in GROUPS:
    runs = results.select(group)
    if runs:
      wall = results.wall(group)
      total += wall
      lines.append(f"| {group} | {len(runs)} | {wall / 60:.0f} |")
  lines += [f"| all | {len(results.records)} | {total / 60:.0f} |", ""]
  loads = [
    record["load_average"] for _, record in results.records.values() if "load_average" in record
  ]
  if loads:
    lines += [
      f"The 1-minute load average at the end of the runs ranged {min(loads):.1f}-"
      f"{max(loads):.1f} on {os.cpu_count()} cores: above the core count, runs shared "
      "the machine and their wall times are longer than alone.",
      "",
    ]
  return lines


def _newest_picture(workdir: str, prefix: str) -> str | None:
  directory = os.path.join(workdir, "pictures")
  if not os.path.isdir(directory):
    return None
  names = sorted(n for n in os.listdir(directory) if n.startswith(prefix))
  return os.path.join(directory, names[-1]) if names else None


def _pyplot():
  try:
    import matplotlib  # noqa: PLC0415  (the [bench] extra)
  except ImportError:
    print("[study] matplotlib is missing (pip install -e '.[bench]'): no plots", flush=True)
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def _plot_patch(plot: dict) -> None:
  plt = _pyplot()
  if plt is None or not any(v for points in plot.values() for _, v in points):
    return
  figure, axis = plt.subplots(figsize=(5, 3.5))
  for dataset, points in plot.items():
    points = [(p, v) for p, v in points if v]
    if points:
      stats = [mean_std([100 * x for x in v]) for _, v in points]
      axis.errorbar(
        [p for p, _ in points],
        [m for m, _ in stats],
        yerr=[s for _, s in stats],
        marker="o",
        capsize=4,
        label=DATASET_NAMES[dataset],
      )
  axis.set_xscale("log", base=2)
  axis.set_xticks(PATCHES, [f"/{p}" for p in PATCHES])
  axis.set_xlabel("patch size (tokens: 256, 64, 16)")
  axis.set_ylabel("test top-1 % (mean ± std)")
  axis.set_title("mu, 16x16, equal recipe and steps")
  axis.grid(alpha=0.3)
  axis.legend()
  figure.tight_layout()
  figure.savefig(os.path.join(DOCS, "results_patch_size.png"), dpi=120)
  plt.close(figure)


def _plot_permutation(plot: dict) -> None:
  plt = _pyplot()
  if plt is None or not any(len(points) > 1 for points in plot.values()):
    return
  figure, axis = plt.subplots(figsize=(5.5, 3.5))
  for (patch, delta), points in sorted(plot.items()):
    if len(points) > 1:
      axis.plot(
        [max(t, 8) for t, _ in points],
        [100 * v for _, v in points],
        marker="o" if patch == 1 else "s",
        linestyle="-" if patch == 2 else "--",
        label=f"/{patch}, δ={delta}",
      )
  axis.set_xscale("log", base=2)
  axis.set_xlabel("T swaps (leftmost point: T = 0)")
  axis.set_ylabel("test top-1 %")
  axis.set_title("Fashion-MNIST 16x16, pixel permutation")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=7, ncol=2)
  figure.tight_layout()
  figure.savefig(os.path.join(DOCS, "results_permutation.png"), dpi=120)
  plt.close(figure)


# ------------------------------------------------------------------ main


def parse_flags(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", default="/tmp/pixel_vit_study", help="where the workdirs go")
  p.add_argument(
    "--only", default=",".join(GROUPS), help=f"comma-separated groups of {list(GROUPS)}"
  )
  p.add_argument(
    "--match",
    default="",
    help="only the runs whose name contains this (e.g. _p2_), to split a group between processes",
  )
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--steps", type=int, default=200, help="classification steps per run")
  p.add_argument("--mae_steps", type=int, default=400)
  p.add_argument("--finetune_steps", type=int, default=200)
  p.add_argument("--dit_samples", type=int, default=1000)
  p.add_argument(
    "--parallel",
    type=int,
    default=1,
    help="runs at a time, each pinned to one core with one XLA thread (2 on 2 "
    "cores: 1.19x the images/s of one run on both, for mu/1 at 8x8)",
  )
  p.add_argument(
    "--records",
    default=os.path.join(DOCS, "study_runs"),
    help="copy each finished run's records here (empty: nowhere)",
  )
  p.add_argument("--report_only", action="store_true", help="only rewrite docs/results.md")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = p.parse_args(argv)
  args.only = tuple(g for g in args.only.split(",") if g)
  unknown = sorted(set(args.only) - set(GROUPS))
  if unknown:
    p.error(f"--only: unknown group(s) {unknown}; choose from {list(GROUPS)}")
  if args.seeds < 1:
    p.error("--seeds must be >= 1")
  if args.parallel < 1:
    p.error("--parallel must be >= 1")
  args.root = os.path.abspath(args.root)
  return args


def run_all(args) -> None:
  """Runs every missing job, --parallel at a time (each on a core of its own),
  a job only once the jobs it needs have finished. The list is read again
  after each run: finished tuning adds the converged cells."""
  lock = threading.Condition()
  running: set[str] = set()
  failures: list[BaseException] = []

  def next_job() -> Job | None:
    """The first runnable job; None when nothing is left (waits while a
    running job may still unlock more)."""
    with lock:
      while not failures:
        done = {job.name for job in jobs_for_report(args) if finished(args.root, job)}
        todo = [job for job in jobs_for(args) if job.name not in done | running]
        ready = [job for job in todo if set(job.needs) <= done]
        if ready:
          running.add(ready[0].name)
          print(f"[study] {len(todo)} to run, {len(running)} running", flush=True)
          return ready[0]
        if not running:
          return None
        lock.wait()
      return None

  def worker(core: int | None) -> None:
    while (job := next_job()) is not None:
      try:
        run(args.root, job, core)
        if args.records:
          keep_records(args.root, job, args.records)
      except BaseException as error:  # noqa: BLE001  (SystemExit of a failed run included)
        failures.append(error)
      with lock:
        running.discard(job.name)
        if not failures:
          write_report(args, jobs_for_report(args))  # the file follows the runs
        lock.notify_all()

  if args.parallel == 1:
    worker(None)
  else:
    threads = [
      threading.Thread(target=worker, args=(core % (os.cpu_count() or 1),))
      for core in range(args.parallel)
    ]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
  if failures:
    raise failures[0]


def main(argv=None) -> int:
  args = parse_flags(argv)
  jobs = jobs_for(args)
  if args.dry_run:
    for job in jobs:
      print(" ".join(job.command(args.root)[1:]))
    return 0
  if not args.report_only:
    run_all(args)
  print(write_report(args, jobs_for_report(args)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
