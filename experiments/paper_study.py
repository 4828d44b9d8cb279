r"""The measured study behind docs/results.md: the paper's findings on real data, 2 CPU cores.

Every run is `python -m pixel_vit.main` (or `pixel_vit.sample`, or
`benchmarks.throughput`) in a fresh process, exactly as a user runs it, with
its workdir under --root; the tables are read back from each workdir's
metrics.jsonl, and docs/results.md plus its plots are rewritten from them.

Groups (--only picks some; every group shares the recipe below):
  patch     patch 1 vs 2 vs 4, Fashion-MNIST and MNIST, --seeds seeds each
  posemb    position embedding learn / sincos2d / none at /1 (Fashion-MNIST)
  permute   pixel permutation: accuracy against (T swaps, delta) for /1 and /2
  mae       MAE pre-training + fine-tune vs the same fine-tune from scratch vs
            a linear probe, /1 and /2 (Fashion-MNIST)
  dit       DiT /1 vs /2 on the 8x8 digits: FID and accuracy of the samples
            with the project's own digits classifier as the feature extractor
  speed     train-step images/s of each patch size (benchmarks/throughput.py)

Recipe: the `mu` model (64 wide, 4 blocks, 4 heads) of configs/*:quick, the
28x28 images resized to 16x16 (256 pixel tokens: at 28x28, 784 tokens, one
PiT step was ~5x slower and the study would not fit a day on 2 cores; 16
also lets 4x4 patches tile the image), batch 128, AdamW lr 1e-3 with 50
warmup steps and cosine decay, no augmentation, global average pooling.

  python -m experiments.paper_study    # everything (an estimated 3-4 h on 2 idle cores)
  python -m experiments.paper_study --only=patch --seeds=3
  python -m experiments.paper_study --report_only       # rewrite docs/ from the workdirs
  python -m experiments.paper_study --dry_run           # print the commands

--only / --match split the study between processes that share --root (the
report, --report_only once they are done, reads every workdir).

docs/study_runs/ keeps each run's records (study.json, metrics.jsonl,
samples / throughput JSON, the last picture; no checkpoints): copy it to the
root (`cp -r docs/study_runs/. /tmp/pixel_vit_study/`) and --report_only
rewrites the committed report, and a plain run runs only what is missing
(an MAE fine-tune or probe still needs its pre-training's checkpoint).

A finished run (its study.json records the same command) is not run again,
so an interrupted study continues where it stopped; an unfinished one
resumes from its checkpoint (exact resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
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
GROUPS = ("patch", "posemb", "permute", "mae", "dit", "speed")


@dataclasses.dataclass(frozen=True)
class Job:
  name: str  # its workdir under --root
  group: str
  argv: tuple[str, ...]  # after `python -m`, without --workdir
  workdir_flag: bool = True  # else benchmarks.throughput's --json_out, or argv has it
  labels: tuple = ()  # what the report groups it by, e.g. (('patch', 1), ('seed', 0))

  def command(self, root: str) -> list[str]:
    path = os.path.join(root, self.name)
    if self.workdir_flag:
      extra = [f"--workdir={path}"]
    elif self.argv[0] == "benchmarks.throughput":
      extra = [f"--json_out={os.path.join(path, 'throughput.json')}"]
    else:
      extra = []
    return [sys.executable, "-m", *self.argv, *extra]

  def label(self, key):
    return dict(self.labels).get(key)


def _cls_argv(dataset: str, patch: int, seed: int, steps: int, **args) -> tuple[str, ...]:
  args = {"posemb": "learn", **args}
  arg = ",".join([f"quick,variant=mu/{patch},dataset=npz:{DATASETS[dataset]}"]
                 + [f"{k}={v}" for k, v in args.items()])
  return ("pixel_vit.main", f"--config=configs/cls_pixel.py:{arg}", *_common(steps, seed))


def _common(steps: int, seed: int, warmup: int = 50) -> tuple[str, ...]:
  return (f"--config.data.image_size={IMAGE_SIZE}", f"--config.total_steps={steps}",
          f"--config.optimizer.warmup_steps={warmup}", "--config.eval_batch_size=1000",
          f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}",
          f"--config.seed={seed}")


def jobs_for(args) -> list[Job]:
  jobs = []
  seeds = range(args.seeds)
  steps = args.steps
  # patch (seed-major, so early results cover every cell once)
  for seed in seeds:
    for dataset in DATASETS:
      for patch in PATCHES:
        jobs.append(Job(f"cls_{dataset}_p{patch}_seed{seed}", "patch",
                        _cls_argv(dataset, patch, seed, steps),
                        labels=(("dataset", dataset), ("patch", patch), ("seed", seed))))
  for seed in seeds:
    for posemb in ("sincos2d", "none"):
      jobs.append(Job(f"cls_fashion_mnist_p1_{posemb}_seed{seed}", "posemb",
                      _cls_argv("fashion_mnist", 1, seed, steps, posemb=posemb),
                      labels=(("posemb", posemb), ("seed", seed))))
  for patch, grid in ((2, PERMUTE_GRID), (1, PERMUTE_GRID_P1)):
    for swaps, delta in grid:
      jobs.append(Job(f"cls_fashion_mnist_p{patch}_swaps{swaps}_d{delta}", "permute",
                      _cls_argv("fashion_mnist", patch, 0, steps, swaps=swaps,
                                swap_distance=delta),
                      labels=(("patch", patch), ("swaps", swaps), ("delta", delta))))
  jobs += _mae_jobs(args)
  jobs += _dit_jobs(args)
  for patch in PATCHES:
    jobs.append(Job(f"speed_p{patch}", "speed", (
        "benchmarks.throughput", "--config=configs/cls_pixel.py:quick,posemb=learn",
        f"--variant=mu/{patch}", f"--image_size={IMAGE_SIZE}", "--batch=128", "--channels=1",
        "--num_classes=10", "--steps=10", "--min_steps=5", "--max_timing_s=60"),
        workdir_flag=False, labels=(("patch", patch),)))
  return [j for j in jobs if j.group in args.only and args.match in j.name]


def _mae_jobs(args) -> list[Job]:
  jobs = []
  data = f"dataset=npz:{DATASETS['fashion_mnist']}"
  for patch in (1, 2):
    model = f"variant=mu/{patch},{data},posemb=learn"
    pretrain = f"mae_fashion_mnist_p{patch}_pretrain"
    jobs.append(Job(pretrain, "mae", (
        "pixel_vit.main", f"--config=configs/mae_pixel.py:quick,{model}",
        *_common(args.mae_steps, 0), "--config.mask_ratio=0.75",
        "--config.model.norm_pix_loss=True", "--config.model.norm_pix_window=2",
        "--config.optimizer.base_lr=1.5e-3"),
        labels=(("patch", patch), ("stage", "pretrain"))))
    init = os.path.join(args.root, pretrain)
    for stage, mode, init_from, base_lr in (("finetune", "finetune", init, 4e-3),
                                            ("scratch", "finetune", "", 4e-3),
                                            ("probe", "probe", init, 2e-2)):
      config = (f"configs/mae_finetune.py:quick,mode={mode},{model}"
                + (f",init_from={init_from}" if init_from else ""))
      jobs.append(Job(f"mae_fashion_mnist_p{patch}_{stage}", "mae", (
          "pixel_vit.main", f"--config={config}", *_common(args.finetune_steps, 0, warmup=50),
          f"--config.optimizer.base_lr={base_lr}"),
          labels=(("patch", patch), ("stage", stage))))
  return jobs


def _dit_jobs(args) -> list[Job]:
  classifier = os.path.join(args.root, "dit_digits_classifier")
  jobs = [Job("dit_digits_classifier", "dit", (
      "pixel_vit.main", "--config=configs/cls_pixel.py:quick"), labels=(("stage", "classifier"),))]
  for patch in (1, 2):
    config = f"--config=configs/dit_pixel.py:quick,variant=mu/{patch},classifier={classifier}"
    jobs.append(Job(f"dit_digits_p{patch}", "dit", ("pixel_vit.main", config),
                    labels=(("patch", patch), ("stage", "train"))))
    # The trained run's workdir; the samples go to this job's own directory.
    jobs.append(Job(f"dit_digits_p{patch}_samples", "dit", (
        "pixel_vit.sample", config, f"--num_samples={args.dit_samples}",
        f"--workdir={os.path.join(args.root, f'dit_digits_p{patch}')}",
        f"--out={os.path.join(args.root, f'dit_digits_p{patch}_samples', 'samples')}"),
        workdir_flag=False, labels=(("patch", patch), ("stage", "samples"))))
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


def run(root: str, job: Job) -> dict:
  workdir = os.path.join(root, job.name)
  previous = _read_json(_record_path(root, job))
  if previous and previous.get("argv") != list(job.argv):
    shutil.rmtree(workdir)  # another command: start afresh, never resume it
  os.makedirs(workdir, exist_ok=True)
  command = job.command(root)
  print(f"[study] {job.name}: {' '.join(command[1:])}", flush=True)
  start = time.time()
  with open(os.path.join(workdir, "log.txt"), "a") as log:
    result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  wall = time.time() - start
  if result.returncode:
    raise SystemExit(f"[study] {job.name} failed (exit {result.returncode}); see "
                     f"{workdir}/log.txt")
  record = {"argv": list(job.argv), "wall_s": wall, "finished": time.time(),
            "load_average": os.getloadavg()[0]}
  with open(_record_path(root, job), "w") as f:
    json.dump(record, f, indent=2)
  print(f"[study] {job.name}: done in {wall / 60:.1f} min", flush=True)
  return record


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
    return [(job, record) for job, record in self.records.values()
            if job.group == group and all(job.label(k) == v for k, v in labels.items())]

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
  return (f"{model} ({isa}), {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
          f"Python {platform.python_version()}, jax {jax.__version__}")


def write_report(args, jobs: list[Job]) -> str:
  os.makedirs(DOCS, exist_ok=True)  # the sections write their plots and pictures there
  results = Results(args.root, jobs)
  lines = [
      "# Measured study: pixels vs patches on real data, 2 CPU cores",
      "",
      f"Written by `python -m experiments.paper_study` on "
      f"{datetime.date.today().isoformat()}; machine: {machine()}. Every number below is "
      "read from the runs' `metrics.jsonl`; rerunning the script rewrites this file and its "
      "plots. The paper's own numbers (ImageNet, CIFAR-100, GPUs) are in the README; this "
      "is a small-scale check of the same comparisons, not a reproduction of them.",
      "",
      "**Recipe (all classification runs).** " + RECIPE,
      "",
      f"**Runs.** {len(results.records)} of {len(jobs)} finished; a cell marked — was not "
      "run yet (`python -m experiments.paper_study` runs only what is missing).",
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
    "test split.")


def _example(jobs, group):
  job = next(j for j in jobs if j.group == group)
  return "python -m " + " ".join(job.argv) + f" --workdir=RUNS/{job.name}"


def _patch_section(args, results: Results) -> list[str]:
  lines = ['<a id="patch"></a>', "", "## Patch size: 1 (PiT) vs 2 vs 4 (ViT)", "",
           f"Equal model, recipe and steps ({args.steps} steps of batch 128 ≈ "
           f"{args.steps * 128 / 60000:.1f} epochs); mean ± std over seeds (model init and "
           "data order). Train images/s: the real train step in a fresh process, one "
           "benchmark run of each (the `speed` group).", "",
           "| patch | tokens | " + " | ".join(DATASET_NAMES[d] + " top-1 %" for d in DATASETS)
           + " | train img/s | MFU |",
           "|---|---|" + "---|" * len(DATASETS) + "---|---|"]
  plot = {}
  for patch in PATCHES:
    row = [f"/{patch}", str((IMAGE_SIZE // patch) ** 2)]
    for dataset in DATASETS:
      values = results.top1("patch", dataset=dataset, patch=patch)
      row.append(fmt_pct(values))
      plot.setdefault(dataset, []).append((patch, values))
    speed = results.select("speed", patch=patch)
    bench = (_read_json(os.path.join(args.root, speed[0][0].name, "throughput.json"))
             if speed else None)
    bench = bench[0] if bench and "error" not in bench[0] else None
    row += [f"{bench['images_per_s']:.0f}" if bench else "—",
            f"{100 * bench['mfu']:.1f}%" if bench else "—"]
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  for dataset in DATASETS:
    p1, p2, p4 = (results.top1("patch", dataset=dataset, patch=p) for p in PATCHES)
    sentences = [s for s in (compare(p1, p2, "/1", "/2"), compare(p2, p4, "/2", "/4")) if s]
    if sentences:
      lines.append(f"* {DATASET_NAMES[dataset]}: " + "; ".join(sentences) + ".")
  lines += ["", _paper_direction(args, results)]
  lines += ["", "![accuracy against patch size](results_patch_size.png)", "",
            "Command of one cell (the others change `variant`, `dataset`, `seed`):", "",
            "```", _example(jobs_for_report(args), "patch"), "```", ""]
  _plot_patch(plot)
  return lines


def _paper_direction(args, results: Results) -> str:
  """Whether the smaller patch won here, as the paper finds on CIFAR and ImageNet."""
  orders = {}  # dataset -> patches, best first
  for dataset in DATASETS:
    means = {p: statistics.mean(v) for p in PATCHES
             if (v := results.top1("patch", dataset=dataset, patch=p))}
    if len(means) == len(PATCHES):
      orders[dataset] = sorted(PATCHES, key=lambda p: -means[p])
  if not orders:
    return ""
  verdicts = [f"{DATASET_NAMES[d]} ranks " + " > ".join(f"/{p}" for p in order)
              for d, order in orders.items()]
  agree = all(order[0] == 1 for order in orders.values())
  return ("**Against the paper.** The paper finds smaller patches better (/1 ≥ /2 at "
          "convergence, after hundreds of epochs). Here " + "; ".join(verdicts) + f", after "
          f"{args.steps * 128 / 60000:.1f} epochs, far from convergence: this measures how "
          "fast each tokenisation learns at a fixed small budget, not the paper's converged "
          "claim. " + ("At this budget the order is the paper's." if agree else
                       "At this budget the order is not the paper's: fewer, richer tokens "
                       "learn faster (and /1 must learn 4x as many position embeddings from "
                       "random init)."))


def jobs_for_report(args):
  return jobs_for(argparse.Namespace(**{**vars(args), "only": GROUPS, "match": ""}))


def _posemb_section(args, results: Results) -> list[str]:
  learned = results.top1("patch", dataset="fashion_mnist", patch=1)
  rows = [("learn (random init)", learned)]
  rows += [(kind, results.top1("posemb", posemb=kind)) for kind in ("sincos2d", "none")]
  lines = ['<a id="posemb"></a>', "", "## Position embedding at /1 (Fashion-MNIST)", "",
           "Same recipe as above; `learn` is the patch table's /1 row.", "",
           "| position embedding | top-1 % |", "|---|---|"]
  lines += [f"| {name} | {fmt_pct(values)} |" for name, values in rows]
  lines += [""] + [f"* {s}." for s in (compare(rows[1][1], learned, "sincos2d", "learn"),
                                       compare(rows[2][1], learned, "none", "learn")) if s]
  lines += ["", "```", "python -m " + " ".join(_cls_argv("fashion_mnist", 1, 0, args.steps,
                                                         posemb="none")), "```", ""]
  return lines


def _permute_section(args, results: Results) -> list[str]:
  lines = ['<a id="permute"></a>', "", "## Pixel permutation (Fashion-MNIST)", "",
           "T swaps of pixel pairs at most δ apart (Chebyshev distance; δ = 16 is anywhere "
           "in the 16x16 image), one fixed permutation (seed 0) for every image, applied "
           "after augmentation and before tokenisation, so /1 and /2 see the same scrambled "
           "pixels. One seed per cell; T = 0 is the patch table's mean over seeds.", "",
           "| δ \\ T | " + " | ".join(f"{t}" for t in sorted({t for t, _ in PERMUTE_GRID}))
           + " |", "|---|" + "---|" * len({t for t, _ in PERMUTE_GRID})]
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
      lines.append(f"| /{patch}, T=0 | {fmt_pct(base)} |" + " |" * (
          len({t for t, _ in PERMUTE_GRID}) - 1))
  lines += ["", _permutation_verdict(plot, results)]
  lines += ["", "![accuracy against permutation strength](results_permutation.png)", "",
            "```", "python -m " + " ".join(_cls_argv("fashion_mnist", 2, 0, args.steps,
                                                     swaps=512, swap_distance=4)), "```", ""]
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
    parts.append(f"/{patch}: {lower} of {len(cells)} permuted cells below the unpermuted "
                 f"mean ({100 * mean:.2f}) by more than twice its seed std, {higher} above it, "
                 f"{len(cells) - lower - higher} within")
  if not parts:
    return ""
  return ("**Against the paper.** The paper finds that scrambling pixel locality costs a "
          "ViT/2 more than a PiT/1, which is close to permutation-invariant. Here, after 0.4 "
          "epochs and one seed per cell: " + "; ".join(parts) + ". At this budget a fixed "
          f"permutation {'mostly raised accuracy instead of lowering it' if raised > lowered else 'mostly lowered accuracy' if lowered > raised else 'moved accuracy both ways'}"
          " (one seed per cell, against the seed spread of the unpermuted runs).")


def _mae_verdict(rows: dict) -> str:
  """rows: patch -> {stage: top-1 or None}."""
  said = []
  for patch, row in sorted(rows.items()):
    if row.get("finetune") is not None and row.get("scratch") is not None:
      gain = 100 * (row["finetune"] - row["scratch"])
      said.append(f"at /{patch} fine-tuning from MAE {'beats' if gain > 0 else 'trails'} "
                  f"the same recipe from scratch by {abs(gain):.1f} points")
  if all(rows.get(p, {}).get("finetune") is not None for p in (1, 2)):
    diff = 100 * (rows[1]["finetune"] - rows[2]["finetune"])
    said.append(f"/1 fine-tuned is {abs(diff):.1f} points {'above' if diff > 0 else 'below'} "
                "/2 fine-tuned")
  if not said:
    return ""
  gains = [r["finetune"] > r["scratch"] for r in rows.values()
           if r.get("finetune") is not None and r.get("scratch") is not None]
  pit_ahead = (rows.get(1, {}).get("finetune") or 0) >= (rows.get(2, {}).get("finetune") or 1)
  return ("**Against the paper.** The paper finds MAE pre-training helps and PiT/1 slightly "
          "ahead of ViT/2 after fine-tuning (CIFAR-100, 86.0 vs 85.7 for Tiny). Here (one seed, "
          "400 + 200 steps): " + "; ".join(said) + ". The pre-training gain "
          f"{'agrees with the paper' if gains and all(gains) else 'does not hold everywhere'}; "
          f"the /1 vs /2 order {'agrees too' if pit_ahead else 'does not (it is the fixed-budget order of the patch table)'}.")


def _mae_section(args, results: Results) -> list[str]:
  lines = ['<a id="mae"></a>', "", "## MAE pre-training (Fashion-MNIST, 16x16)", "",
           f"MAE pre-training for {args.mae_steps} steps (75% of the tokens masked, targets "
           "normalised over 2x2 windows so /1 and /2 learn the same targets, decoder 64 wide "
           f"and 2 deep), then {args.finetune_steps} steps of each of: fine-tuning the "
           "pre-trained encoder, the same fine-tune recipe from random init, and a linear "
           "probe of the frozen encoder (configs/mae_finetune.py:quick's recipes). One seed.",
           "", "| patch | MAE eval masked MSE | fine-tuned from MAE | same recipe from scratch "
           "| linear probe |", "|---|---|---|---|---|"]
  rows = {}
  for patch in (1, 2):
    pre = results.select("mae", patch=patch, stage="pretrain")
    mse = results.metric(pre[0][0], "eval/loss") if pre else None
    cells = [f"{mse:.4f}" if mse is not None else "—"]
    rows[patch] = {}
    for stage in ("finetune", "scratch", "probe"):
      top1 = [results.metric(job, "eval/top1") for job, _ in
              results.select("mae", patch=patch, stage=stage)]
      cells.append(fmt_pct(top1))
      rows[patch][stage] = top1[0] if top1 and top1[0] is not None else None
    lines.append(f"| /{patch} | " + " | ".join(cells) + " |")
  lines += ["", _mae_verdict(rows)]
  pictures = []
  for patch in (1, 2):
    source = _newest_picture(os.path.join(args.root, f"mae_fashion_mnist_p{patch}_pretrain"),
                             "reconstructions_")
    if source:
      target = f"results_mae_reconstructions_p{patch}.png"
      shutil.copyfile(source, os.path.join(DOCS, target))
      pictures.append(f"![MAE /{patch} reconstructions]({target})")
  lines += ["", "Reconstructions at the end of pre-training (columns: original, masked input, "
            "reconstruction, reconstruction with the visible tokens pasted back; /1 left, /2 "
            "right):", "", " ".join(pictures), "", "```",
            _example(jobs_for_report(args), "mae"), "```", ""]
  return lines


def _dit_section(args, results: Results) -> list[str]:
  lines = ['<a id="dit"></a>', "", "## DiT: /1 vs /2 (8x8 digits)", "",
           "`configs/dit_pixel.py:quick` (3,000 steps, EMA 0.995) with `variant=mu/1` (64 "
           "pixel tokens) and `mu/2` (16 tokens of 2x2), then "
           f"`pixel_vit.sample` of {args.dit_samples} class-balanced samples (50 DDPM steps, "
           "guidance 1.5). Features for FID / precision / recall and the accuracy of the "
           "samples' labels come from the project's own digits classifier "
           "(`cls_pixel.py:quick`, trained by this group); the reference is its features of "
           "the 1,437 train digits. The digits are 8x8 because a DiT step on 16x16 MNIST was "
           "too slow for this machine (the sampler runs the model 100 times per sample).", "",
           "| patch | tokens | FID | accuracy on samples | IS | precision / recall |",
           "|---|---|---|---|---|---|"]
  pictures = []
  for patch in (1, 2):
    metrics = _read_json(os.path.join(args.root, f"dit_digits_p{patch}_samples",
                                      "samples.json")) if results.select(
        "dit", patch=patch, stage="samples") else None
    if metrics:
      lines.append(f"| /{patch} | {(8 // patch) ** 2} | {metrics['fid']:.2f} | "
                   f"{100 * metrics['accuracy']:.1f}% | {metrics['inception_score']:.2f} | "
                   f"{metrics['precision']:.2f} / {metrics['recall']:.2f} |")
      source = os.path.join(args.root, f"dit_digits_p{patch}_samples", "samples.png")
      target = f"results_dit_samples_p{patch}.png"
      if os.path.exists(source):
        shutil.copyfile(source, os.path.join(DOCS, target))
        pictures.append(f"![DiT /{patch} samples]({target})")
    else:
      lines.append(f"| /{patch} | {(8 // patch) ** 2} | — | — | — | — |")
  lines += ["", "Samples (rows: classes 0-9; /1 left, /2 right):", "", " ".join(pictures), "",
            "```", *("python -m " + " ".join(j.argv) for j in jobs_for_report(args)
                     if j.group == "dit" and j.label("patch") == 1), "```", ""]
  return lines


def _wall_section(results: Results) -> list[str]:
  lines = ['<a id="wall"></a>', "", "## Wall time", "", "| group | runs | wall time (min) |",
           "|---|---|---|"]
  total = 0.0
  for group in GROUPS:
    runs = results.select(group)
    if runs:
      wall = results.wall(group)
      total += wall
      lines.append(f"| {group} | {len(runs)} | {wall / 60:.0f} |")
  lines += [f"| all | {len(results.records)} | {total / 60:.0f} |", ""]
  loads = [record["load_average"] for _, record in results.records.values()
           if "load_average" in record]
  if loads:
    lines += [f"The 1-minute load average at the end of the runs ranged {min(loads):.1f}-"
              f"{max(loads):.1f} on {os.cpu_count()} cores: above the core count, runs shared "
              "the machine and their wall times are longer than alone.", ""]
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
      axis.errorbar([p for p, _ in points], [m for m, _ in stats], yerr=[s for _, s in stats],
                    marker="o", capsize=4, label=DATASET_NAMES[dataset])
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
      axis.plot([max(t, 8) for t, _ in points], [100 * v for _, v in points],
                marker="o" if patch == 1 else "s", linestyle="-" if patch == 2 else "--",
                label=f"/{patch}, δ={delta}")
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
  p.add_argument("--only", default=",".join(GROUPS),
                 help=f"comma-separated groups of {list(GROUPS)}")
  p.add_argument("--match", default="",
                 help="only the runs whose name contains this (e.g. _p2_), to split a group "
                      "between processes")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--steps", type=int, default=200, help="classification steps per run")
  p.add_argument("--mae_steps", type=int, default=400)
  p.add_argument("--finetune_steps", type=int, default=200)
  p.add_argument("--dit_samples", type=int, default=1000)
  p.add_argument("--report_only", action="store_true", help="only rewrite docs/results.md")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = p.parse_args(argv)
  args.only = tuple(g for g in args.only.split(",") if g)
  unknown = sorted(set(args.only) - set(GROUPS))
  if unknown:
    p.error(f"--only: unknown group(s) {unknown}; choose from {list(GROUPS)}")
  if args.seeds < 1:
    p.error("--seeds must be >= 1")
  args.root = os.path.abspath(args.root)
  return args


def main(argv=None) -> int:
  args = parse_flags(argv)
  jobs = jobs_for(args)
  if args.dry_run:
    for job in jobs:
      print(" ".join(job.command(args.root)[1:]))
    return 0
  if not args.report_only:
    todo = [job for job in jobs if finished(args.root, job) is None]
    print(f"[study] {len(jobs) - len(todo)} of {len(jobs)} runs already done; "
          f"{len(todo)} to run", flush=True)
    for index, job in enumerate(todo):
      print(f"[study] run {index + 1}/{len(todo)}", flush=True)
      run(args.root, job)
      write_report(args, jobs_for_report(args))  # the file follows the runs
  print(write_report(args, jobs_for_report(args)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
