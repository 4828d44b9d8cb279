"""The streaming input path (issue 22, first part): host crops of the original
image, the image-folder -> ArrayRecord writer, and grain batches whose order
is a function of (seed, step) only: the same for 1 and 2 processes, on
resume, and with worker processes. Data is generated here (JPEG and PNG of
varied sizes and aspect ratios in class folders); nothing is downloaded."""

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from pixel_vit import write_records
from pixel_vit.data import crops, records, stream
from support import make_image_folder

# ---------------------------------------------------------------- crops


def test_random_resized_crop_boxes_follow_the_scale_and_ratio_ranges():
  rng = np.random.default_rng(0)
  height, width = 300, 400
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
  boxes = np.array(
    [
      crops.random_resized_crop_box(rng, height, width, scale=scale, ratio=ratio)
      for _ in range(4000)
    ]
  )
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area = h * w / (height * width)
  aspect = w / h
  # Rounding to whole pixels moves a box's area and ratio a little.
  assert area.min() >= scale[0] * 0.95 and area.max() <= 1.0
  assert aspect.min() >= ratio[0] * 0.97 and aspect.max() <= ratio[1] * 1.03
  # Area uniform in scale (draws that do not fit are redrawn, which trims the
  # large end): the mean is below the uniform mean 0.54, well above the bottom.
  assert 0.40 < area.mean() < 0.56, area.mean()
  # Log-ratio roughly symmetric around 0 for a landscape image this mild.
  assert abs(np.log(aspect).mean()) < 0.05
  # Placement covers the image: both extremes occur.
  assert (top == 0).any() and (left == 0).any()


def test_random_resized_crop_falls_back_to_the_centre_at_the_nearest_ratio():
  rng = np.random.default_rng(0)
  # A 10x1000 strip: no box with ratio <= 4/3 and >= 8% of the area fits.
  top, left, h, w = crops.random_resized_crop_box(
    rng, 10, 1000, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
  )
  assert (h, w) == (10, round(10 * 4 / 3)) and left == (1000 - w) // 2 and top == 0


def halves_image(width: int, height: int) -> Image.Image:
  """Left half red (255, 0, 0), right half blue (0, 0, 255)."""
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[:, : width // 2, 0] = 255
  pixels[:, width // 2 :, 2] = 255
  return Image.fromarray(pixels)


def test_eval_crop_resizes_the_shorter_side_then_takes_the_centre():
  # 80x40 -> shorter side 40 becomes floor(16 / 0.5) = 32 -> 64x32; the centre
  # 16x16 covers x 24..40 of 64, i.e. x 30..50 of the original 80: red left
  # of 40, blue right of it, split in the middle of the crop.
  out = crops.eval_crop(halves_image(80, 40), 16, crop_fraction=0.5)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  assert (out[:, :7, 0] > 200).all() and (out[:, :7, 2] < 50).all()
  assert (out[:, 9:, 2] > 200).all() and (out[:, 9:, 0] < 50).all()
  # Portrait: the shorter side is the width; the crop keeps the vertical centre.
  tall = np.zeros((100, 20), np.uint8)
  tall[45:55] = 255  # a bright band in the middle
  out = crops.eval_crop(Image.fromarray(tall), 20, crop_fraction=1.0)
  assert out.shape == (20, 20, 1)
  assert out[10, :, 0].min() > 200 and out[0, :, 0].max() < 50


def test_train_crop_is_of_the_original_image_not_of_a_square_resize():
  """A box on a 2:1 image keeps its aspect: a crop of the left quarter is all
  red. Resizing to a square first would squeeze the halves but not change
  this; the box is checked against the original's coordinates instead."""
  image = halves_image(200, 100)
  rng = np.random.default_rng(3)
  for _ in range(50):
    state = rng.bit_generator.state
    top, left, h, w = crops.random_resized_crop_box(
      rng, 100, 200, scale=(0.05, 0.2), ratio=(0.9, 1.1)
    )
    rng.bit_generator.state = state
    out = crops.train_crop(image, rng, 8, scale=(0.05, 0.2), ratio=(0.9, 1.1), flip=False)
    if left + w <= 95:
      assert (out[..., 0] > 200).all()
    elif left >= 105:
      assert (out[..., 2] > 200).all()


def test_decode_converts_grey_and_cmyk_and_names_a_corrupt_file(tmp_path):
  grey = tmp_path / "grey.jpg"
  Image.fromarray(np.full((9, 7), 128, np.uint8)).save(grey)
  cmyk = tmp_path / "cmyk.jpg"
  Image.fromarray(np.full((9, 7, 3), 200, np.uint8)).convert("CMYK").save(cmyk)
  assert np.asarray(crops.decode(grey.read_bytes(), 3)).shape == (9, 7, 3)
  assert np.asarray(crops.decode(cmyk.read_bytes(), 3)).shape == (9, 7, 3)
  with pytest.raises(crops.BadImageError, match="'cat/0.jpg' cannot be decoded"):
    crops.decode(b"\xff\xd8\xff\xe0garbage", 3, where="'cat/0.jpg'")


# ---------------------------------------------------------------- the writer


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  images = make_image_folder(root / "images")
  out = str(root / "records")
  return (
    images,
    out,
    write_records.write_split(images=images, out=out, split="train", examples_per_shard=10),
  )


def test_writer_keeps_every_image_with_its_label(written):
  images, out, split = written
  assert split.num_examples == 42 and split.class_counts == (14, 14, 14)
  assert split.class_names == ("class_0", "class_1", "class_2")
  reopened = records.open_split(out, "train")
  assert reopened == split
  import grain

  source = grain.sources.ArrayRecordDataSource(reopened.paths)
  stored = sorted(
    (records.decode_record(source[i])[0], records.decode_record(source[i])[1])
    for i in range(len(source))
  )
  on_disk = sorted(
    (label, open(os.path.join(images, name, f), "rb").read())
    for label, name in enumerate(split.class_names)
    for f in os.listdir(os.path.join(images, name))
  )
  assert stored == on_disk  # every file once, bytes unchanged, the right label


def test_writer_resumes_only_missing_shards_and_refuses_a_changed_folder(written, tmp_path):
  images, out, split = written
  copy = str(tmp_path / "records")
  shutil.copytree(out, copy)
  os.remove(os.path.join(copy, "train.json"))
  os.remove(os.path.join(copy, split.shards[1]))
  os.remove(os.path.join(copy, split.shards[1] + ".json"))
  untouched = os.path.getmtime(os.path.join(copy, split.shards[0]))
  with pytest.raises(ValueError, match="no complete 'train' split .* rerun"):
    records.open_split(copy, "train")
  again = write_records.write_split(images=images, out=copy, split="train", examples_per_shard=10)
  assert again == records.open_split(copy, "train")
  assert os.path.getmtime(os.path.join(copy, split.shards[0])) == untouched
  for name in split.shards:
    with open(os.path.join(out, name), "rb") as a, open(os.path.join(copy, name), "rb") as b:
      assert a.read() == b.read(), name
  # A folder that changed since: refused, not mixed in.
  changed = str(tmp_path / "changed")
  shutil.copytree(images, changed)
  os.remove(os.path.join(changed, "class_0", "0.jpg"))
  os.remove(os.path.join(copy, "train.json"))
  with pytest.raises(ValueError, match="different file list"):
    write_records.write_split(images=changed, out=copy, split="train", examples_per_shard=10)


def test_writer_bad_input_is_named(tmp_path):
  images = make_image_folder(tmp_path / "images", classes=2, per_class=4)
  with open(os.path.join(images, "class_1", "broken.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 not a jpeg")
  Image.fromarray(np.zeros((9, 9), np.uint8)).save(os.path.join(images, "class_0", "g.jpg"))
  Image.fromarray(np.zeros((9, 9, 3), np.uint8)).convert("CMYK").save(
    os.path.join(images, "class_0", "c.jpg")
  )
  split = write_records.write_split(images=images, out=str(tmp_path / "a"), split="train")
  assert split.skipped == ("class_1/broken.jpg",)
  assert split.converted == {"L": 1, "CMYK": 1} and split.num_examples == 10
  with pytest.raises(
    ValueError, match="'class_1/broken.jpg' cannot be decoded.*--on_bad_image=skip"
  ):
    write_records.write_split(
      images=images, out=str(tmp_path / "b"), split="train", on_bad_image="fail"
    )
  os.makedirs(os.path.join(images, "class_9"))
  with pytest.raises(ValueError, match="class_9' holds no image files"):
    write_records.write_split(images=images, out=str(tmp_path / "c"), split="train")
  with pytest.raises(ValueError, match="is not a directory"):
    write_records.write_split(
      images=str(tmp_path / "nowhere"), out=str(tmp_path / "d"), split="train"
    )


def test_a_missing_shard_is_named_with_the_fix(written, tmp_path):
  _, out, split = written
  copy = str(tmp_path / "records")
  shutil.copytree(out, copy)
  os.remove(os.path.join(copy, split.shards[2]))
  with pytest.raises(ValueError, match=f"1 of 5 shards .* missing, e.g. {split.shards[2]}"):
    records.open_split(copy, "train")
  with open(os.path.join(copy, split.shards[0]), "rb") as f:
    assert f.read(4) != b"PVR1"  # the container's header, not a record: records are inside
  with pytest.raises(ValueError, match="not a pixel_vit image record"):
    records.decode_record(b"JUNK and more")


# ---------------------------------------------------------------- the stream

HOST = stream.HostCrops(image_size=8, scale=(0.3, 1.0))


def take(split, layout, *, start=0, total=12, seed=1, workers=0):
  return list(
    stream.train_batches(
      split, HOST, layout, seed=seed, start_step=start, total_steps=total, workers=workers
    )
  )


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for i, (x, y) in enumerate(zip(a, b)):
    np.testing.assert_array_equal(x["images"], y["images"], err_msg=f"batch {i}")
    np.testing.assert_array_equal(x["labels"], y["labels"], err_msg=f"batch {i}")


def test_the_order_is_a_function_of_seed_and_step_not_of_processes_or_resume(written):
  _, _, split = written
  one = take(split, stream.Layout(8))
  assert one[0]["images"].shape == (8, 8, 8, 3) and one[0]["labels"].dtype == np.int32
  halves = [take(split, stream.Layout(8, p, 2)) for p in (0, 1)]
  assert_batches_equal([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)], one)
  assert_batches_equal(take(split, stream.Layout(8), start=4), one[4:])  # crosses an epoch
  other_seed = take(split, stream.Layout(8), seed=2)
  assert not np.array_equal(other_seed[0]["images"], one[0]["images"])
  # One epoch (42 // 8 = 5 steps) visits 40 distinct records: labels match the
  # class counts they could come from, and the next epoch reshuffles.
  labels = np.concatenate([b["labels"] for b in one[:5]])
  assert np.bincount(labels, minlength=3).max() <= 14
  assert not np.array_equal(one[0]["labels"], one[5]["labels"])


def test_worker_processes_give_the_same_batches(written):
  _, _, split = written
  assert_batches_equal(
    take(split, stream.Layout(8), total=4, workers=2), take(split, stream.Layout(8), total=4)
  )


def test_eval_reads_every_record_once_over_any_process_count(written):
  _, _, split = written
  for processes in (1, 3):
    layout = stream.Layout(6 * processes, 0, processes)
    seen = []
    for p in range(processes):
      layout = stream.Layout(6 * processes, p, processes)
      batches = list(stream.eval_batches(split, HOST, layout))
      assert len(batches) == stream.num_eval_batches(split, layout)
      for batch in batches:
        seen.extend(batch["labels"][batch["mask"] > 0].tolist())
        assert not batch["images"][batch["mask"] == 0].any()  # padding is zeros
    assert sorted(seen) == sorted(np.repeat(np.arange(3), 14).tolist()), processes


def corrupt_record(records_dir: str, split: str, index: int) -> None:
  """Rewrites the shard holding record `index` with that record's image bytes
  cut to garbage (as a bad disk or a broken TFDS image would leave it)."""
  import grain
  from array_record.python import array_record_module

  info = records.open_split(records_dir, split)
  first = 0
  for name, size in zip(info.shards, info.shard_sizes):
    if first <= index < first + size:
      break
    first += size
  path = os.path.join(records_dir, name)
  source = grain.sources.ArrayRecordDataSource([path])
  stored = [source[i] for i in range(len(source))]
  label, data = records.decode_record(stored[index - first])
  stored[index - first] = records.encode_record(label, data[:40] + b"\x00" * 16)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for record in stored:
    writer.write(record)
  writer.close()


def test_a_corrupt_image_stops_the_stream_by_name_or_is_skipped_and_counted(written, tmp_path):
  """on_bad_example='fail' names the record and the fix; 'skip' gives the
  next record in its place in training (the same on every run) and a zero
  mask in evaluation, and counts it either way."""
  _, out, split = written
  bad_dir = str(tmp_path / "bad")
  shutil.copytree(out, bad_dir)
  corrupt_record(bad_dir, "train", 13)
  bad = records.open_split(bad_dir, "train")
  host, layout = stream.HostCrops(8, random_crop=False, flip=False), stream.Layout(42)
  skipping = dataclasses.replace(host, on_bad_example="skip")
  with pytest.raises(
    crops.BadImageError,
    match=r"record 13 of .*bad split 'train' cannot be "
    r"decoded .*on_bad_example='skip'",
  ):
    list(stream.eval_batches(bad, host, layout))
  evaluated = next(stream.eval_batches(bad, skipping, layout))
  clean = next(stream.eval_batches(split, host, layout))
  assert evaluated["skipped"].tolist() == [int(i == 13) for i in range(42)]
  assert evaluated["mask"][13] == 0 and evaluated["mask"].sum() == 41
  keep = np.arange(42) != 13
  np.testing.assert_array_equal(evaluated["images"][keep], clean["images"][keep])
  # Training: the slot of record 13 holds record 14 instead, on every run.
  order = stream._TrainExample(bad, host, layout, seed=0).order(0)
  slot = int(np.flatnonzero(order == 13)[0])
  trained = [
    next(stream.train_batches(bad, skipping, layout, seed=0, start_step=0, total_steps=1))
    for _ in range(2)
  ]
  np.testing.assert_array_equal(trained[0]["images"], trained[1]["images"])
  assert trained[0]["skipped"].tolist() == [int(i == slot) for i in range(42)]
  np.testing.assert_array_equal(trained[0]["images"][slot], clean["images"][14])
  with pytest.raises(ValueError, match="on_bad_example='maybe' is not one of"):
    dataclasses.replace(host, on_bad_example="maybe")


@pytest.mark.slow
def test_a_run_skipping_a_corrupt_image_reports_it(
  quick_config, records_dataset, tmp_path, make_workdir, caplog
):
  from pixel_vit.trainers import classification

  bad_dir = str(tmp_path / "records")
  shutil.copytree(records_dataset, bad_dir)
  corrupt_record(bad_dir, "test", 5)
  with pytest.raises(crops.BadImageError, match="record 5 of"):
    classification.train_and_evaluate(
      stream_config(quick_config, bad_dir, total_steps=2), make_workdir("fail_bad")
    )
  config = stream_config(
    quick_config, bad_dir, **{"data.on_bad_example": "skip", "total_steps": 2, "log_every": 1}
  )
  # Also the record the first training step reads first (epoch 0, slot 0).
  train = records.open_split(bad_dir, "train")
  first = stream._TrainExample(train, stream.HostCrops(8), stream.Layout(16), config.seed)
  corrupt_record(bad_dir, "train", first.record_index(0, 0))
  workdir = make_workdir("skip_bad")
  caplog.set_level("WARNING")
  _, results = classification.train_and_evaluate(config, workdir)
  assert results["eval/count"] == 17  # 18 test records, one passed over
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    skipped = [r["train/bad_records_skipped"] for r in map(json.loads, f) if "train/loss" in r]
  assert skipped == [1, 1], skipped  # step 1 passed over it; the count is cumulative
  assert "eval passed over 1 records" in caplog.text


def test_data_position_records_the_epoch_and_what_would_change_the_order(written):
  _, _, split = written
  position = stream.data_position(split, seed=1, global_batch=8, step=12)
  assert position["epoch"] == 2 and position["step_in_epoch"] == 2
  assert json.loads(json.dumps(position)) == position
  with pytest.raises(ValueError, match="global batch 64 is larger"):
    stream.steps_per_epoch(split, 64)
  with pytest.raises(ValueError, match="does not split evenly"):
    stream.Layout(9, 0, 2)


# ---------------------------------------------------------------- training on a stream


@pytest.fixture(scope="module")
def records_dataset(tmp_path_factory):
  """train and test splits of generated images, as records:DIR."""
  root = tmp_path_factory.mktemp("stream_run")
  out = str(root / "records")
  write_records.write_split(
    images=make_image_folder(root / "train", per_class=24, seed=1),
    out=out,
    split="train",
    examples_per_shard=32,
  )
  write_records.write_split(
    images=make_image_folder(root / "test", per_class=6, seed=2), out=out, split="test"
  )
  return out


def stream_config(quick_config, records_dir, **overrides):
  return quick_config(
    {
      "data.source": f"records:{records_dir}",
      "data.image_size": 8,
      "batch_size": 16,
      "eval_batch_size": 8,
      "keep_checkpoints": 10,
      "augment.crop": True,
      "augment.flip": True,
      "model.drop_path": 0.1,
      **overrides,
    }
  )


@pytest.mark.slow
def test_training_on_a_stream_resumes_exactly(quick_config, records_dataset, make_workdir):
  """As test_training's exact resume, on a streamed split: run B starts from
  run A's step-3 checkpoint and must end bitwise equal to A, which needs
  the same examples and the same host crops for steps 4-6."""
  import jax

  from pixel_vit.trainers import classification
  from support import assert_trees_equal

  config = stream_config(quick_config, records_dataset)
  classification.validate(config)
  run_a, run_b = make_workdir("a"), make_workdir("b")
  state_a, results = classification.train_and_evaluate(config, run_a)
  assert results["eval/count"] == 18  # every test record once (8 + 8 + 2 of a padded batch)
  os.makedirs(os.path.join(run_b, "checkpoints"))
  shutil.copytree(os.path.join(run_a, "checkpoints", "3"), os.path.join(run_b, "checkpoints", "3"))
  state_b, _ = classification.train_and_evaluate(config, run_b)
  assert int(jax.device_get(state_b.step)) == 6
  with open(os.path.join(run_a, "metrics.jsonl")) as f:
    waits = [
      r["train/input_wait_fraction"] for r in map(json.loads, f) if "train/input_wait_fraction" in r
    ]
  assert waits and all(0 <= w <= 1 for w in waits), waits
  assert_trees_equal(state_b.params, state_a.params, "params")
  assert_trees_equal(state_b.opt_state, state_a.opt_state, "opt_state")


@pytest.mark.slow
def test_a_resume_over_rewritten_records_is_refused(quick_config, records_dataset, tmp_path):
  """The checkpoint's `data` item holds the stream's position and what fixes
  its order; records rewritten under the same path (another count) would
  make the resumed steps another run's: refused by name, nothing changed."""
  from pixel_vit import checkpoint as checkpoint_lib
  from pixel_vit.trainers import classification

  records_dir, workdir = str(tmp_path / "records"), str(tmp_path / "run")
  shutil.copytree(records_dataset, records_dir)
  classification.train_and_evaluate(
    stream_config(quick_config, records_dir, total_steps=3), workdir
  )
  saved = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=5).read_data_position(3)
  assert saved["step"] == 3 and saved["num_examples"] == 72 and saved["global_batch"] == 16
  shutil.rmtree(records_dir)
  write_records.write_split(
    images=make_image_folder(tmp_path / "other", per_class=30), out=records_dir, split="train"
  )
  shutil.copy(os.path.join(records_dataset, "test.json"), records_dir)
  for name in records.open_split(records_dataset, "test").shards:
    shutil.copy(os.path.join(records_dataset, name), records_dir)
  with pytest.raises(ValueError, match=r"num_examples: checkpoint 72 vs now 90"):
    classification.train_and_evaluate(stream_config(quick_config, records_dir), workdir)


def test_the_device_does_not_crop_or_flip_what_the_host_did(quick_config, records_dataset):
  from pixel_vit.trainers import loop

  config = stream_config(quick_config, records_dataset)
  split = loop.load_splits(config)[0]
  assert split.stream is not None and split.images.shape == (0, 8, 8, 3)
  on_device = loop.device_augment(config, split)
  assert (on_device.crop, on_device.flip) == (False, False)
  assert config.augment.crop and config.augment.flip  # the run's config is unchanged
  host = loop.host_crops(config)
  assert host.random_crop and host.flip and host.scale == tuple(config.augment.crop_scale)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"data.loader": "stream", "data.source": "digits"}, "loader='stream' reads ArrayRecord"),
    ({"data.loader": "memory"}, "loader='memory' cannot hold"),
    ({"data.loader": "disk"}, "is not one of"),
    ({"data.workers": -1}, "data.workers=-1"),
    ({"data.crop_fraction": 1.5}, "crop_fraction=1.5"),
    ({"data.image_size": None}, "holds images of many sizes: set config.data.image_size"),
  ],
)
def test_stream_config_errors_are_named_before_compiling(
  quick_config, records_dataset, no_jit, overrides, message
):
  from pixel_vit.trainers import classification, loop

  config = stream_config(quick_config, records_dataset, **overrides)
  with pytest.raises(ValueError, match=message):
    classification.validate(config)
    loop.load_splits(config)


def test_the_input_clock_says_when_the_loop_waits_for_input():
  import time

  from pixel_vit.trainers import loop

  def batches(delay):
    while True:
      time.sleep(delay)
      yield {}

  clock = loop.InputClock()
  slow = batches(0.02)
  for _ in range(5):
    clock.next(slow)
  assert clock.fraction() > 0.8  # all the loop did was wait
  fast = batches(0.0)
  for _ in range(5):
    clock.next(fast)
    time.sleep(0.02)  # the "step"
  assert clock.fraction() < 0.2


STREAM_RSS_SCRIPT = """
import resource, sys
sys.path.insert(0, {tests!r})
from pixel_vit.data import records, stream
split = records.open_split({out!r}, "train")
batches = stream.train_batches(split, stream.HostCrops(image_size=28), stream.Layout(50),
                               seed=0, start_step=0, total_steps=split.num_examples // 50)
next(batches)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
count = 50 + sum(len(b["labels"]) for b in batches)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(count, baseline, peak)
"""


@pytest.mark.slow
def test_streaming_a_split_larger_than_the_memory_bound_keeps_rss_bounded(tmp_path):
  """1,000 JPEGs of 600x500 decode to ~860 MiB, far more than the 150 MiB
  the reading process may grow by while it streams one whole epoch."""
  import subprocess
  import sys

  rng = np.random.default_rng(0)
  folder = tmp_path / "images" / "only_class"
  folder.mkdir(parents=True)
  for i in range(1000):
    coarse = (rng.random((32, 38, 3)) * 255).astype(np.uint8)
    Image.fromarray(coarse).resize((600, 500), Image.BICUBIC).save(folder / f"{i}.jpg", quality=85)
  out = str(tmp_path / "records")
  split = write_records.write_split(images=str(tmp_path / "images"), out=out, split="train")
  decoded_mib = split.num_examples * 600 * 500 * 3 / 2**20
  bound_mib = 150
  assert decoded_mib > 5 * bound_mib
  script = STREAM_RSS_SCRIPT.format(tests=os.path.dirname(__file__), out=out)
  proc = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  count, baseline_kib, peak_kib = map(int, proc.stdout.split()[-3:])
  assert count == 1000  # the whole epoch was read
  grew_mib = (peak_kib - baseline_kib) / 1024
  assert grew_mib < bound_mib, (
    f"RSS grew {grew_mib:.0f} MiB while streaming {decoded_mib:.0f} "
    f"MiB of decoded images (bound {bound_mib} MiB)"
  )


def test_write_records_command_line(tmp_path):
  """As a user runs it: exit 0 and a complete split; a bad folder is one
  message and exit 1, no traceback."""
  import subprocess
  import sys

  from support import REPO_ROOT

  images = make_image_folder(tmp_path / "images", classes=2, per_class=3)
  command = [
    sys.executable,
    "-m",
    "pixel_vit.write_records",
    f"--images={images}",
    f"--out={tmp_path / 'records'}",
    "--examples_per_shard=4",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
    command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert records.open_split(str(tmp_path / "records"), "train").num_examples == 6
  os.makedirs(os.path.join(images, "class_empty"))
  failed = subprocess.run(
    command[:4] + [f"--out={tmp_path / 'other'}"],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert failed.returncode == 1
  assert "class_empty' holds no image files" in failed.stderr
  assert "Traceback" not in failed.stderr


def test_a_split_too_big_for_host_memory_is_named_with_its_sizes():
  """ImageNet at 224 (1.28M images, ~193 GB decoded) on a 24 GiB host does
  not fit the in-memory path (TfdsSource then streams or refuses); at 28x28
  (~3 GB) it does."""
  from pixel_vit.data import sources

  reason = sources.memory_shortfall(
    "tfds:imagenet2012 split 'train'", 1_281_167, (224, 224, 3), 24 * 2**30
  )
  assert re.search(
    r"needs about 359\.\d GiB .*1,281,167 images of 224x224x3 .* more than "
    r"50% of its 24\.0 GiB",
    reason,
  ), reason
  assert (
    sources.memory_shortfall("tfds:imagenet2012 split 'train'", 1_281_167, (28, 28, 3), 24 * 2**30)
    is None
  )
  assert sources.memory_shortfall("x", 10**9, (224, 224, 3), None) is None  # no /proc/meminfo
