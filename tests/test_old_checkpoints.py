"""Checkpoints written before the restructuring (tests/data/old_runs, see its
README) still restore: the typed run identity writes the same JSON, resume
takes the old step, init_from loads the old MAE encoder and the FID
classifier extractor reads the old classifier."""
import copy
import json
import shutil

import jax
import numpy as np
import pytest

from support import (MAE_TINY_RUN, REPO_ROOT, TINY_RUN, as_numpy_leaves, load_config_module,
                     set_dotted)
from pixel_vit import checkpoint as checkpoint_lib
from pixel_vit.evaluation import features
from pixel_vit.trainers import classification, loop, mae, pretrained
from pixel_vit.trainers import diffusion as diffusion_trainer

OLD_RUNS = REPO_ROOT / "tests" / "data" / "old_runs"
OLD_STEP = 2
# How the old runs were configured (tests/data/old_runs/README.md).
WRITTEN_WITH = {"total_steps": 2, "checkpoint_every": 2, "eval_every": 2, "log_every": 1,
                "keep_checkpoints": 1}
DIT_OVERRIDES = {**TINY_RUN, "eval_batch_size": 40, "sample.steps": "8",
                 "sample.grid_columns": 2, "fid.batch_size": 40}
TASKS = {
    "classification": ("cls_pixel.py", TINY_RUN, classification.make_model_fn),
    "mae": ("mae_pixel.py", MAE_TINY_RUN, mae.make_model_fn),
    "diffusion": ("dit_pixel.py", DIT_OVERRIDES, diffusion_trainer.make_model_fn),
}


def old_config(task: str):
  config_file, overrides, _ = TASKS[task]
  config = load_config_module(REPO_ROOT / "configs" / config_file).get_config("quick")
  return set_dotted(config, {**copy.deepcopy(overrides), **WRITTEN_WITH})


def copy_of_old_run(task: str, tmp_path) -> str:
  workdir = str(tmp_path / task)
  shutil.copytree(OLD_RUNS / task, workdir)
  return workdir


def saved_metadata(task: str) -> dict:
  path = OLD_RUNS / task / "checkpoints" / str(OLD_STEP) / "metadata" / "metadata"
  return json.loads(path.read_text())


@pytest.mark.parametrize("task", sorted(TASKS))
def test_an_old_checkpoint_resumes_with_the_identity_it_was_written_with(task, tmp_path):
  config = old_config(task)
  plan = loop.plan(config, TASKS[task][2])
  identity = checkpoint_lib.RunIdentity.of_run(config, plan.train_split)
  # The format did not change: today's identity writes the old JSON, key for key.
  assert identity.to_json() == saved_metadata(task)
  assert checkpoint_lib.RunIdentity.from_json(saved_metadata(task)) == identity
  workdir = copy_of_old_run(task, tmp_path)
  run = loop.start(config, workdir, plan, read_only=True)
  try:
    assert run.start_step == OLD_STEP
    fresh = run.described.abstract.params
    assert jax.tree.structure(run.state.params) == jax.tree.structure(fresh)
  finally:
    run.checkpointer.close()
    run.reporter.close()
  # The check can fail: another model's identity is refused by field.
  config.model.posemb = "learn"
  other_plan = loop.plan(config, TASKS[task][2])
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"posemb: checkpoint 'sincos2d' vs config 'learn'"):
    loop.start(config, copy_of_old_run(task, tmp_path / "other"), other_plan, read_only=True)


def test_an_old_mae_checkpoint_initialises_a_classifier(tmp_path):
  source = pretrained.open_checkpoint(str(OLD_RUNS / "mae"))
  assert (source.identity.task, source.identity.variant, source.saved.step) == (
      "mae", "mu/1", OLD_STEP)
  config = set_dotted(load_config_module(REPO_ROOT / "configs" / "cls_pixel.py").get_config(
      "quick"), copy.deepcopy(TINY_RUN))
  plan = loop.plan(config, classification.make_model_fn)
  # pool=gap builds no [CLS]: the checkpoint's is dropped, every other encoder weight loads.
  assert source.check(config, plan.train_split.images.shape[1:], plan.shapes.params) == ["cls"]
  run = loop.start(config, str(tmp_path / "ft"), plan,
                   initial_params=source.load_encoder, read_only=True)
  try:
    loaded = as_numpy_leaves(run.state.params["encoder"])
  finally:
    run.checkpointer.close()
    run.reporter.close()
  saved = as_numpy_leaves(source.saved.restore(
      {"params": {"encoder": jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
          run.state.params["encoder"])}})["params"]["encoder"])
  for a, b in zip(loaded, saved):
    np.testing.assert_array_equal(a, b)


def test_an_old_classifier_serves_as_the_fid_feature_extractor():
  extractor = features.classifier_extractor(str(OLD_RUNS / "classification"))
  assert extractor.num_classes == 10 and extractor.image_shape == (8, 8, 1)
  images = np.random.default_rng(0).random((4, 8, 8, 1), np.float32)
  out = extractor(images)
  assert out["logits"].shape == (4, 10) and np.isfinite(out["pool"]).all()
