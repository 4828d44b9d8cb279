r"""MAE pre-training + fine-tuning vs training from scratch, at equal budget.

On real data from ../shared/data (Fashion-MNIST, resized to 14x14 so a pixel
transformer has 196 tokens), with pixel tokens (`mu/1`):

  1. MAE pre-training on the train split (labels unused),
  2. fine-tuning that encoder for F steps (configs/mae_finetune.py),
  3. the same fine-tuning recipe and F steps from random init,
  4. a linear probe of the pre-trained encoder (frozen) for F steps.

Each stage is `python -m pixel_vit.main` in a fresh process, exactly as a
user runs it; the table is read from each workdir's metrics.jsonl.

  python -m benchmarks.mae_vs_scratch [--pretrain_steps=2000] [--finetune_steps=600]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data",
                            "fashion_mnist_debian_{split}.npz")


def run_stage(name: str, config: str, workdir: str, overrides: list[str]) -> float:
  """Runs one stage and returns its wall time; its log goes to workdir/log.txt."""
  os.makedirs(workdir, exist_ok=True)
  command = [sys.executable, "-m", "pixel_vit.main", f"--config={config}",
             f"--workdir={workdir}", *overrides]
  print(f"[{name}] {' '.join(command)}", flush=True)
  start = time.time()
  with open(os.path.join(workdir, "log.txt"), "w") as log:
    result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  elapsed = time.time() - start
  if result.returncode:
    raise SystemExit(f"[{name}] failed (exit {result.returncode}); see {workdir}/log.txt")
  print(f"[{name}] done in {elapsed:.0f} s", flush=True)
  return elapsed


def last_eval(workdir: str, key: str) -> float:
  value = None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if key in record:
        value = record[key]
  if value is None:
    raise SystemExit(f"{workdir}/metrics.jsonl has no {key}")
  return value


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=DEFAULT_DATA, help="npz path with {split}")
  parser.add_argument("--image_size", type=int, default=14)
  parser.add_argument("--variant", default="mu/1")
  parser.add_argument("--pretrain_steps", type=int, default=2000)
  parser.add_argument("--finetune_steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=64)
  # A few hundred steps need a larger lr than MAE's 100-epoch recipe (base
  # 5e-4); these are configs/mae_finetune.py:quick's values.
  parser.add_argument("--finetune_base_lr", type=float, default=4e-3)
  parser.add_argument("--probe_base_lr", type=float, default=2e-2)
  parser.add_argument("--workdir", default="/tmp/pixel_vit_mae_vs_scratch")
  args = parser.parse_args(argv)

  dataset = f"npz:{args.data}"
  common = [f"--config.data.image_size={args.image_size}", "--config.eval_batch_size=1000",
            "--config.model.scan=False", "--config.model.remat=none"]
  # Re-running with the same --workdir reuses a finished pre-training (the
  # run resumes at its last step and only evaluates).
  pretrain_dir = os.path.join(args.workdir, "pretrain")
  times = {}
  times["MAE pre-training"] = run_stage(
      "pretrain", f"configs/mae_pixel.py:variant={args.variant},dataset={dataset}",
      pretrain_dir,
      common + [f"--config.total_steps={args.pretrain_steps}", "--config.batch_size=128",
                "--config.optimizer.base_lr=1.5e-3", "--config.optimizer.warmup_steps=100",
                "--config.model.decoder.width=64", "--config.model.decoder.depth=2",
                "--config.model.decoder.heads=4", "--config.model.decoder.mlp_dim=256",
                "--config.augment.flip=False", "--config.augment.crop=False",
                "--config.model.posemb=learn", "--config.model.norm_pix_loss=False",
                f"--config.eval_every={args.pretrain_steps}",
                f"--config.checkpoint_every={args.pretrain_steps}"])
  finetune = common + [f"--config.total_steps={args.finetune_steps}",
                       f"--config.batch_size={args.batch}",
                       f"--config.eval_every={args.finetune_steps}",
                       f"--config.checkpoint_every={args.finetune_steps}",
                       "--config.optimizer.warmup_steps=50", "--config.model.posemb=learn",
                       # mixup / cutmix only pay off over long schedules
                       "--config.augment.mixup_alpha=0", "--config.augment.cutmix_alpha=0"]
  rows = []
  for name, mode, init_from in (("fine-tune from MAE", "finetune", pretrain_dir),
                                ("from scratch (same recipe)", "finetune", ""),
                                ("linear probe of MAE encoder", "probe", pretrain_dir)):
    workdir = os.path.join(args.workdir, mode + ("_from_mae" if init_from else "_from_scratch"))
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume
    config = (f"configs/mae_finetune.py:mode={mode},variant={args.variant},dataset={dataset}"
              + (f",init_from={init_from}" if init_from else ""))
    base_lr = args.probe_base_lr if mode == "probe" else args.finetune_base_lr
    times[name] = run_stage(name, config, workdir,
                            finetune + [f"--config.optimizer.base_lr={base_lr}"])
    rows.append((name, last_eval(workdir, "eval/top1"), last_eval(workdir, "eval/count")))

  print(f"\nFashion-MNIST {args.image_size}x{args.image_size}, {args.variant} "
        f"({(args.image_size // int(args.variant.split('/')[1])) ** 2} tokens), "
        f"MAE pre-training {args.pretrain_steps} steps x 128, then {args.finetune_steps} "
        f"steps x {args.batch} for each row:\n")
  print("| run | test top-1 | test examples | wall s |")
  print("|---|---|---|---|")
  for name, top1, count in rows:
    print(f"| {name} | {100 * top1:.2f}% | {int(count)} | {times[name]:.0f} |")
  print(f"| (MAE pre-training, eval masked MSE {last_eval(pretrain_dir, 'eval/loss'):.4f}) "
        f"| — | — | {times['MAE pre-training']:.0f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
