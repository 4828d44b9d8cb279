"""Data sources and batching: splits, sharding, padding, resume, bad inputs, TFDS offline."""

import collections
import math
import socket
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from pixel_vit.data import pipeline, sources


def _marked_images(n, shape=(6, 5, 3)):
  """Images whose first two pixels spell their index, so every batch can be traced back."""
  images = np.zeros((n, *shape), np.uint8)
  images[:, 0, 0, 0] = np.arange(n) % 256
  images[:, 0, 1, 0] = np.arange(n) // 256
  return images


def _index_of(images):
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 1, 0].astype(int)


def _write_marked_npz(path, n, **extra):
  np.savez(path, images=_marked_images(n), labels=np.arange(n, dtype=np.int32), **extra)
  return path


def _rows(images):
  return collections.Counter(image.tobytes() for image in images)


# ---------------------------------------------------------------- digits


def test_digits_split_is_an_exact_deterministic_partition():
  source = sources.parse_source("digits")
  train, test = source.load("train"), source.load("test")
  assert (len(train.labels), len(test.labels)) == (1437, 360)
  assert (train.total_examples, test.total_examples) == (1437, 360)
  assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
  assert train.labels.dtype == np.int32 and train.num_classes == test.num_classes == 10
  assert train.images.max() == 255  # 0..16 stretched to 0..255

  digits = sk_datasets.load_digits()
  everything = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
  # As multisets, train + test is the whole dataset: nothing lost, nothing in both.
  assert _rows(train.images) + _rows(test.images) == _rows(everything)
  assert sorted(train.labels.tolist() + test.labels.tolist()) == sorted(digits.target.tolist())

  again = sources.parse_source("digits").load("train")
  np.testing.assert_array_equal(again.images, train.images)
  np.testing.assert_array_equal(again.labels, train.labels)


def test_digits_rejects_unknown_split():
  with pytest.raises(ValueError, match="split 'validation' of 'digits'.*'train' or 'test'"):
    sources.parse_source("digits").load("validation")


# ---------------------------------------------------------------- npz


def test_npz_single_file_is_split_80_20(tmp_path):
  names = np.array([f"c{i}" for i in range(60)])
  path = _write_marked_npz(tmp_path / "d.npz", 50, class_names=names)
  source = sources.parse_source(f"npz:{path}")
  train, test = source.load("train"), source.load("test")
  assert (len(train.labels), len(test.labels)) == (40, 10)
  assert train.num_classes == 60  # from class_names, not from the labels seen
  ids = np.concatenate([_index_of(train.images), _index_of(test.images)])
  assert sorted(ids) == list(range(50))
  # Labels travel with their images.
  np.testing.assert_array_equal(_index_of(train.images), train.labels)
  # Same rule as digits: a default_rng(0) permutation, first 80% train.
  expected_test = np.sort(np.random.default_rng(0).permutation(50)[40:])
  np.testing.assert_array_equal(test.labels, expected_test)


def test_npz_split_template_and_rank3_images(tmp_path):
  np.savez(
    tmp_path / "x_train.npz",
    images=np.full((7, 4, 4), 9, np.uint8),
    labels=np.array([0, 1, 2, 3, 4, 0, 1], np.int64),
  )
  _write_marked_npz(tmp_path / "x_test.npz", 3)
  source = sources.parse_source(f"npz:{tmp_path}/x_{{split}}.npz")
  train, test = source.load("train"), source.load("test")
  assert train.images.shape == (7, 4, 4, 1) and train.labels.dtype == np.int32
  assert train.num_classes == 5 and train.total_examples == 7
  assert test.images.shape == (3, 6, 5, 3) and test.labels.tolist() == [0, 1, 2]


def test_npz_template_missing_split_file(tmp_path):
  _write_marked_npz(tmp_path / "x_train.npz", 3)
  source = sources.parse_source(f"npz:{tmp_path}/x_{{split}}.npz")
  with pytest.raises(ValueError, match="x_test.npz does not exist"):
    source.load("test")


def test_npz_missing_file_rejected_at_parse(tmp_path):
  with pytest.raises(ValueError, match="no file at .*nothing.npz"):
    sources.parse_source(f"npz:{tmp_path}/nothing.npz")


GOOD_IMAGES = np.zeros((5, 4, 4, 1), np.uint8)
GOOD_LABELS = np.arange(5, dtype=np.int32)


@pytest.mark.parametrize(
  "arrays, problem",
  [
    (dict(labels=GOOD_LABELS), "no 'images' array"),
    (dict(images=GOOD_IMAGES), "no 'labels' array"),
    (
      dict(images=GOOD_IMAGES.astype(np.float32), labels=GOOD_LABELS),
      "dtype float32, expected uint8",
    ),
    (
      dict(images=np.zeros((5, 16), np.uint8), labels=GOOD_LABELS),
      r"shape \(5, 16\), expected rank 4",
    ),
    (dict(images=np.zeros((5, 4, 0, 1), np.uint8), labels=GOOD_LABELS), "expected rank 4"),
    (dict(images=GOOD_IMAGES, labels=GOOD_LABELS[:, None]), "expected integer class ids of rank 1"),
    (
      dict(images=GOOD_IMAGES, labels=GOOD_LABELS.astype(np.float32)),
      "dtype float32 .* integer class ids",
    ),
    (dict(images=GOOD_IMAGES, labels=GOOD_LABELS[:4]), "5 images but 4 labels"),
    (dict(images=GOOD_IMAGES[:0], labels=GOOD_LABELS[:0]), "is empty"),
    (
      dict(images=GOOD_IMAGES, labels=GOOD_LABELS - 1),
      r"1 of 5 labels are negative: -1 \(1 example\)",
    ),
    (
      dict(images=GOOD_IMAGES, labels=GOOD_LABELS, class_names=np.array(["a", "b", "c"])),
      r"2 of 5 labels are outside \[0, 3\) of its 3 class_names: 3 \(1 example\), 4 ",
    ),
    (
      dict(images=np.array([None] * 5, dtype=object), labels=GOOD_LABELS),
      "cannot be read without pickle",
    ),
  ],
)
def test_npz_malformed_files_are_rejected(tmp_path, arrays, problem):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=problem) as excinfo:
    sources.parse_source(f"npz:{path}").load("train")
  assert str(path) in str(excinfo.value)  # the message names the file


def test_npz_not_a_zip_is_rejected(tmp_path):
  path = tmp_path / "bad.npz"
  path.write_bytes(b"definitely not a zip archive")
  with pytest.raises(ValueError, match="bad.npz cannot be read"):
    sources.parse_source(f"npz:{path}").load("train")


# ---------------------------------------------------------------- parsing, resize


@pytest.mark.parametrize(
  "name", ["", "mnist", "npz:", "tfds:", "tfds:mn ist", "hf:mnist", "Digits"]
)
def test_unknown_source_string_is_rejected(name):
  allowed = r"\['digits', 'npz:PATH', 'tfds:NAME', 'records:DIR'\]"
  with pytest.raises(ValueError, match=f"is not recognised; use one of {allowed}"):
    sources.parse_source(name)


def test_parse_source_names_round_trip(tmp_path):
  path = _write_marked_npz(tmp_path / "d.npz", 4)
  for name in ("digits", f"npz:{path}", "tfds:cifar100"):
    assert sources.parse_source(name).name == name


def test_tfds_missing_data_dir_without_download_rejected_at_parse(tmp_path):
  with pytest.raises(ValueError, match="does not exist and download is off"):
    sources.parse_source("tfds:mnist", data_dir=str(tmp_path / "nope"), download=False)


@pytest.mark.parametrize(
  "bad",
  [
    dict(process_index=2, process_count=2),
    dict(process_index=0, process_count=0),
    dict(image_size=0),
  ],
)
def test_load_rejects_bad_arguments(bad):
  with pytest.raises(ValueError, match="process_index|process_count|image_size"):
    sources.parse_source("digits").load("train", **bad)


def test_resize_to_requested_size(tmp_path):
  images = np.zeros((3, 8, 8, 3), np.uint8)
  images[0] = 200  # constant stays constant
  images[1, ::4, ::4] = 255  # sparse dots: plain bilinear to 2x2 samples only black
  np.savez(tmp_path / "r_test.npz", images=images, labels=np.zeros(3, np.int32))
  source = sources.parse_source(f"npz:{tmp_path}/r_{{split}}.npz")
  small = source.load("test", image_size=4)
  assert small.images.shape == (3, 4, 4, 3) and small.images.dtype == np.uint8
  assert (small.images[0] == 200).all()
  dots = source.load("test", image_size=2).images[1]
  assert dots.min() > 0 and 8 <= dots.mean() <= 24  # antialiased: ~255 / 16 everywhere
  big = source.load("test", image_size=12)
  assert big.images.shape == (3, 12, 12, 3) and (big.images[0] == 200).all()
  assert sources.parse_source("digits").load("test", image_size=16).images.shape == (360, 16, 16, 1)


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_process_shards_partition_the_split(tmp_path, process_count):
  _write_marked_npz(tmp_path / "s_test.npz", 37)
  source = sources.parse_source(f"npz:{tmp_path}/s_{{split}}.npz")
  shards = [
    source.load("test", process_index=i, process_count=process_count) for i in range(process_count)
  ]
  ids = [_index_of(shard.images) for shard in shards]
  # Contiguous pieces in order, np.array_split sizes: their concatenation is the split.
  np.testing.assert_array_equal(np.concatenate(ids), np.arange(37))
  assert [len(i) for i in ids] == [len(a) for a in np.array_split(np.arange(37), process_count)]
  assert all(
    shard.total_examples == 37 and shard.process_count == process_count for shard in shards
  )

  digits = sources.parse_source("digits")
  whole = digits.load("test")
  digit_shards = [
    digits.load("test", process_index=i, process_count=process_count) for i in range(process_count)
  ]
  np.testing.assert_array_equal(np.concatenate([s.images for s in digit_shards]), whole.images)


# ---------------------------------------------------------------- pipeline


def _split(n, process_index=0, process_count=1):
  """An ImageSplit of marked images: shard `process_index` of `n` examples."""
  shard = np.array_split(np.arange(n), process_count)[process_index]
  images = _marked_images(n)[shard]
  return sources.ImageSplit(
    images=images,
    labels=shard.astype(np.int32),
    num_classes=n,
    total_examples=n,
    process_index=process_index,
    process_count=process_count,
  )


@pytest.mark.parametrize("batch, expected_batches", [(8, 2), (4, 4)])
def test_eval_batches_visit_every_example_once_on_uneven_shards(batch, expected_batches):
  # 37 examples on 3 processes: shards of 13, 12, 12. With batch 4 the small
  # shards alone would need only 3 batches; every process must still run 4.
  batches_per_process = []
  seen = []
  for p in range(3):
    split = _split(37, p, 3)
    assert pipeline.num_eval_batches(split, batch) == math.ceil(math.ceil(37 / 3) / batch)
    batches = list(pipeline.eval_batches(split, local_batch_size=batch))
    batches_per_process.append(len(batches))
    for b in batches:
      assert b["images"].shape == (batch, 6, 5, 3) and b["labels"].shape == (batch,)
      assert b["mask"].dtype == np.float32 and b["labels"].dtype == np.int32
      real = b["mask"] == 1.0
      assert set(np.unique(b["mask"])) <= {0.0, 1.0}
      np.testing.assert_array_equal(_index_of(b["images"][real]), b["labels"][real])
      assert not b["images"][~real].any()  # padding is zeros
      seen.extend(b["labels"][real].tolist())
  assert batches_per_process == [expected_batches] * 3
  assert sorted(seen) == list(range(37))


def test_eval_batches_when_a_process_has_no_examples():
  # 2 examples on 3 processes: the last process only yields padding, but yields it.
  split = _split(2, 2, 3)
  batches = list(pipeline.eval_batches(split, local_batch_size=4))
  assert len(batches) == 1 and not batches[0]["mask"].any()


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_resume_exactly_across_epochs():
  split = _split(37, 1, 2)  # 18 examples here, 18 per process, batch 4 -> 4 steps/epoch
  assert pipeline.steps_per_epoch(split, 4) == 4
  full = _take(pipeline.train_batches(split, local_batch_size=4, seed=7), 13)
  for start in (1, 3, 4, 5, 9):
    resumed = _take(
      pipeline.train_batches(split, local_batch_size=4, seed=7, start_step=start), 13 - start
    )
    for a, b in zip(full[start:], resumed):
      np.testing.assert_array_equal(a["images"], b["images"])
      np.testing.assert_array_equal(a["labels"], b["labels"])
  for b in full:
    assert b["images"].shape == (4, 6, 5, 3) and b["images"].dtype == np.uint8
    assert b["labels"].dtype == np.int32
    np.testing.assert_array_equal(_index_of(b["images"]), b["labels"])

  epochs = [np.concatenate([b["labels"] for b in full[e * 4 : (e + 1) * 4]]) for e in range(3)]
  shard = set(range(19, 37))
  for labels in epochs:
    assert len(set(labels.tolist())) == 16 and set(labels.tolist()) <= shard
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])

  other_seed = _take(pipeline.train_batches(split, local_batch_size=4, seed=8), 4)
  assert not np.array_equal(np.concatenate([b["labels"] for b in other_seed]), epochs[0])


def test_train_steps_per_epoch_equal_on_every_process():
  # 37 over 3 processes: shards of 13, 12, 12; everyone runs 12 // 5 = 2 steps.
  for p in range(3):
    split = _split(37, p, 3)
    assert pipeline.steps_per_epoch(split, 5) == 2
    batches = _take(pipeline.train_batches(split, local_batch_size=5, seed=0), 2)
    assert len({*np.concatenate([b["labels"] for b in batches]).tolist()}) == 10


def test_pipeline_argument_errors():
  split = _split(37, 0, 3)
  with pytest.raises(ValueError, match="local batch size 13 is larger than the data per process"):
    pipeline.steps_per_epoch(split, 13)
  with pytest.raises(ValueError, match="local_batch_size=0 must be a positive int"):
    pipeline.train_batches(split, local_batch_size=0, seed=0)
  with pytest.raises(ValueError, match="local_batch_size=-1 must be a positive int"):
    pipeline.eval_batches(split, local_batch_size=-1)
  with pytest.raises(ValueError, match="seed=-1 must be a non-negative int"):
    pipeline.train_batches(split, local_batch_size=2, seed=-1)
  with pytest.raises(ValueError, match="start_step=-3 must be a non-negative int"):
    pipeline.train_batches(split, local_batch_size=2, seed=0, start_step=-3)


def test_image_split_rejects_inconsistent_arrays():
  with pytest.raises(ValueError, match=r"must be uint8 or float32 \(latents\) NHWC"):
    sources.ImageSplit(np.zeros((2, 4, 4, 1), np.float64), np.zeros(2, np.int32), 2, 2, 0, 1)
  with pytest.raises(ValueError, match="labels must be int32 of shape"):
    sources.ImageSplit(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int32), 2, 2, 0, 1)
  with pytest.raises(ValueError, match="more than a 1/2 shard"):
    sources.ImageSplit(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int32), 2, 2, 0, 2)


# ---------------------------------------------------------------- TFDS, offline


class PixelVitTestImages(tfds.core.GeneratorBasedBuilder):
  """A real TFDS dataset generated locally, so the TFDS read path runs offline.

  'fixed': 6x5x3 images; 'varied': sizes vary per image. Image i of a split
  is marked with its index and has label i.
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="fixed"), tfds.core.BuilderConfig(name="varied")]

  def _info(self):
    shape = (6, 5, 3) if self.builder_config.name == "fixed" else (None, None, 3)
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=shape),
          "label": tfds.features.ClassLabel(num_classes=37),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(37), "test": self._generate_examples(11)}

  def _generate_examples(self, n):
    for i in range(n):
      shape = (6, 5, 3) if self.builder_config.name == "fixed" else (6 + i % 3, 5 + i % 2, 3)
      image = np.zeros(shape, np.uint8)
      image[0, 0, 0] = i
      yield i, {"image": image, "label": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for config in ("fixed", "varied"):
    tfds.builder(f"pixel_vit_test_images/{config}", data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.mark.parametrize("split, size", [("train", 37), ("test", 11), ("train[:50%]", 18)])
def test_tfds_shards_partition_the_split(tfds_dir, split, size):
  source = sources.parse_source(
    "tfds:pixel_vit_test_images/fixed", data_dir=tfds_dir, download=False
  )
  whole = source.load(split)
  assert whole.total_examples == size and len(set(whole.labels.tolist())) == size
  if split in ("train", "test"):
    assert sorted(whole.labels.tolist()) == list(range(size))
  for process_count in (2, 3):
    shards = [
      source.load(split, process_index=i, process_count=process_count) for i in range(process_count)
    ]
    # Contiguous pieces in order, np.array_split sizes: their concatenation is the split.
    np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), whole.labels)
    assert [len(s.labels) for s in shards] == [
      len(a) for a in np.array_split(np.arange(size), process_count)
    ]
    for s in shards:
      assert s.total_examples == size and s.num_classes == 37
      assert s.images.shape[1:] == (6, 5, 3) and s.images.dtype == np.uint8
      np.testing.assert_array_equal(s.images[:, 0, 0, 0], s.labels)


def test_tfds_resize_and_variable_sizes(tfds_dir):
  varied = sources.parse_source(
    "tfds:pixel_vit_test_images/varied", data_dir=tfds_dir, download=False
  )
  with pytest.raises(ValueError, match="images vary in size.*config.data.image_size"):
    varied.load("test")
  split = varied.load("test", image_size=4, process_index=0, process_count=2)
  assert split.images.shape == (6, 4, 4, 3) and split.images.dtype == np.uint8


def test_tfds_unknown_split(tfds_dir):
  source = sources.parse_source("tfds:pixel_vit_test_images/fixed", data_dir=tfds_dir)
  with pytest.raises(ValueError, match="has no split 'validation'.*'test', 'train'"):
    source.load("validation")


def test_tfds_unknown_dataset_name(tmp_path):
  with pytest.raises(ValueError, match="Dataset no_such_dataset_xyz not found.*catalog"):
    sources.parse_source("tfds:no_such_dataset_xyz", data_dir=str(tmp_path)).load("train")


def test_tfds_not_prepared_without_download_fails_fast(tmp_path):
  start = time.monotonic()
  with pytest.raises(ValueError, match="not prepared.*download is off") as excinfo:
    sources.parse_source("tfds:mnist", data_dir=str(tmp_path), download=False).load("train")
  assert time.monotonic() - start < 30
  message = str(excinfo.value)
  assert "--config.data.data_dir" in message and "tfds build mnist" in message
  assert "npz:PATH" in message


def test_tfds_not_prepared_and_offline_fails_fast(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_network_reachable", lambda: False)

  def must_not_download(*args, **kwargs):
    raise AssertionError("download_and_prepare called although the network is unreachable")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_download)
  start = time.monotonic()
  with pytest.raises(ValueError, match="cannot be downloaded.*unreachable") as excinfo:
    sources.parse_source("tfds:cifar100", data_dir=str(tmp_path), download=True).load("train")
  assert time.monotonic() - start < 30
  assert "data_dir" in str(excinfo.value) and "tfds build cifar100" in str(excinfo.value)


def test_network_probe_on_loopback(monkeypatch):
  for var in ("https_proxy", "HTTPS_PROXY"):
    monkeypatch.delenv(var, raising=False)
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    assert sources._network_reachable("127.0.0.1", server.getsockname()[1], timeout=2.0)
    free_port = server.getsockname()[1]
  start = time.monotonic()
  assert not sources._network_reachable("127.0.0.1", free_port, timeout=2.0)
  assert time.monotonic() - start < 5


def test_tfds_mock_data_mnist(tmp_path):
  # The pip wheel of tfds ships no metadata for mock_data (testing/metadata is
  # absent), and without it mnist's split sizes are unknown. Write the
  # metadata of a 20-example 'test' split, then let mock_data fake the records.
  builder = tfds.builder("mnist", data_dir=str(tmp_path))
  template = tfds.core.ShardedFileTemplate(
    data_dir=builder.data_path,
    template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
    dataset_name="mnist",
    split="test",
    filetype_suffix="tfrecord",
  )
  builder.info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(
          name="test", shard_lengths=[20], num_bytes=0, filename_template=template
        )
      ]
    )
  )
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)

  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
    split = sources.parse_source("tfds:mnist", download=False).load("test", image_size=14)
  assert split.images.shape == (20, 14, 14, 1) and split.images.dtype == np.uint8
  assert split.labels.dtype == np.int32 and 0 <= split.labels.min() <= split.labels.max() < 10
  assert split.num_classes == 10 and split.total_examples == 20


def test_ahead_on_device_keeps_order_and_puts_depth_batches_ahead():
  put = []

  def source():
    yield from range(6)

  ahead = pipeline.ahead_on_device(source(), lambda b: put.append(b) or ("on device", b), depth=2)
  assert next(ahead) == ("on device", 0)
  # Batch 0 is out, 1 and 2 are already on their way to the devices: no further.
  assert put == [0, 1, 2]
  assert list(ahead) == [("on device", i) for i in range(1, 6)]


def test_ahead_on_device_raises_the_source_error_after_the_batches_before_it():
  def failing():
    yield from (1, 2)
    raise ValueError("bad shard file")

  ahead = pipeline.ahead_on_device(failing(), lambda b: b, depth=3)
  assert [next(ahead), next(ahead)] == [1, 2]
  with pytest.raises(ValueError, match="bad shard file"):
    next(ahead)
  with pytest.raises(ValueError, match="depth=0"):
    pipeline.ahead_on_device(iter(()), lambda b: b, depth=0)
