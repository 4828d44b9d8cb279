"""TFDS datasets on the streaming path (issue 22): a TFDS image dataset
prepared as ArrayRecord streams through grain with crops of the original
images; `loader='auto'` picks the stream for images of many sizes or a split
too big for memory, and says why; the in-memory path keeps the aspect ratio
of images of many sizes. The datasets are built here by a small TFDS builder
(PNG, so pixels compare exactly): nothing is downloaded."""

import os

import numpy as np
import pytest
from PIL import Image

from pixel_vit.data import crops, sources, stream

tfds = pytest.importorskip("tensorflow_datasets")

NUM_CLASSES = 3


def _original(index: int, seed: int) -> np.ndarray:
  """Example `index`'s pixels: a size drawn per example (aspect 1:3 .. 3:1)."""
  rng = np.random.default_rng([seed, index])
  height, width = (int(v) for v in rng.integers(10, 40, 2))
  pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
  pixels[..., 0] = 40 * (index % NUM_CLASSES)  # the class, in the red channel everywhere
  return pixels


class PvTinyImages(tfds.core.GeneratorBasedBuilder):
  """36 train / 9 test RGB PNGs of many sizes, 3 classes."""

  VERSION = tfds.core.Version("1.0.0")
  SPLITS = {"train": (36, 0), "test": (9, 1)}

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(n, seed) for name, (n, seed) in self.SPLITS.items()}

  def _generate_examples(self, n, seed):
    for i in range(n):
      yield i, {"image": _original(i, seed), "label": i % NUM_CLASSES}


class PvTinySquares(tfds.core.GeneratorBasedBuilder):
  """One image size (12x12): memory by default, unless it does not fit."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(12, 12, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(24), "test": self._generate_examples(6)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      yield i, {"image": (rng.random((12, 12, 3)) * 255).astype(np.uint8), "label": i % NUM_CLASSES}


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
  """{file format: data_dir} with both builders prepared in it."""
  dirs = {}
  for file_format in ("array_record", "tfrecord"):
    data_dir = str(tmp_path_factory.mktemp(file_format))
    for builder in (PvTinyImages, PvTinySquares):
      builder(data_dir=data_dir, file_format=file_format).download_and_prepare()
    dirs[file_format] = data_dir
  return dirs


def load(
  tfds_dirs,
  file_format,
  split="train",
  *,
  dataset="pv_tiny_images",
  loader="auto",
  image_size=16,
  crop_fraction=0.875,
):
  source = sources.parse_source(
    f"tfds:{dataset}",
    data_dir=tfds_dirs[file_format],
    download=False,
    loader=loader,
    crop_fraction=crop_fraction,
  )
  return source.load(split, image_size=image_size)


def test_array_record_images_of_many_sizes_stream_and_eval_crops_the_originals(tfds_dirs):
  """auto streams them (crops need the originals) and says why; every test
  example comes out once, as crops.eval_crop of the image the builder wrote,
  with its label."""
  test = load(tfds_dirs, "array_record", "test")
  assert test.stream is not None and test.images.shape == (0, 16, 16, 3)
  assert "streamed from ArrayRecord" in test.reading and "vary in size" in test.reading
  assert test.total_examples == 9 and test.num_classes == NUM_CLASSES
  batches = list(
    stream.eval_batches(test.stream, stream.HostCrops(16, crop_fraction=0.875), stream.Layout(4))
  )
  images = np.concatenate([b["images"] for b in batches])
  labels = np.concatenate([b["labels"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 9 and (mask[9:] == 0).all()
  # TFDS's writer shuffles records; match each streamed example to its original.
  expected = {
    i: crops.eval_crop(Image.fromarray(_original(i, 1)), 16, crop_fraction=0.875) for i in range(9)
  }
  found = []
  for image, label in zip(images[:9], labels[:9]):
    matches = [i for i, want in expected.items() if np.array_equal(image, want)]
    assert len(matches) == 1, "a streamed crop matches no original's eval crop"
    assert label == matches[0] % NUM_CLASSES
    found.extend(matches)
  assert sorted(found) == list(range(9))


def test_array_record_train_batches_are_random_crops_of_the_originals(tfds_dirs):
  train = load(tfds_dirs, "array_record")
  host = stream.HostCrops(16)
  layout = stream.Layout(12)
  first = next(
    stream.train_batches(train.stream, host, layout, seed=3, start_step=0, total_steps=2)
  )
  again = next(
    stream.train_batches(train.stream, host, layout, seed=3, start_step=0, total_steps=2)
  )
  np.testing.assert_array_equal(first["images"], again["images"])
  assert first["images"].shape == (12, 16, 16, 3) and first["images"].dtype == np.uint8
  reader = train.stream.open()
  labels = sorted(reader[i][0] for i in range(train.total_examples))
  assert labels == sorted(i % NUM_CLASSES for i in range(36))
  # The class fills the original's red channel, so any crop of it, resized
  # and flipped, keeps that level: each image came with its own label.
  red = first["images"][..., 0].astype(int)
  expected = 40 * first["labels"].astype(int)[:, None, None]
  assert np.abs(red - expected).max() <= 1, np.abs(red - expected).max()


def test_a_tfrecord_dataset_is_refused_for_the_stream_with_the_conversion_command(tfds_dirs):
  with pytest.raises(
    ValueError,
    match=r"not prepared as ArrayRecord .*tfds convert_format "
    r"--dataset_version_dir=.*--out_file_format=array_record",
  ):
    load(tfds_dirs, "tfrecord", loader="stream")


def test_images_of_many_sizes_in_memory_keep_their_aspect(tfds_dirs):
  """Prepared as TFRecord, auto reads them into memory: each image is its
  centre crop (shorter side to image_size / crop_fraction), not squeezed to
  a square; the first log line's `reading` says so."""
  test = load(tfds_dirs, "tfrecord", "test", crop_fraction=0.875)
  assert test.stream is None and test.images.shape == (9, 16, 16, 3)
  assert "centre crop" in test.reading
  for image, label in zip(test.images, test.labels):
    distances = {}
    for i in range(9):
      original = Image.fromarray(_original(i, 1))
      centre = crops.eval_crop(original, 16, crop_fraction=0.875).astype(float)
      squeezed = np.asarray(original.resize((16, 16), crops.RESAMPLE), float)
      distances[i] = (np.abs(image - centre).mean(), np.abs(image - squeezed).mean())
    best = min(distances, key=lambda i: distances[i][0])
    # The stored crop is crops.eval_crop's; a squeeze differs by far more.
    assert distances[best][0] < 12, distances[best]
    assert label == best % NUM_CLASSES


def test_auto_streams_a_split_that_does_not_fit_and_refuses_when_it_cannot(tfds_dirs, monkeypatch):
  assert (
    load(tfds_dirs, "array_record", dataset="pv_tiny_squares", image_size=12).stream is None
  )  # fits: memory
  monkeypatch.setattr(sources, "available_memory_bytes", lambda: 1000)
  squares = load(tfds_dirs, "array_record", dataset="pv_tiny_squares", image_size=12)
  assert squares.stream is not None and "would not fit in memory" in squares.reading
  with pytest.raises(
    ValueError,
    match=r"needs about .* more than 50% .* Stream it instead: "
    r".*convert_format.*write_records",
  ):
    load(tfds_dirs, "tfrecord", dataset="pv_tiny_squares", image_size=12)
  with pytest.raises(
    ValueError,
    match=r"needs about .* it is prepared as ArrayRecord, so use "
    r"config.data.loader='auto'",
  ):
    load(tfds_dirs, "array_record", dataset="pv_tiny_squares", image_size=12, loader="memory")


@pytest.mark.slow
def test_a_run_on_a_tfds_array_record_dataset_streams_and_says_so(
  quick_config, tfds_dirs, make_workdir, caplog
):
  from pixel_vit.trainers import classification

  config = quick_config(
    {
      "data.source": "tfds:pv_tiny_images",
      "data.data_dir": tfds_dirs["array_record"],
      "data.download": False,
      "data.image_size": 8,
      "batch_size": 16,
      "eval_batch_size": 8,
      "total_steps": 3,
      "augment.crop": True,
      "augment.flip": True,
    }
  )
  caplog.set_level("INFO")
  _, results = classification.train_and_evaluate(config, make_workdir("tfds_stream"))
  assert results["eval/count"] == 9
  first = [r.getMessage() for r in caplog.records if "input " in r.getMessage()]
  assert first and "streamed from ArrayRecord (its images vary in size" in first[0], first


def test_a_missing_array_record_shard_is_named_with_the_fix(tfds_dirs, tmp_path):
  import shutil

  data_dir = str(tmp_path / "copy")
  shutil.copytree(tfds_dirs["array_record"], data_dir)
  folder = os.path.join(data_dir, "pv_tiny_images", "1.0.0")
  shard = next(n for n in os.listdir(folder) if n.startswith("pv_tiny_images-train.array_record"))
  os.remove(os.path.join(folder, shard))
  with pytest.raises(
    ValueError,
    match=rf"1 of 1 ArrayRecord shards of tfds:pv_tiny_images split "
    rf"'train' .* missing, e.g. {shard}: .*tfds build",
  ):
    load({"copy": data_dir}, "copy")
