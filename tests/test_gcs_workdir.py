"""A gs:// workdir (a TPU pod's workers share a bucket): config.json,
metrics.jsonl and pictures go through etils.epath, not the local file system.

GCS is stood in for by `epath.testing.mock_epath`, which sends every
`gs://...` path to a local directory. Code that used plain `open` /
`os.makedirs` would instead create a local `gs:` directory under the
current directory, which the tests check does not happen.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest
from clu import metric_writers
from etils import epath
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing

from pixel_vit.evaluation import features, pictures
from pixel_vit.trainers import config_history, reporting

WORKDIR = "gs://bucket/run"
PATH_FUNCTIONS = (
  "open",
  "exists",
  "glob",
  "isdir",
  "listdir",
  "makedirs",
  "mkdir",
  "remove",
  "rename",
  "replace",
  "rmtree",
  "stat",
  "walk",
  "copy",
)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://B/P -> tmp_path/gcs/B/P for every epath call; the cwd is an empty dir."""
  bucket_root = tmp_path / "gcs"

  def local(path):
    text = os.fspath(path)
    return str(bucket_root / text[len("gs://") :]) if text.startswith("gs://") else text

  def redirect(original, path, *args, **kwargs):
    args = tuple(local(a) if isinstance(a, (str, os.PathLike)) else a for a in args)
    return original(local(path), *args, **kwargs)

  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # TensorBoard events would go through TensorFlow's own GCS client: not here.
  monkeypatch.setattr(
    metric_writers, "create_default_writer", lambda *a, **k: metric_writers.LoggingWriter()
  )
  # With TensorFlow installed epath sends gs:// to tf.io.gfile, past the mock.
  monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
  with epath_testing.mock_epath(**{name: redirect for name in PATH_FUNCTIONS}):
    yield bucket_root / "bucket" / "run"
  assert not os.listdir(cwd), f"wrote locally instead of to the bucket: {os.listdir(cwd)}"


def test_reporter_and_pictures_write_to_the_bucket(fake_gcs):
  config = ml_collections.ConfigDict(dict(seed=3, model=dict(variant="mu/1")))
  config_history.record(WORKDIR, config, 0, {}, log=print)  # the start's config.json
  reporter = reporting.Reporter(WORKDIR, config, total_steps=4, log_every=1)
  reporter.scalars(1, {"train/loss": 2.5})
  reporter.scalars(2, {"train/loss": 2.0})
  reporter.close()
  image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  pictures.save_png(f"{WORKDIR}/pictures/grid_0000001.png", image)

  assert json.loads((fake_gcs / "config.json").read_text())["seed"] == 3
  lines = (fake_gcs / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["train/loss"] for line in lines] == [2.5, 2.0]
  from PIL import Image

  with Image.open(fake_gcs / "pictures" / "grid_0000001.png") as png:
    np.testing.assert_array_equal(np.asarray(png), image)


def test_a_classifier_workdir_in_the_bucket_is_read_through_epath(fake_gcs):
  with pytest.raises(ValueError, match="does not exist"):
    features._read_run(WORKDIR)
  (epath.Path(WORKDIR)).mkdir(parents=True)
  with pytest.raises(ValueError, match="has no config.json"):
    features._read_run(WORKDIR)
  (epath.Path(WORKDIR) / "config.json").write_text(json.dumps({"seed": 0}))
  # config.json was found and parsed: what is missing now is the checkpoint.
  with pytest.raises(ValueError, match="holds no finished checkpoint"):
    features._read_run(WORKDIR)
  assert (fake_gcs / "config.json").exists()
