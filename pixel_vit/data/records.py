"""Image datasets as ArrayRecord files, which the streaming loader
(data/stream.py) reads with grain: the layout `pixel_vit.write_records`
writes from an image folder (`RecordSplit`), and TFDS datasets prepared with
`file_format=array_record` (`TfdsRecordSplit`). Both give, per index, the
label and the image file's bytes, undecoded.

A split is `<dir>/<split>-NNNNN-of-MMMMM.array_record` shards plus
`<dir>/<split>.json`, written last, which says the split is complete: its
example count, class names and counts, shard names, and what the writer
converted or skipped. Each record is one example: an 8-byte header (`PVR1`,
the label as little-endian uint32) followed by the image file's bytes as
they were on disk (JPEG, PNG, ...): decoding and cropping happen when read,
on the original image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

FORMAT = "pixel_vit.records/1"

# config.data.on_bad_example: what a reader does with an image that does not
# decode: 'fail' stops, naming it; 'skip' passes over it and counts it.
ON_BAD_EXAMPLE = ("fail", "skip")


def check_on_bad_example(value: str) -> None:
  if value not in ON_BAD_EXAMPLE:
    raise ValueError(
      f"config.data.on_bad_example={value!r} is not one of {list(ON_BAD_EXAMPLE)} (fail: "
      "stop at an image that does not decode; skip: pass over it and count it)."
    )


_MAGIC = b"PVR1"
_HEADER = struct.Struct("<4sI")


def encode_record(label: int, image_bytes: bytes) -> bytes:
  return _HEADER.pack(_MAGIC, label) + image_bytes


def decode_record(record: bytes, *, where: str = "a record") -> tuple[int, bytes]:
  """(label, image file bytes)."""
  if len(record) < _HEADER.size or record[:4] != _MAGIC:
    raise ValueError(
      f"{where} is not a pixel_vit image record (no {_MAGIC!r} header): "
      "write the files with `python -m pixel_vit.write_records`, or read a "
      "TFDS ArrayRecord dataset as tfds:NAME."
    )
  _, label = _HEADER.unpack_from(record)
  return label, record[_HEADER.size :]


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def metadata_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"{split}.json")


@dataclasses.dataclass(frozen=True)
class RecordSplit:
  """One written split: where its shards are and what it holds."""

  directory: str
  split: str
  num_examples: int
  class_names: tuple[str, ...]
  class_counts: tuple[int, ...]
  shards: tuple[str, ...]  # file names in `directory`, in record order
  shard_sizes: tuple[int, ...]
  skipped: tuple[str, ...] = ()  # files the writer could not decode
  converted: dict = dataclasses.field(default_factory=dict)  # PIL mode -> count

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def paths(self) -> list[str]:
    return [os.path.join(self.directory, name) for name in self.shards]

  def to_json(self) -> dict:
    fields = dataclasses.asdict(self)
    fields.pop("directory")
    return {"format": FORMAT, **fields}

  def open(self) -> "_RecordReader":
    return _RecordReader(self.paths, self.directory)


class _RecordReader:
  """index -> (label, image file bytes) over a RecordSplit's shards."""

  def __init__(self, paths: list[str], directory: str):
    import grain  # only where records are read

    self._source, self._directory = grain.sources.ArrayRecordDataSource(paths), directory

  def __getitem__(self, index: int) -> tuple[int, bytes]:
    return decode_record(self._source[int(index)], where=f"record {index} of {self._directory}")


@dataclasses.dataclass(frozen=True)
class TfdsRecordSplit:
  """A split of a TFDS image classification dataset prepared as ArrayRecord
  ('image', 'label' features), read through `tfds.data_source` with the
  image left encoded, so that crops happen on the original as for records."""

  dataset: str
  data_dir: str | None
  split: str  # sub-splits too ('train[:90%]')
  directory: str  # the prepared dataset's folder, for messages
  num_examples: int
  num_classes: int
  shards: tuple[str, ...]
  class_counts: None = None  # TFDS does not record them

  def open(self) -> "_TfdsReader":
    return _TfdsReader(self)


class _TfdsReader:
  def __init__(self, split: TfdsRecordSplit):
    import tensorflow_datasets as tfds

    self._source = tfds.data_source(
      split.dataset,
      split=split.split,
      data_dir=split.data_dir,
      download=False,
      decoders={"image": tfds.decode.SkipDecoding()},
    )

  def __getitem__(self, index: int) -> tuple[int, bytes]:
    example = self._source[int(index)]
    return int(example["label"]), example["image"]


def open_split(directory: str, split: str) -> RecordSplit:
  """The split's metadata, with every shard checked to exist; errors name the
  file and the fix."""
  path = metadata_path(directory, split)
  if not os.path.exists(path):
    partial = [n for n in _listdir(directory) if n.startswith(f"{split}-")]
    raise ValueError(
      f"{path} does not exist: {directory} holds no complete {split!r} split"
      + (
        f" ({len(partial)} shard files without it: the writer did not finish; rerun "
        "`python -m pixel_vit.write_records` with the same flags to complete it)"
        if partial
        else "; write one with `python -m pixel_vit.write_records`"
      )
      + "."
    )
  with open(path) as f:
    try:
      fields = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e.msg}); rerun the writer.") from e
  if fields.pop("format", None) != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} split description.")
  tuples = {k: tuple(v) for k, v in fields.items() if isinstance(v, list)}
  split_info = RecordSplit(directory=directory, **{**fields, **tuples})
  missing = [p for p in split_info.paths if not os.path.exists(p)]
  if missing:
    raise ValueError(
      f"{len(missing)} of {len(split_info.shards)} shards of {split!r} in {directory} are "
      f"missing, e.g. {os.path.basename(missing[0])}: restore them, or delete {path} and "
      "rerun `python -m pixel_vit.write_records` to write them again."
    )
  return split_info


def _listdir(directory: str) -> list[str]:
  return os.listdir(directory) if os.path.isdir(directory) else []


# What the streaming loader reads: both give .split, .directory, .num_examples,
# .num_classes, .class_counts, .shards, and .open() -> index -> (label, bytes).
StreamSplit = RecordSplit | TfdsRecordSplit
