"""Every command in README.md's experiments table builds, validates and trains.

The table (between `<!-- experiments-table -->` markers) lists the paper's
experiments as `python -m pixel_vit.main ...` / `python -m pixel_vit.sample
...` commands. For each one this test
  1. builds the config exactly as the command does (config file, its
     arguments, `--config.*` overrides) and validates it with the trainer's
     own `validate`;
  2. traces the full-size model on the dataset's real image shape with
     `nnx.eval_shape` (no arrays: it catches a patch that does not tile the
     image or a variant that does not exist);
  3. runs a shrunken copy — the same config with the model width/depth of
     `mu` (patch kept), stand-in data of the same kind (8-bit images or
     float latents, same channels and class count) at 8x8 (or 2 patches a
     side), batch 8, one step, one evaluation — through the real trainer, in
     table order, so a fine-tune reads the checkpoint its pre-training row
     wrote. Shrunken configs that come out identical train once.
External files the commands name (Inception weights, FID reference, VAE
weights) are dropped from the shrunken copy: they are inputs, not code.
"""

import json
import os

import numpy as np
import pytest

from experiments import readme_table
from pixel_vit import main as main_lib
from pixel_vit import sample as sample_lib
from pixel_vit.data import sources
from pixel_vit.trainers import state as state_lib
from support import Command, build

EXTERNAL_FILES = ("fid.features", "fid.reference", "vae.weights")


def real_data(source: str) -> tuple:
  """(H, W, C, classes, latent) of a dataset a command names (the table the
  compile command uses, sources.KNOWN_DATASETS; H, W None: sizes vary)."""
  facts = sources.KNOWN_DATASETS[source]
  height, width, _ = facts.image_shape or (None, None, None)
  return height, width, facts.channels, facts.num_classes, facts.latent


def readme_commands() -> list[str]:
  return [command for _, commands in readme_table.rows() for command in commands]


def strip_external_files(config) -> None:
  for dotted in EXTERNAL_FILES:
    parent, _, leaf = dotted.partition(".")
    if parent in config:
      config[parent][leaf] = ""
  if "fid" in config:
    config.fid.num_samples = 0


def real_split(config) -> sources.ImageSplit:
  """One stand-in example of the dataset's real shape (for eval_shape)."""
  height, width, channels, classes, latent = real_data(config.data.source)
  if height is None:
    height = width = config.data.image_size
  images = np.zeros((1, height, width, channels), np.float32 if latent else np.uint8)
  return sources.ImageSplit(
    images=images,
    labels=np.zeros(1, np.int32),
    num_classes=classes,
    total_examples=1,
    process_index=0,
    process_count=1,
  )


def write_stand_in_data(directory, config, size: int, sizes=(("train", 24), ("test", 10))) -> str:
  """An npz source of the command's kind of data at `size` x `size`."""
  _, _, channels, classes, latent = real_data(config.data.source)
  rng = np.random.default_rng(0)
  path = os.path.join(directory, f"data_{size}_{channels}_{classes}_{latent}_{{split}}.npz")
  # Eval labels drawn from the train labels: the trainers refuse an eval split
  # none of whose classes the model trains on (sources.check_splits).
  seen = rng.integers(0, classes, max(n for _, n in sizes)).astype(np.int32)
  for split, n in sizes:
    labels = seen[:n] if split == "train" else rng.choice(seen[: sizes[0][1]], n).astype(np.int32)
    names = np.array([f"class{i}" for i in range(classes)])
    if latent:
      np.savez(
        path.format(split=split),
        labels=labels,
        class_names=names,
        latents=rng.normal(size=(n, size, size, channels)).astype(np.float32),
      )
    else:
      np.savez(
        path.format(split=split),
        labels=labels,
        class_names=names,
        images=rng.integers(0, 256, (n, size, size, channels)).astype(np.uint8),
      )
  return f"npz:{path}"


def stand_in_for_npz_source(config, directory) -> None:
  """An npz source (a file the user makes, e.g. encoded latents) is replaced
  by a two-example file of its real shape, so the full-size config validates."""
  if not config.data.source.startswith("npz:"):
    return
  height, width, channels, classes, latent = real_data(config.data.source)
  assert height == width, config.data.source
  os.makedirs(directory, exist_ok=True)
  config.data.source = write_stand_in_data(
    directory, config, height, sizes=(("train", 2), ("test", 2))
  )


def shrink(config, directory) -> None:
  """The same experiment at test size (see the module docstring)."""
  _, patch = config.model.variant.split("/")
  config.model.variant = f"mu/{patch}"
  if "decoder" in config.model:
    config.model.decoder.update(width=32, depth=1, heads=2, mlp_dim=64)
  size = 8 if int(patch) <= 4 else 2 * int(patch)
  config.data.source = write_stand_in_data(directory, config, size)
  config.data.image_size = None
  config.data.eval_split = "test"
  for key, value in (
    ("batch_size", 8),
    ("eval_batch_size", 8),
    ("total_steps", 1),
    ("log_every", 1),
    ("eval_every", 1),
    ("checkpoint_every", 1),
  ):
    config[key] = value
  config.optimizer.warmup_steps = 0
  if "warmup_epochs" in config.optimizer:
    config.optimizer.warmup_epochs = 0.0
  if "sample" in config:
    config.sample.steps = "3"
    config.sample.grid_columns = 2
  strip_external_files(config)


def test_the_table_lists_every_paper_experiment():
  """The rows the reproduction promises: CIFAR-100 T/S, ImageNet 28 S/B/L at /1
  and /2, MAE T/S at /1 and /2 with fine-tune and probe, DiT L/1 and L/2 with
  sampling, and the three locality ablations."""
  texts = readme_commands()
  configs = {(c.module, c.config_file, c.config_arg) for c in map(Command.parse, texts)}
  expected = [
    ("main", "configs/cls_pixel.py", f"variant={v}") for v in ("Ti/1", "Ti/2", "S/1", "S/2")
  ]
  expected += [
    ("main", "configs/cls_pixel.py", f"variant={s}/{p},dataset=imagenet28")
    for s in ("S", "B", "L")
    for p in (1, 2)
  ]
  for v in ("Ti/1", "Ti/2", "S/1", "S/2"):
    run = f"runs/mae_{v.replace('/', '')}"
    expected += [
      ("main", "configs/mae_pixel.py", f"variant={v}"),
      ("main", "configs/mae_finetune.py", f"variant={v},init_from={run}"),
      ("main", "configs/mae_finetune.py", f"mode=probe,variant={v},init_from={run}"),
    ]
  for v in ("L/1", "L/2"):
    expected += [(m, "configs/dit_pixel.py", f"variant={v}") for m in ("main", "sample")]
  for ablation in (
    "posemb=sincos2d",
    "posemb=learn",
    "posemb=none",
    "tokenizer=vocab",
    "swaps=25000,swap_distance=16",
  ):
    expected.append(
      ("main", "configs/cls_pixel.py", f"variant=B/16,dataset=imagenet224,{ablation}")
    )
  missing = [e for e in expected if e not in configs]
  assert not missing, f"README experiments table lacks {missing}"
  assert len(texts) == len(set(texts)), "a command is listed twice"


@pytest.mark.slow
def test_every_readme_command_builds_validates_and_trains_one_step(tmp_path):
  trained = {}  # shrunken config (JSON) -> its test workdir
  workdirs = {}  # the README's --workdir -> the test workdir that stands for it
  for index, text in enumerate(readme_commands()):
    command = Command.parse(text)
    where = f"README command {text!r}"
    full = build(command)
    trainer = main_lib.trainer_for(full)
    strip_external_files(full)
    real = real_split(full)
    stand_in_for_npz_source(full, tmp_path / "full_size")
    try:
      trainer.validate(full)
      shapes = state_lib.model_shapes(trainer.make_model_fn(full, real))
    except Exception as e:  # noqa: BLE001 - re-raised naming the command
      raise AssertionError(f"{where}: the full-size config fails: {e}") from e
    assert shapes.params, where

    config = build(command, init_from_map=workdirs)
    shrink(config, tmp_path)
    key = json.dumps([command.module, config.to_dict()], sort_keys=True, default=str)
    if command.module == "main" and key in trained:
      workdirs[command.workdir] = trained[key]
      continue
    workdir = workdirs.get(command.workdir) if command.module == "sample" else None
    workdir = workdir or str(tmp_path / f"run{index}")
    try:
      trainer.validate(config)
      if command.module == "sample":
        metrics = sample_lib.sample_and_evaluate(config, workdir, num_samples=4)
        assert os.path.exists(os.path.join(workdir, "samples")), where
        assert metrics == {}, where  # features are external files, dropped here
      else:
        _, results = trainer.train_and_evaluate(config, workdir)
        assert results and all(np.isfinite(v) for v in results.values()), (where, results)
    except Exception as e:  # noqa: BLE001 - re-raised naming the command
      raise AssertionError(f"{where}: the shrunken run fails: {e}") from e
    if command.module == "main":
      trained[key] = workdirs[command.workdir] = workdir


def test_a_broken_command_is_caught(tmp_path):
  """The check above can fail: a patch that does not tile the image, an
  unknown override and an unknown config argument are all reported."""
  bad_patch = Command.parse(
    "python -m pixel_vit.main --config=configs/cls_pixel.py:variant=Ti/3 --workdir=runs/x"
  )
  config = build(bad_patch)
  with pytest.raises(ValueError, match="patch size 3 does not divide image size 32"):
    main_lib.trainer_for(config).validate(config)
    state_lib.model_shapes(main_lib.trainer_for(config).make_model_fn(config, real_split(config)))
  with pytest.raises(KeyError):
    build(
      Command.parse(
        "python -m pixel_vit.main --config=configs/cls_pixel.py "
        "--config.optimizer.lrr=1 --workdir=runs/x"
      )
    )
  with pytest.raises(ValueError, match="config argument 'variants' is unknown"):
    build(
      Command.parse(
        "python -m pixel_vit.main --config=configs/cls_pixel.py:variants=Ti/1 --workdir=runs/x"
      )
    )
