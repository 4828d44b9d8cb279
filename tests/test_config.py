"""Bad input is rejected before anything compiles, with a ValueError naming the
key, the value and what is allowed; config arguments; a mismatched checkpoint."""

import os
import subprocess
import sys
import time

import ml_collections
import pytest

from pixel_vit import configuration
from pixel_vit import main as main_lib
from pixel_vit.data import augment
from pixel_vit.models import vit
from pixel_vit.trainers import classification, loop
from support import REPO_ROOT, TINY_RUN, set_dotted, snapshot

# ---------------------------------------------------------------- patch vs image size


def test_patch_not_dividing_image_fails_before_compiling(quick_config, workdir, no_jit):
  config = quick_config({"model.variant": "mu/3"})  # digits are 8x8
  start = time.monotonic()
  with pytest.raises(ValueError, match=r"model\.variant='mu/3' has patch 3.*image size 8"):
    classification.validate(config)
    classification.train_and_evaluate(config, workdir)
  assert time.monotonic() - start < 20
  checkpoints = os.path.join(workdir, "checkpoints")
  assert not os.path.exists(checkpoints) or not os.listdir(checkpoints)


def test_patch_dividing_image_is_accepted(quick_config):
  # The same check passes for a patch that tiles 8x8, so the one above is specific.
  config = quick_config({"model.variant": "mu/4"})
  classification.validate(config)
  train, _ = loop.load_splits(config)
  assert train.images.shape[1:] == (8, 8, 1)


# ---------------------------------------------------------------- validate()


BAD_VALUES = [
  ({"model.variant": "X/1"}, r"variant 'X/1'.*SIZE/PATCH"),
  ({"model.variant": "Ti"}, r"variant 'Ti'"),
  ({"model.variant": "Ti/0"}, r"variant 'Ti/0'"),
  ({"data.source": "foo"}, r"data source 'foo' is not recognised"),
  ({"data.source": "tfds:"}, r"data source 'tfds:' is not recognised"),
  ({"data.source": "npz:/nonexistent/x.npz"}, r"npz source: no file at /nonexistent/x\.npz"),
  ({"data.image_size": 0}, r"config\.data\.image_size=0"),
  ({"batch_size": 12}, r"config\.batch_size=12 must be divisible by the 8 batch shards"),
  ({"eval_batch_size": 20}, r"config\.eval_batch_size=20 must be divisible"),
  ({"batch_size": 0}, r"config\.batch_size=0 must be > 0"),
  ({"total_steps": -1}, r"config\.total_steps=-1"),
  ({"log_every": 0}, r"config\.log_every=0"),
  ({"checkpoint_every": -5}, r"config\.checkpoint_every=-5"),
  ({"profile.steps": -1}, r"config\.profile\.steps=-1 must be >= 0"),
  ({"profile.first_step": 0}, r"config\.profile\.first_step=0 must be > 0"),
  ({"optimizer.lr": -1.0}, r"config\.optimizer\.lr=-1\.0 must be > 0"),
  ({"optimizer.lr": 0.0}, r"config\.optimizer\.lr=0\.0 must be > 0"),
  ({"optimizer.weight_decay": -0.1}, r"config\.optimizer\.weight_decay=-0\.1"),
  ({"optimizer.ema_decay": 1.0}, r"config\.optimizer\.ema_decay=1\.0"),
  ({"optimizer.b2": 1.0}, r"b2=1\.0"),
  ({"mesh.data": -1, "mesh.fsdp": -1}, r"config\.mesh sizes .*at most one -1"),
  ({"mesh.data": 3, "mesh.fsdp": -1}, r"config\.mesh fixed sizes multiply to 3.*8 devices"),
  ({"mesh.data": 3}, r"config\.mesh .*uses 3 devices but 8 are available"),
  ({"mesh.data": 2, "mesh.fsdp": 2}, r"config\.mesh .*uses 4 devices but 8 are available"),
  ({"mesh.data": 0}, r"config\.mesh sizes .*must be positive"),
  ({"model.posemb": "sin"}, r"config\.model\.posemb='sin' is not allowed.*'learn'"),
  ({"model.pool": "max"}, r"config\.model\.pool='max' is not allowed.*'gap'"),
  ({"model.attention": "flash"}, r"config\.model\.attention='flash' is not allowed.*'xla'"),
  ({"model.attention": "splash"}, r"attention='splash' is the TPU Pallas kernel.*'cpu'.*'auto'"),
  ({"model.attention": "ring"}, r"attention='ring' splits the tokens.*size 1 here.*mesh\.seq > 1"),
  (
    {"mesh.data": 2, "mesh.seq": 4, "model.attention": "chunked"},
    r"config\.mesh\.seq=4 splits the tokens.*'chunked'.*'ring' or 'auto'",
  ),
  ({"model.dtype": "float16"}, r"config\.model\.dtype='float16' is not allowed.*'bfloat16'"),
  ({"model.remat": "some"}, r"config\.model\.remat='some' is not allowed.*'dots'"),
  ({"model.drop_path": 1.0}, r"config\.model\.drop_path=1\.0"),
  ({"model.drop_path": -0.1}, r"config\.model\.drop_path=-0\.1"),
]


@pytest.mark.parametrize(
  "overrides, match",
  BAD_VALUES,
  ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in BAD_VALUES],
)
def test_validate_rejects(quick_config, overrides, match, no_jit):
  config = quick_config(overrides)
  with pytest.raises(ValueError, match=match):
    classification.validate(config)


@pytest.mark.parametrize("attention", ["ring", "auto"])
def test_sequence_parallel_mesh_accepts_ring_and_auto(quick_config, attention):
  classification.validate(
    quick_config({"mesh.data": 2, "mesh.seq": 4, "model.attention": attention})
  )


def test_validate_rejects_unknown_mesh_axis(quick_config):
  config = quick_config()
  config.mesh.pipeline = 2
  with pytest.raises(ValueError, match=r"config\.mesh has unknown axes \['pipeline'\]"):
    classification.validate(config)


@pytest.mark.parametrize(
  "overrides", [{"augment.mixup_alpha": -1.0}, {"augment.label_smoothing": 1.5}]
)
def test_validate_rejects_bad_augment(quick_config, overrides, no_jit):
  config = quick_config(overrides)
  key = next(iter(overrides)).split(".")[-1]
  with pytest.raises(ValueError, match=key):
    classification.validate(config)


def test_augment_error_names_the_augment_key(quick_config):
  config = quick_config({"augment.mixup_alpha": -1.0})
  with pytest.raises(ValueError, match=r"config\.augment\.mixup_alpha=-1\.0"):
    augment.validate_augment_config(config.augment)


@pytest.mark.parametrize("arg", ["quick", "variant=mu/2,quick", "dataset=digits,quick"])
def test_quick_configs_validate(cls_pixel, arg, no_jit):
  classification.validate(cls_pixel.get_config(arg))


@pytest.mark.parametrize(
  "arg", [None, "variant=Ti/2", "dataset=imagenet28", "variant=mu/1,dataset=digits"]
)
def test_paper_configs_validate(cls_pixel, arg, no_jit):
  # Validating reads no data and opens no connection (tfds:cifar100 is not
  # downloaded here: the conftest fails any network access).
  config = cls_pixel.get_config(arg)
  assert config.total_steps == 0 and config.total_epochs > 0
  classification.validate(config)


def test_total_steps_zero_needs_epochs(quick_config, no_jit):
  config = quick_config({"total_steps": 0, "total_epochs": 0.0})
  with pytest.raises(ValueError, match=r"config\.total_steps"):
    classification.validate(config)


def test_unknown_task():
  with pytest.raises(
    ValueError,
    match=r"config\.task='segmentation' is not a task.*"
    r"classification",
  ):
    main_lib.trainer_for(_task_config("segmentation"))
  assert main_lib.trainer_for(_task_config("classification")) is classification


def _task_config(task):
  return ml_collections.ConfigDict({"task": task})


# ---------------------------------------------------------------- config arguments


def test_parse_arg_types_and_errors():
  args = configuration.parse_arg(
    "n=3,name=x,flag,rate=0.5", n=1, name="a", flag=False, rate=0.1, other=7
  )
  assert (args.n, args.name, args.flag, args.rate, args.other) == (3, "x", True, 0.5, 7)
  assert isinstance(args.n, int) and isinstance(args.rate, float)
  assert configuration.parse_arg("flag=false", flag=True).flag is False
  assert configuration.parse_arg("flag=1", flag=False).flag is True
  assert configuration.parse_arg(None, n=1).n == 1
  with pytest.raises(ValueError, match=r"config argument 'm' is unknown.*\['flag', 'n'\]"):
    configuration.parse_arg("m=1", n=1, flag=False)
  with pytest.raises(ValueError, match=r"config argument flag='maybe' must be true or false"):
    configuration.parse_arg("flag=maybe", flag=False)
  with pytest.raises(ValueError, match=r"config argument n='abc' is not a int"):
    configuration.parse_arg("n=abc", n=1)


def test_get_config_rejects_bad_arguments(cls_pixel):
  with pytest.raises(ValueError, match=r"config argument 'size' is unknown"):
    cls_pixel.get_config("size=S")
  with pytest.raises(ValueError, match=r"config argument quick='yes please'"):
    cls_pixel.get_config("quick=yes please")


def test_get_config_arguments(cls_pixel):
  default = cls_pixel.get_config(None)
  assert default.model.variant == "Ti/1" and default.data.source == "tfds:cifar100"
  assert vit.parse_variant(default.model.variant)[1] == 1

  vit_baseline = cls_pixel.get_config("variant=Ti/2")
  size, patch = vit.parse_variant(vit_baseline.model.variant)
  assert patch == 2 and size == vit.SIZES["Ti"]
  # Only the tokenizer differs from the pixel default.
  assert vit_baseline.optimizer.to_dict() == default.optimizer.to_dict()
  assert vit_baseline.data.source == default.data.source

  quick = cls_pixel.get_config("quick")
  assert quick.data.source == "digits"
  assert quick.model.variant == "mu/1"
  assert quick.total_steps > 0 and quick.batch_size < default.batch_size
  assert cls_pixel.get_config("variant=mu/2,quick").model.variant == "mu/2"

  assert cls_pixel.get_config("dataset=digits").data.source == "digits"
  imagenet = cls_pixel.get_config("dataset=imagenet28")
  assert imagenet.data.image_size == 28 and imagenet.data.eval_split == "validation"
  assert cls_pixel.get_config("dataset=npz:/x/{split}.npz").data.source == "npz:/x/{split}.npz"


# ---------------------------------------------------------------- the command line


@pytest.mark.slow
def test_main_rejects_negative_lr_quickly(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pixel_vit.main",
      "--config=configs/cls_pixel.py:quick",
      "--config.optimizer.lr=-1",
      f"--workdir={workdir}",
    ],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1
  # One message, no traceback; and nothing was created (it came before any compile).
  assert "error: config.optimizer.lr=-1.0 must be > 0." in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) < 10
  assert not workdir.exists()


# ---------------------------------------------------------------- checkpoint mismatch

CHECKPOINTED_MODEL = {"model.variant": "mu/1", "model.posemb": "learn", "model.pool": "cls"}


@pytest.fixture(scope="module")
def mu1_checkpoint(cls_pixel, tmp_path_factory):
  """A workdir whose checkpoints were written by mu/1 with a learned position
  embedding and a [CLS] token (3 steps)."""
  config = set_dotted(
    cls_pixel.get_config("quick"),
    {**TINY_RUN, **CHECKPOINTED_MODEL, "total_steps": 3, "checkpoint_every": 3, "eval_every": 3},
  )
  workdir = str(tmp_path_factory.mktemp("mismatch") / "workdir")
  classification.train_and_evaluate(config, workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize(
  "overrides, match",
  [
    pytest.param(
      {"model.variant": "mu/2"},
      r"checkpoint .*checkpoints/3 does not match the config \(variant: "
      r"checkpoint 'mu/1' vs config 'mu/2'\)",
      id="variant",
    ),
    # Same variant, other arrays: orbax's structure error, re-raised naming the
    # checkpoint. Arrays missing from the checkpoint (EMA added) ...
    pytest.param(
      {"optimizer.ema_decay": 0.9},
      r"(?s)checkpoint .*checkpoints/3 holds a different train state.*ema_params",
      id="ema_added",
    ),
    # ... and model settings recorded with the checkpoint, named in the message.
    pytest.param(
      {"model.posemb": "none"},
      r"does not match the config \(posemb: checkpoint 'learn' vs config 'none'\)",
      id="posemb_changed",
    ),
    pytest.param(
      {"model.pool": "gap"},
      r"does not match the config \(pool: checkpoint 'cls' vs config 'gap'\)",
      id="pool_changed",
    ),
  ],
)
def test_checkpoint_of_another_model_is_refused(quick_config, mu1_checkpoint, overrides, match):
  before = snapshot(mu1_checkpoint)
  assert any(p.startswith("checkpoints") for p in before)
  config = quick_config({**CHECKPOINTED_MODEL, "total_steps": 3, **overrides})
  classification.validate(config)
  with pytest.raises(ValueError, match=match):
    classification.train_and_evaluate(config, mu1_checkpoint)
  assert snapshot(mu1_checkpoint) == before
