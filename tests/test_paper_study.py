"""experiments/paper_study.py: its jobs, its resume rule and its report."""

import importlib.util
import json
import os
import shlex
import shutil
import types

import pytest

from experiments import paper_study
from support import Command, build


def test_every_group_has_jobs_with_distinct_workdirs(tmp_path):
  jobs = paper_study.jobs_for(paper_study.parse_flags([f"--root={tmp_path}"]))
  # the converged cells are listed once tuning has finished (below)
  assert {job.group for job in jobs} == set(paper_study.GROUPS) - {
    "conv_patch",
    "conv_posemb",
    "conv_permute",
  }
  names = [job.name for job in jobs]
  assert len(names) == len(set(names))
  patch = [job for job in jobs if job.group == "patch"]
  assert len(patch) == 3 * len(paper_study.DATASETS) * len(paper_study.PATCHES)  # 3 seeds


def test_match_and_only_select_disjoint_parts():
  p2 = paper_study.jobs_for(paper_study.parse_flags(["--only=permute", "--match=_p2_"]))
  p1 = paper_study.jobs_for(paper_study.parse_flags(["--only=permute", "--match=_p1_"]))
  assert p2 and p1 and not {j.name for j in p1} & {j.name for j in p2}
  assert len(p1) + len(p2) == len(paper_study.PERMUTE_GRID) + len(paper_study.PERMUTE_GRID_P1)
  with pytest.raises(SystemExit):
    paper_study.parse_flags(["--only=patchs"])


def test_classification_commands_build_the_configs_they_name():
  """The study's commands use the same config arguments a user types; a
  renamed argument or key would break them here, not hours into a study."""
  for job in paper_study.jobs_for(paper_study.parse_flags(["--only=patch,permute,posemb"])):
    command = Command.parse("python -m " + shlex.join(job.argv) + " --workdir=x")
    config = build(command)
    assert config.data.image_size == paper_study.IMAGE_SIZE
    if "swaps" in job.name:
      assert config.data.permute_pixels.swaps == job.label("swaps")
      assert config.data.permute_pixels.max_distance == job.label("delta")


def test_a_run_is_reused_only_for_the_same_command(tmp_path):
  job = paper_study.jobs_for(paper_study.parse_flags(["--only=patch"]))[0]
  assert paper_study.finished(str(tmp_path), job) is None
  os.makedirs(tmp_path / job.name)
  record = {"argv": list(job.argv), "wall_s": 1.0}
  (tmp_path / job.name / "study.json").write_text(json.dumps(record))
  assert paper_study.finished(str(tmp_path), job) == record
  record["argv"] = record["argv"] + ["--config.seed=7"]
  (tmp_path / job.name / "study.json").write_text(json.dumps(record))
  assert paper_study.finished(str(tmp_path), job) is None


def test_report_counts_finished_runs_and_marks_missing_cells(tmp_path, monkeypatch):
  docs = tmp_path / "docs"
  monkeypatch.setattr(paper_study, "DOCS", str(docs))
  args = paper_study.parse_flags([f"--root={tmp_path / 'runs'}"])
  jobs = paper_study.jobs_for_report(args)
  # Two finished /1 Fashion-MNIST seeds; everything else missing.
  for job, top1 in zip(
    [
      j
      for j in jobs
      if j.group == "patch" and j.label("dataset") == "fashion_mnist" and j.label("patch") == 1
    ],
    (0.5, 0.7),
  ):
    workdir = tmp_path / "runs" / job.name
    os.makedirs(workdir)
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/top1": top1}) + "\n")
    (workdir / "study.json").write_text(json.dumps({"argv": list(job.argv), "wall_s": 60.0}))
  text = paper_study.write_report(args, jobs)
  assert text == (docs / "results.md").read_text()
  for anchor in ("patch", "posemb", "permute", "mae", "dit", "wall"):
    assert f'<a id="{anchor}"></a>' in text
  assert "| /1 | 256 | 60.00 ± 14.14 (n=2) | — |" in text
  assert "| patch | 2 | 2 |" in text  # the wall-time table: 2 runs, 2 minutes


def _finish(root, job, curve, wall_s=60.0, machine="test machine"):
  """Writes a finished run: its metrics (one eval per (step, top1)) and record."""
  workdir = root / job.name
  os.makedirs(workdir, exist_ok=True)
  (workdir / "metrics.jsonl").write_text(
    "".join(json.dumps({"step": step, "eval/top1": top1}) + "\n" for step, top1 in curve)
  )
  (workdir / "study.json").write_text(
    json.dumps({"argv": list(job.argv), "wall_s": wall_s, "finished": 1.8e9, "machine": machine})
  )


def test_converged_cells_appear_once_their_patch_size_is_tuned_at_the_best_held_out_rate(tmp_path):
  args = paper_study.parse_flags(
    [f"--root={tmp_path}", "--only=" + ",".join(paper_study.CONV_GROUPS)]
  )
  jobs = paper_study.jobs_for(args)
  assert {j.group for j in jobs} == {"conv_tune"}
  # /4: the patch cell; /2 and /1: + 2 position embeddings + 2 permutations
  assert paper_study.conv_waiting(args) == 3 * (1 + 5 + 5)
  # Tuning reads the held-out fifth of the train file, never the test split.
  for job in jobs:
    command = Command.parse("python -m " + shlex.join(job.argv) + " --workdir=x")
    config = build(command)
    assert config.data.source == "npz:" + paper_study.CONV_TUNE_DATA
    assert "{split}" not in config.data.source and config.data.eval_split == "test"
    assert config.data.image_size == paper_study.CONV_SIZE
    assert config.total_steps == paper_study.CONV_TUNE_EPOCHS * config.eval_every
  scores = dict(zip(paper_study.CONV_TUNE_LRS, (0.80, 0.85, 0.85, 0.70)))
  for job in jobs:
    if job.label("patch") == 2:
      _finish(tmp_path, job, [(375, scores[job.label("lr")])])
  assert paper_study.conv_tuned_lr(str(tmp_path), 2) == 1e-3  # the tie goes to the smaller rate
  assert paper_study.conv_tuned_lr(str(tmp_path), 1) is None
  jobs = paper_study.jobs_for(args)
  cells = [j for j in jobs if j.group != "conv_tune"]
  assert len(cells) == 3 * 5 and all(j.label("patch") == 2 for j in cells)
  assert paper_study.conv_waiting(args) == 3 * (1 + 5)
  for job in cells:
    config = build(Command.parse("python -m " + shlex.join(job.argv) + " --workdir=x"))
    assert config.optimizer.lr == 1e-3
    assert config.data.source == "npz:" + paper_study.DATASETS["fashion_mnist"]
    assert config.total_steps == paper_study.CONV_EPOCHS * config.eval_every
    assert config.eval_every == paper_study.FASHION_TRAIN // config.batch_size  # every epoch
    assert config.augment.crop and config.augment.crop_padding == 1 and config.augment.flip
    if job.group == "conv_permute":
      assert config.data.permute_pixels.max_distance == job.label("delta")


def test_report_from_a_copy_of_the_records_anywhere_is_the_same(tmp_path, monkeypatch):
  """Records name no absolute path ($ROOT), the report says when and where
  they ran from the records, so a copy in another folder rebuilds it."""
  docs = tmp_path / "docs"
  monkeypatch.setattr(paper_study, "DOCS", str(docs))
  first = tmp_path / "first"
  args = paper_study.parse_flags([f"--root={first}"])
  mae = [j for j in paper_study.jobs_for_report(args) if j.group == "mae"]
  assert any(paper_study.ROOT in a for j in mae for a in j.argv)
  assert all(str(first) not in a for j in mae for a in j.argv)
  finetune = next(j for j in mae if j.label("stage") == "finetune")
  assert any(
    f"init_from={first}/mae_fashion_mnist_p1_pretrain" in a for a in finetune.command(str(first))
  )
  jobs = [j for j in paper_study.jobs_for_report(args) if j.group == "conv_tune"]
  for job in jobs:  # every patch size tuned; then two seeds of each converged cell
    _finish(first, job, [(375, 0.8 + job.label("lr"))])
  per_epoch = paper_study.FASHION_TRAIN // paper_study.CONV_BATCH
  for job in paper_study.jobs_for_report(args):
    if job.group in ("conv_patch", "conv_permute") and job.label("seed") < 2:
      base = {1: 0.86, 2: 0.85, 4: 0.80}[job.label("patch")] - 0.05 * bool(job.label("delta"))
      _finish(
        first,
        job,
        [(per_epoch * e, base - 0.1 / e + 0.001 * job.label("seed")) for e in range(1, 31)],
      )
  for job in mae:
    _finish(first, job, [(200, 0.7)])
  records = tmp_path / "records"
  for job in paper_study.jobs_for_report(args):
    if paper_study.finished(str(first), job):
      paper_study.keep_records(str(first), job, str(records))
  text = paper_study.write_report(args, paper_study.jobs_for_report(args))
  copy = tmp_path / "elsewhere" / "copy"
  shutil.copytree(records, copy)
  again = paper_study.parse_flags([f"--root={copy}"])
  assert paper_study.write_report(again, paper_study.jobs_for_report(again)) == text
  assert "machines: test machine" in text
  assert "| /1 | 64 | 0.004 | 85.72 ± 0.07 (n=2) |" in text  # the best tuned rate, final epoch
  assert "/1 and /2 never cross" in text and "/2 and /4 never cross" in text
  assert "permuted, δ = 1 | 80.72 ± 0.07 (n=2) | 79.72 ± 0.07 (n=2) |" in text
  if importlib.util.find_spec("matplotlib"):  # the [bench] extra draws the plots
    assert (docs / "results_converged_curves.png").exists()


def test_a_study_resumes_where_it_stopped_and_runs_newly_listed_cells(tmp_path, monkeypatch):
  """main runs only what is missing, re-lists jobs after each run (tuning
  unlocks cells) and keeps each finished run's records."""
  monkeypatch.setattr(paper_study, "DOCS", str(tmp_path / "docs"))
  ran = []

  def fake_run(root, job, core=None):
    ran.append(job.name)
    top1 = 0.9 - job.label("lr") if job.group == "conv_tune" else 0.8
    _finish(tmp_path / "runs", job, [(375, top1)])

  monkeypatch.setattr(paper_study, "run", fake_run)
  flags = [
    f"--root={tmp_path / 'runs'}",
    f"--records={tmp_path / 'records'}",
    "--only=conv_tune,conv_patch",
    "--match=_p4_",
    "--seeds=2",
  ]
  tune = [j for j in paper_study.jobs_for(paper_study.parse_flags(flags))]
  _finish(tmp_path / "runs", tune[0], [(375, 0.5)])  # one tuning run finished before
  paper_study.main(flags)
  assert ran == [j.name for j in tune[1:]] + ["conv8_p4_seed0", "conv8_p4_seed1"]
  assert sorted(os.listdir(tmp_path / "records")) == sorted(ran)  # what it ran, kept
  record = json.loads((tmp_path / "records" / "conv8_p4_seed0" / "study.json").read_text())
  assert "--config.optimizer.lr=0.001" in record["argv"]  # 0.0005 scored 0.5 before
  ran.clear()
  paper_study.main(flags)
  assert ran == []


def test_crossings_name_the_epochs_where_the_lead_changes():
  a = [(100 * e, m, m, m) for e, m in enumerate((0.5, 0.6, 0.7, 0.8, 0.9), 1)]
  b = [(100 * e, m, m, m) for e, m in enumerate((0.6, 0.65, 0.7, 0.75, 0.95), 1)]
  assert paper_study._crossings(a, b, per_epoch=100) == ["4", "5"]  # a leads at 4, b at 5
  assert paper_study._crossings(a, a, per_epoch=100) == []


def test_parallel_runs_wait_for_what_they_need(tmp_path, monkeypatch):
  """With --parallel=2 a fine-tune never starts before its pre-training has
  finished, and every job runs exactly once."""
  monkeypatch.setattr(paper_study, "DOCS", str(tmp_path / "docs"))
  import threading
  import time

  lock, ran, live = threading.Lock(), [], set()

  def fake_run(root, job, core=None):
    assert core in (0, 1)
    with lock:
      for need in job.needs:
        assert need not in live and os.path.exists(os.path.join(root, need, "study.json"))
      live.add(job.name)
    time.sleep(0.05)
    _finish(tmp_path / "runs", job, [(200, 0.7)])
    with lock:
      live.discard(job.name)
      ran.append(job.name)

  monkeypatch.setattr(paper_study, "run", fake_run)
  flags = [f"--root={tmp_path / 'runs'}", "--records=", "--only=mae", "--parallel=2"]
  paper_study.main(flags)
  jobs = paper_study.jobs_for(paper_study.parse_flags(flags))
  assert sorted(ran) == sorted(j.name for j in jobs)
  for job in jobs:
    for need in job.needs:
      assert ran.index(need) < ran.index(job.name)


def test_a_run_stopped_from_outside_is_not_recorded_as_finished(tmp_path, monkeypatch):
  """pixel_vit.main exits 0 after a SIGTERM (it saved a checkpoint): the
  study must not take that run for finished."""
  job = [
    j
    for j in paper_study.jobs_for(
      paper_study.parse_flags([f"--root={tmp_path}", "--only=conv_tune"])
    )
  ][0]
  total = paper_study._total_steps(job)

  real_run = paper_study.subprocess.run

  def fake_main(steps):
    def fake(command, **kwargs):
      if "pixel_vit.main" not in command:  # anything else (jax's own probes) runs for real
        return real_run(command, **kwargs)
      workdir = next(a.split("=", 1)[1] for a in command if a.startswith("--workdir="))
      with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": steps, "train/loss": 1.0}) + "\n")
      return types.SimpleNamespace(returncode=0)

    return fake

  monkeypatch.setattr(paper_study.subprocess, "run", fake_main(total // 2))
  with pytest.raises(SystemExit, match=rf"stopped at step {total // 2} of {total}"):
    paper_study.run(str(tmp_path), job)
  assert paper_study.finished(str(tmp_path), job) is None
  monkeypatch.setattr(paper_study.subprocess, "run", fake_main(total))
  paper_study.run(str(tmp_path), job, core=0)
  assert paper_study.finished(str(tmp_path), job)["cores"] == 1


def test_a_resumed_runs_wall_time_counts_every_invocation(tmp_path):
  """clu's `uptime=` restarts with each invocation of a run that was stopped
  and resumed; the study's wall time adds each invocation's last value."""
  log = tmp_path / "log.txt"
  log.write_text(
    "I1 logging_writer.py:48] [10] uptime=10.5\n"
    "I1 logging_writer.py:48] [20] uptime=20.0\n"  # stopped here
    "I1 logging_writer.py:48] [30] uptime=5.0\n"
    "I1 logging_writer.py:48] [40] uptime=30.0\n"
  )
  assert paper_study._earlier_invocations_wall(str(log)) == 50.0
  assert paper_study._earlier_invocations_wall(str(tmp_path / "none.txt")) == 0.0
