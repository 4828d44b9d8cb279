"""Bad input that used to pass, train on nothing, or end in a raw traceback
(issue 11, part 6): each gets one ValueError naming the key or file, the
value and the fix, raised before anything compiles and before the workdir is
touched; or, where a run can live with it, a warning with the counts.

Data is the offline digits, or small npz files written into tmp_path.
"""

import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from sklearn import datasets

from pixel_vit import command_line
from pixel_vit import main as main_lib
from pixel_vit.data import sources
from pixel_vit.models import mae as mae_model
from pixel_vit.trainers import classification, loop
from pixel_vit.trainers import mae as mae_trainer
from support import REPO_ROOT, load_config_module

NPZ_FIX = "np.savez(path, images="


def _digits(size: int = 8):
  """The 1,797 digits as uint8 [N, size, size, 1] and their labels (0..9)."""
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  if size != 8:
    images = np.repeat(np.repeat(images, size // 8, axis=1), size // 8, axis=2)
  return images[..., None], digits.target.astype(np.int64)


def _write(path, images, labels, **extra) -> str:
  np.savez(path, images=images, labels=labels, **extra)
  return str(path)


def _split_files(
  tmp_path, *, test_size: int = 8, test_labels=None, train_keep=None, class_names=None
) -> str:
  """digits as npz:DIR/d_{split}.npz: the first 1,400 for train, the rest for test."""
  images, labels = _digits()
  extra = {} if class_names is None else {"class_names": class_names}
  train = slice(0, 1400)
  keep = np.ones(1400, bool) if train_keep is None else train_keep(labels[train])
  _write(tmp_path / "d_train.npz", images[train][keep], labels[train][keep], **extra)
  test_images, _ = _digits(test_size)
  test = test_labels if test_labels is not None else labels[1400:]
  _write(tmp_path / "d_test.npz", test_images[1400 : 1400 + len(test)], test, **extra)
  return f"npz:{tmp_path}/d_{{split}}.npz"


# ---------------------------------------------------------------- 1. MAE mask ratio


@pytest.mark.parametrize("ratio, masked, kept", [(0.005, 0, 64), (0.999, 64, 0)])
def test_mask_ratio_that_masks_or_keeps_nothing_stops_before_compiling(
  mae_quick_config, workdir, no_jit, ratio, masked, kept
):
  config = mae_quick_config({"mask_ratio": ratio})
  mae_trainer.validate(config)  # the image size is not known before the data is read
  with pytest.raises(ValueError) as excinfo:
    mae_trainer.train_and_evaluate(config, workdir)
  message = str(excinfo.value)
  assert f"config.mask_ratio={ratio} masks {masked} of the 64 tokens" in message
  assert f"keeps {kept} visible" in message
  assert "[1/64, 63/64]" in message and "8x8 images" in message
  assert not os.path.exists(workdir)


def test_mask_ratio_is_checked_in_validate_when_the_image_size_is_set(mae_quick_config, no_jit):
  config = mae_quick_config({"mask_ratio": 0.005, "data.image_size": 8})
  with pytest.raises(ValueError, match=r"config\.mask_ratio=0\.005 masks 0 of the 64 tokens"):
    mae_trainer.validate(config)


@pytest.mark.parametrize("tokens", [4, 16, 64])
def test_mask_ratio_check_agrees_with_the_models_masking(tokens):
  """The check refuses a ratio exactly when the model's own rounding would hide
  no token, or would keep none visible (the model then keeps one anyway)."""
  model = ml_collections.ConfigDict({"variant": "mu/1"})
  size = int(tokens**0.5)
  for ratio in map(float, np.linspace(0.001, 0.999, 997)):
    masked = tokens - mae_model.num_visible(tokens, ratio)
    ok = masked > 0 and round(tokens * (1 - ratio)) > 0
    if ok:
      mae_model.validate_mask_ratio(ratio, model, size)
    else:
      with pytest.raises(ValueError, match=r"config\.mask_ratio"):
        mae_model.validate_mask_ratio(ratio, model, size)
  # The boundary ratios: 1/N masks one token, just below masks none.
  for ratio, masked in ((1 / tokens, 1), (0.4 / tokens, 0)):
    _, mask, _ = mae_model.random_masking(jax.random.PRNGKey(0), 2, tokens, ratio)
    assert mask.sum(axis=1).tolist() == [masked, masked]


# ---------------------------------------------------------------- 2. labels vs classes


def test_stray_label_without_class_names_is_an_error(tmp_path, quick_config, workdir, no_jit):
  images, labels = _digits()
  labels[17] = 999
  path = _write(tmp_path / "stray.npz", images, labels)
  config = quick_config({"data.source": f"npz:{path}"})
  classification.validate(config)
  with pytest.raises(ValueError) as excinfo:
    classification.train_and_evaluate(config, workdir)
  message = str(excinfo.value)
  assert path in message and "no class_names" in message
  assert "class count 1000 is inferred from the largest label, 999 (1 example)" in message
  assert "989 of the 1000 ids" in message and "save class_names=" in message
  assert not os.path.exists(workdir)


def test_eval_label_beyond_the_train_class_count_is_an_error(
  tmp_path, quick_config, workdir, no_jit
):
  # Train has digits 0..7 only, so its inferred class count is 8; test has 8s and 9s.
  test_labels = np.arange(397) % 10
  source = _split_files(tmp_path, test_labels=test_labels, train_keep=lambda y: y < 8)
  config = quick_config({"data.source": source})
  with pytest.raises(ValueError) as excinfo:
    classification.train_and_evaluate(config, workdir)
  message = str(excinfo.value)
  assert f"npz file {tmp_path}/d_test.npz: 78 of 397 labels are outside [0, 8)" in message
  assert "8 (39 examples), 9 (39 examples)" in message
  assert f"{tmp_path}/d_train.npz has no class_names" in message
  assert "eval/loss nan" in message and "class_names=" in message
  assert not os.path.exists(workdir)


def test_label_beyond_class_names_names_the_file_label_and_count(tmp_path):
  images, labels = _digits()
  labels[:3] = [12, 12, 10]
  path = _write(
    tmp_path / "named.npz", images, labels, class_names=np.array([str(i) for i in range(10)])
  )
  with pytest.raises(ValueError) as excinfo:
    sources.parse_source(f"npz:{path}").load("train")
  message = str(excinfo.value)
  assert f"npz file {path}: 3 of 1797 labels are outside [0, 10)" in message
  assert "10 (1 example), 12 (2 examples)" in message and "class_names" in message


def test_classes_only_eval_has_are_a_warning_with_the_counts(tmp_path, quick_config):
  names = np.array([str(i) for i in range(10)])
  source = _split_files(tmp_path, class_names=names, train_keep=lambda y: y != 9)
  plan = loop.plan(quick_config({"data.source": source}), classification.make_model_fn)
  warnings = plan.data_warnings
  assert len(warnings) == 1, warnings
  count = int(np.sum(_digits()[1][1400:] == 9))
  share = 100 * count / 397
  assert (
    f"1 of the 10 classes occur in npz file {tmp_path}/d_test.npz ({count} of 397 "
    f"examples, {share:.1f}%) but never in npz file {tmp_path}/d_train.npz: 9 "
    f"({count} examples)"
  ) in warnings[0]
  assert f"eval/top1 is at most {100 - share:.1f}%" in warnings[0]


def test_no_eval_class_in_train_is_an_error(tmp_path, quick_config, workdir, no_jit):
  names = np.array([str(i) for i in range(10)])
  source = _split_files(
    tmp_path, class_names=names, train_keep=lambda y: y < 5, test_labels=5 + np.arange(397) % 5
  )
  with pytest.raises(
    ValueError,
    match=r"5 of the 10 classes occur in npz file .*d_test\.npz "
    r"\(397 of 397 examples, 100\.0%\).*eval/top1 would "
    r"be 0.*config\.data\.train_split",
  ):
    classification.train_and_evaluate(quick_config({"data.source": source}), workdir)
  assert not os.path.exists(workdir)


def test_a_few_unused_inferred_ids_are_a_warning(tmp_path):
  images, labels = _digits()
  keep = labels != 3
  path = _write(tmp_path / "no3.npz", images[keep], labels[keep])
  source = sources.parse_source(f"npz:{path}")
  warnings = sources.check_splits(source.load("train"), source.load("test"))
  assert len(warnings) == 1
  assert "class count 10 is inferred" in warnings[0] and "1 of the 10 ids" in warnings[0]
  assert "(e.g. 3)" in warnings[0] and "class_names=" in warnings[0]


def test_digits_splits_pass_the_checks():
  digits = sources.parse_source("digits")
  assert sources.check_splits(digits.load("train"), digits.load("test")) == []


# ---------------------------------------------------------------- 3. image sizes


@pytest.mark.parametrize("trainer", ["classification", "mae"])
def test_train_and_eval_image_sizes_must_match_before_training(
  tmp_path, quick_config, mae_quick_config, workdir, no_jit, trainer
):
  source = _split_files(tmp_path, test_size=16)
  make = quick_config if trainer == "classification" else mae_quick_config
  module = classification if trainer == "classification" else mae_trainer
  with pytest.raises(ValueError) as excinfo:
    module.train_and_evaluate(make({"data.source": source}), workdir)
  message = str(excinfo.value)
  assert (
    f"npz file {tmp_path}/d_test.npz holds 16x16x1 images but npz file "
    f"{tmp_path}/d_train.npz holds 8x8x1 images"
  ) in message
  assert "config.data.image_size" in message
  assert not os.path.exists(workdir)


def test_image_size_resizes_both_splits_to_match(tmp_path):
  source = sources.parse_source(_split_files(tmp_path, test_size=16))
  train, test = source.load("train", image_size=8), source.load("test", image_size=8)
  assert sources.check_splits(train, test) == []


# ---------------------------------------------------------------- 4. run length


def _config_module(name):
  return load_config_module(REPO_ROOT / "configs" / f"{name}.py")


@pytest.mark.parametrize(
  "name, arg",
  [
    ("cls_pixel", "quick"),
    ("mae_pixel", "quick"),
    ("dit_pixel", "quick"),
    ("mae_finetune", "quick"),
    ("mae_finetune", "quick,mode=probe"),
  ],
)
def test_quick_configs_pin_their_length(name, arg):
  config = _config_module(name).get_config(arg)
  assert config.total_steps > 0 and config.total_epochs == 0, (name, arg)


@pytest.mark.parametrize("name", ["cls_pixel", "mae_pixel"])
def test_total_steps_zero_on_a_quick_config_names_both_keys(name, no_jit):
  config = _config_module(name).get_config("quick")
  config.total_steps = 0
  trainer = main_lib.trainer_for(config)
  with pytest.raises(ValueError) as excinfo:
    trainer.validate(config)
  message = str(excinfo.value)
  assert "config.total_steps=0 and config.total_epochs=0" in message
  assert "--config.total_steps=N" in message and "--config.total_epochs=E" in message


def test_negative_total_epochs_is_refused(quick_config, no_jit):
  with pytest.raises(ValueError, match=r"config\.total_epochs=-1\.0 must be >= 0"):
    classification.validate(quick_config({"total_epochs": -1.0}))


def test_length_line_says_what_decided_the_step_count(quick_config):
  by_steps = loop.describe_length(quick_config({"total_steps": 400}), 0, 400, 11)
  assert by_steps.startswith("steps 0 -> 400 (config.total_steps;") and "36.4 epochs" in by_steps
  config = quick_config({"total_steps": 0, "total_epochs": 2400.0})
  by_epochs = loop.describe_length(config, 0, 26400, 11)
  assert by_epochs == (
    "steps 0 -> 26400 (from config.total_epochs=2400 x 11 steps/epoch, since config.total_steps=0)"
  )


@pytest.mark.slow  # about 40 s on 2 busy cores: compiles a train and an eval step
def test_epoch_run_states_its_step_count_first(tmp_path, quick_config, workdir, caplog):
  """A short real run whose length comes from total_epochs: the trainer's
  first line gives the step count and where it came from; a class missing
  from train is warned about with its counts."""
  names = np.array([str(i) for i in range(10)])
  source = _split_files(tmp_path, class_names=names, train_keep=lambda y: y != 9)
  # About 1,260 train examples at batch 128: a quarter epoch is a couple of steps.
  config = quick_config(
    {
      "data.source": source,
      "total_steps": 0,
      "total_epochs": 0.25,
      "batch_size": 128,
      "eval_every": 100,
      "checkpoint_every": 100,
    }
  )
  caplog.set_level(logging.INFO, logger="absl")
  _, results = classification.train_and_evaluate(config, workdir)
  lines = [r.getMessage() for r in caplog.records if r.name == "absl"]
  first = next(line for line in lines if "->" in line or "classes occur" in line)
  match = re.match(
    r"steps 0 -> (\d+) \(from config\.total_epochs=0\.25 x (\d+) "
    r"steps/epoch, since config\.total_steps=0\), 1\d{3} train / 397 eval "
    r"examples; input in memory$",
    first,
  )
  assert match, lines
  assert int(match[1]) == round(0.25 * int(match[2])) > 0
  assert any("1 of the 10 classes occur in npz file" in line for line in lines), lines
  assert "eval/top1" in results


# ---------------------------------------------------------------- 5. unclear errors


def _good_npz_bytes(tmp_path) -> bytes:
  images, labels = _digits()
  return pathlib.Path(_write(tmp_path / "good.npz", images, labels)).read_bytes()


@pytest.mark.parametrize(
  "kind, expected",
  [
    ("truncated", "it is truncated or damaged"),
    ("text", "it is text, not an .npz (zip) archive; it starts with 'image,label"),
    ("npy", "it is a single .npy array (np.save)"),
    ("empty", "it is empty (0 bytes)"),
  ],
)
def test_unreadable_npz_files_get_a_clear_error(tmp_path, kind, expected):
  path = tmp_path / "data.npz"
  if kind == "truncated":
    good = _good_npz_bytes(tmp_path)
    path.write_bytes(good[: len(good) // 2])
  elif kind == "text":
    path.write_text("image,label\n0,1\n")
  elif kind == "npy":
    with open(path, "wb") as f:
      np.save(f, np.zeros((3, 8, 8), np.uint8))
  else:
    path.write_bytes(b"")
  with pytest.raises(ValueError) as excinfo:
    sources.parse_source(f"npz:{path}").load("train")
  message = str(excinfo.value)
  assert message.startswith(f"npz file {path} cannot be read: {expected}"), message
  assert NPZ_FIX in message and "\n" not in message
  assert excinfo.value.__cause__ is None  # one paragraph, no chained traceback


def test_single_file_npz_too_small_for_its_split_says_so(tmp_path, quick_config, workdir, no_jit):
  """One example: the 80/20 split leaves no train example. The message says
  that, not something about classes that occur only in eval."""
  images, labels = _digits()
  path = _write(tmp_path / "one.npz", images[:1], labels[:1])
  with pytest.raises(
    ValueError,
    match=r"one\.npz has 1 example\(s\): its fixed 4/5 train/test "
    r"split leaves none for 'train'\. Use a file with at least 5 examples",
  ):
    classification.train_and_evaluate(quick_config({"data.source": f"npz:{path}"}), workdir)
  assert not os.path.exists(workdir)
  five = _write(tmp_path / "five.npz", images[:5], labels[:5])
  assert len(sources.parse_source(f"npz:{five}").load("train").images) == 4


def test_truncated_npz_stops_the_run_before_compiling(tmp_path, quick_config, workdir, no_jit):
  good = _good_npz_bytes(tmp_path)
  path = tmp_path / "cut.npz"
  path.write_bytes(good[:-100])
  with pytest.raises(ValueError, match=r"cut\.npz cannot be read: it is truncated"):
    classification.train_and_evaluate(quick_config({"data.source": f"npz:{path}"}), workdir)
  assert not os.path.exists(workdir)


def _run_main(tmp_path, *args):
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [sys.executable, "-m", "pixel_vit.main", *args, f"--workdir={workdir}"],
    cwd=REPO_ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0
  assert len(proc.stderr.splitlines()) < 15, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert not workdir.exists()
  return proc.stderr


@pytest.mark.slow
def test_encode_latents_errors_are_one_message_and_traceback_is_a_flag(tmp_path):
  command = [
    sys.executable,
    "-m",
    "pixel_vit.encode_latents",
    "--source=digits",
    f"--vae={tmp_path / 'missing.safetensors'}",
    f"--out={tmp_path / 'x_{split}.npz'}",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr, proc.stderr
  assert "error: --vae=" in proc.stderr and "does not exist" in proc.stderr
  proc = subprocess.run(
    command + ["--traceback"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  assert not list(tmp_path.glob("x_*"))


@pytest.mark.slow
def test_command_line_typo_in_a_config_key(tmp_path):
  stderr = _run_main(
    tmp_path, "--config=configs/cls_pixel.py:quick", "--config.optimizer.base_lrr=1"
  )
  assert "--config.optimizer.base_lrr" in stderr and "has no key" in stderr
  assert "Did you mean --config.optimizer." in stderr
  assert "The keys of config.optimizer are b1, b2," in stderr


@pytest.mark.slow
def test_command_line_config_file_that_does_not_exist(tmp_path):
  stderr = _run_main(tmp_path, "--config=configs/nope.py")
  assert "--config=configs/nope.py: there is no config file configs/nope.py" in stderr
  assert "cls_pixel.py, dit_pixel.py, mae_finetune.py, mae_pixel.py" in stderr


@pytest.mark.parametrize(
  "args, expected",
  [
    (
      ["--config=configs/mae_pixel.py:quick", "--config.base_lr=1"],
      "Did you mean --config.optimizer.base_lr?",
    ),
    (
      ["--config=configs/mae_pixel.py:quick", "--config.model.decoder.widht=32"],
      "Did you mean --config.model.decoder.width or",
    ),
    (
      ["--config", "configs/cls_pixel.py:quick", "--noconfig.model.scann"],
      "Did you mean --config.model.scan?",
    ),
    (
      ["--config=configs/cls_pixel.py:quick", "--config.total_steps.x=3"],
      "config.total_steps=400 is a single value, not a group of keys",
    ),
    (["--config=configs/cls_pixl.py:quick"], "Did you mean configs/cls_pixel.py?"),
    (["--config=configs/cls_pixel.py:quick,fast"], "config argument 'fast' is unknown"),
  ],
)
def test_command_line_check_names_the_argument_and_the_fix(args, expected):
  cwd = os.getcwd()
  os.chdir(REPO_ROOT)
  try:
    with pytest.raises(command_line.CommandLineError) as excinfo:
      command_line.check_command_line(["pixel_vit.main", *args, "--workdir=/tmp/unused"])
  finally:
    os.chdir(cwd)
  assert expected in str(excinfo.value)
  assert isinstance(excinfo.value, ValueError) and "\n" not in str(excinfo.value)


def test_command_line_check_accepts_good_overrides():
  cwd = os.getcwd()
  os.chdir(REPO_ROOT)
  try:
    command_line.check_command_line(
      [
        "pixel_vit.main",
        "--config=configs/mae_pixel.py:quick",
        "--config.mask_ratio=0.6",
        "--config.optimizer.base_lr=1e-3",
        "--config.augment.crop_scale=(0.3, 1.0)",
        "--config.data.image_size=8",
        "--workdir=/tmp/unused",
      ]
    )
  finally:
    os.chdir(cwd)


# ---------------------------------------------------------------- pixel_vit.compile's data


def test_compile_stands_in_for_known_data_and_asks_for_the_shape_of_other_data(cls_pixel):
  from pixel_vit import compile as compile_lib

  config = cls_pixel.get_config("variant=S/1,dataset=imagenet28")
  train, test = compile_lib.stand_in_splits(config)
  # ImageNet at 28x28: the table's classes and split sizes, no examples read.
  assert train.images.shape == (0, 28, 28, 3) and train.num_classes == 1000
  assert (train.total_examples, test.total_examples) == (1_281_167, 50_000)
  config.data.source = "npz:/nowhere/my_data_{split}.npz"
  with pytest.raises(ValueError, match="--image_shape=H,W,C and --num_classes=N"):
    compile_lib.stand_in_splits(config)
  config.data.image_size = None
  train, _ = compile_lib.stand_in_splits(
    config, image_shape=["16", "16", "1"], num_classes=7, train_examples=5000
  )
  assert train.images.shape == (0, 16, 16, 1) and train.num_classes == 7
  assert train.total_examples == 5000
  with pytest.raises(ValueError, match="must be H,W,C"):
    compile_lib.stand_in_splits(config, image_shape=["16", "16"], num_classes=7)
