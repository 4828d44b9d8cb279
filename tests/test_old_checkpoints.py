"""Checkpoints written before the restructuring (tests/data/old_runs, see its
README) still restore: the typed run identity writes the same JSON, resume
takes the old step, init_from loads the old MAE encoder and the FID
classifier extractor reads the old classifier."""

import json
import shutil

import numpy as np
import pytest

from pixel_vit import checkpoint as checkpoint_lib
from pixel_vit.evaluation import features
from pixel_vit.trainers import classification, loop, mae, pretrained
from pixel_vit.trainers import diffusion as diffusion_trainer
from support import (
  CLS_PIXEL_PATH,
  DIT_PIXEL_PATH,
  DIT_TINY_RUN,
  MAE_PIXEL_PATH,
  MAE_TINY_RUN,
  REPO_ROOT,
  TINY_RUN,
  assert_trees_equal,
  load_config_module,
  set_dotted,
)

OLD_RUNS = REPO_ROOT / "tests" / "data" / "old_runs"
OLD_STEP = 2
# How the old runs were configured (tests/data/old_runs/README.md).
WRITTEN_WITH = {
  "total_steps": 2,
  "checkpoint_every": 2,
  "eval_every": 2,
  "log_every": 1,
  "keep_checkpoints": 1,
}
TASKS = {
  "classification": (CLS_PIXEL_PATH, TINY_RUN, classification.make_model_fn),
  "mae": (MAE_PIXEL_PATH, MAE_TINY_RUN, mae.make_model_fn),
  "diffusion": (DIT_PIXEL_PATH, DIT_TINY_RUN, diffusion_trainer.make_model_fn),
}


def old_config(task: str):
  config_path, overrides, _ = TASKS[task]
  return set_dotted(
    load_config_module(config_path).get_config("quick"), {**overrides, **WRITTEN_WITH}
  )


def restore_old_run(task: str, tmp_path, config=None) -> loop.Run:
  """`loop.start` on a copy of the old run (read-only: no lock, no config.json)."""
  config = config or old_config(task)
  workdir = str(tmp_path / task)
  shutil.copytree(OLD_RUNS / task, workdir)
  return loop.start(config, workdir, loop.plan(config, TASKS[task][2]), read_only=True)


def close(run: loop.Run) -> None:
  run.checkpointer.close()
  run.reporter.close()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_an_old_checkpoint_resumes_with_the_identity_it_was_written_with(task, tmp_path):
  saved = json.loads(
    (OLD_RUNS / task / "checkpoints" / str(OLD_STEP) / "metadata" / "metadata").read_text()
  )
  run = restore_old_run(task, tmp_path)
  close(run)
  assert run.start_step == OLD_STEP
  # The format did not change: today's identity writes the old JSON, key for key.
  assert run.identity.to_json() == saved
  assert checkpoint_lib.RunIdentity.from_json(saved) == run.identity
  # The check can fail: another model's identity is refused by field.
  config = old_config(task)
  config.model.posemb = "learn"
  with pytest.raises(
    checkpoint_lib.CheckpointMismatchError, match=r"posemb: checkpoint 'sincos2d' vs config 'learn'"
  ):
    restore_old_run(task, tmp_path / "other", config)


def test_an_old_mae_checkpoint_initialises_a_classifier(tmp_path, quick_config):
  source = pretrained.open_checkpoint(str(OLD_RUNS / "mae"))
  assert (source.identity.task, source.identity.variant, source.saved.step) == (
    "mae",
    "mu/1",
    OLD_STEP,
  )
  config = quick_config()
  plan = loop.plan(config, classification.make_model_fn)
  # pool=gap builds no [CLS]: the checkpoint's is dropped, every other encoder weight loads.
  assert source.check(config, plan.train_split.images.shape[1:], plan.shapes.params) == [
    "dropped cls"
  ]
  run = loop.start(
    config, str(tmp_path / "ft"), plan, initial_params=source.load_encoder, read_only=True
  )
  close(run)
  # The reference is read another way: the old MAE run resumed as a whole.
  mae_run = restore_old_run("mae", tmp_path)
  close(mae_run)
  expected = {k: v for k, v in mae_run.state.params["encoder"].items() if k != "cls"}
  assert_trees_equal(run.state.params["encoder"], expected, "encoder")


def test_an_old_classifier_serves_as_the_fid_feature_extractor():
  extractor = features.classifier_extractor(str(OLD_RUNS / "classification"))
  assert extractor.num_classes == 10 and extractor.image_shape == (8, 8, 1)
  images = np.random.default_rng(0).random((4, 8, 8, 1), np.float32)
  out = extractor(images)
  assert out["logits"].shape == (4, 10) and np.isfinite(out["pool"]).all()
