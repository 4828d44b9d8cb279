"""experiments/paper_study.py: its jobs, its resume rule and its report."""
import json
import os
import shlex

import pytest

from experiments import paper_study
from support import Command, build


def test_every_group_has_jobs_with_distinct_workdirs():
  jobs = paper_study.jobs_for(paper_study.parse_flags([]))
  assert {job.group for job in jobs} == set(paper_study.GROUPS)
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
  for job, top1 in zip([j for j in jobs if j.group == "patch"
                        and j.label("dataset") == "fashion_mnist" and j.label("patch") == 1],
                       (0.5, 0.7)):
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
