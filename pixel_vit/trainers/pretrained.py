"""Initialising a classifier's encoder from a pre-trained checkpoint (`config.init_from`).

`config.init_from` (a string; '' = off) names one of
  * a run's workdir (`<workdir>/checkpoints/<step>/` inside; newest step),
  * its `checkpoints` directory (newest step), or
  * one `checkpoints/<step>` directory.

The checkpoint may come from MAE pre-training (`task: 'mae'`,
`trainers/mae.py`) or from a classification run (`task: 'classification'`,
e.g. to fine-tune an ImageNet classifier on another dataset): both store the
encoder as a pure dict under `params['encoder']` in the same layout; every
other top-level parameter (the MAE decoder, a classifier's head) is ignored.

What must agree, checked before anything compiles, each failure a ValueError
naming the checkpoint, the field, both values and the fix:
  * the task ('mae' or 'classification'),
  * the model SIZE and PATCH of `config.model.variant`,
  * `config.model.posemb` (a learned embedding loads into a learned one;
    `sincos2d` / `none` have no parameters but change what the weights mean),
  * the image channels (the tokenizer kernel is per channel),
  * every encoder parameter's shape; a classifier parameter the checkpoint
    lacks is an error. The checkpoint's [CLS] token is dropped when the
    classifier pools by global average (`pool='gap'` builds no [CLS]). A
    learned position embedding of another grid (another image size) is
    resampled bilinearly to the classifier's (`vit.resample_posemb`), as
    big_vision does.

Only the encoder parameters are read from disk (`checkpoint.SavedRun.restore`,
a partial restore onto the classifier's own shardings); the optimizer state,
EMA and decoder are not.
The head keeps its zero initialisation. `params`, not `ema_params`, is loaded.

Only a new run loads `init_from`: a run that resumes from its own workdir
takes its checkpoint (see `loop.start`), so a resumed fine-tune neither reads
nor needs `init_from` any more.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from etils import epath

from pixel_vit import checkpoint as checkpoint_lib
from pixel_vit.models import vit

TASKS = ("mae", "classification")
CLS = "cls"  # the encoder's [CLS] token parameter
POSEMB = "posemb"  # the encoder's learned position embedding, [1, grid*grid, width]


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """One pre-trained checkpoint named by `config.init_from`: where it is, what
  its identity says it is, and the shapes of its encoder parameters."""

  init_from: str
  saved: checkpoint_lib.SavedRun
  identity: checkpoint_lib.RunIdentity
  encoder_shapes: dict  # flat {'blocks/layers/attn/qkv_kernel': shape, ...}

  @property
  def where(self) -> str:
    return f"config.init_from={self.init_from!r} (checkpoint {self.saved.path})"

  # ---------------------------------------------------------------- checks

  def check_model(self, model_config) -> None:
    """Task, SIZE, PATCH and posemb against `config.model` (no data needed)."""
    task = self.identity.task
    if task not in TASKS:
      raise ValueError(
        f"{self.where}: task {task!r} cannot initialise a classifier; init_from takes a "
        f"checkpoint of task {list(TASKS)} (MAE pre-training or a classifier)."
      )
    variant = self.identity.variant
    size, patch = vit.parse_variant(variant)
    want_size, want_patch = vit.parse_variant(model_config.variant)
    size_name, want_size_name = variant.partition("/")[0], model_config.variant.partition("/")[0]
    if size != want_size:
      raise ValueError(
        f"{self.where}: model size (SIZE of SIZE/PATCH) differs: checkpoint "
        f"{size_name!r} ({variant}) vs config.model.variant={model_config.variant!r} "
        f"({want_size_name!r}). Fine-tune the size that was pre-trained "
        f"(--config.model.variant={size_name}/{want_patch}) or point init_from at a "
        f"{want_size_name} checkpoint."
      )
    if patch != want_patch:
      raise ValueError(
        f"{self.where}: patch size (PATCH of SIZE/PATCH) differs: checkpoint {patch} "
        f"({variant}) vs config.model.variant={model_config.variant!r} ({want_patch}). "
        f"Fine-tune with --config.model.variant={size_name}/{patch} or point init_from at "
        f"a checkpoint with patch {want_patch}."
      )
    tokenizer = self.identity.tokenizer or "linear"  # older checkpoints: linear
    if tokenizer != model_config.get("tokenizer", "linear"):
      raise ValueError(
        f"{self.where}: tokenizer differs: checkpoint {tokenizer!r} vs "
        f"config.model.tokenizer={model_config.get('tokenizer', 'linear')!r}. Set "
        f"--config.model.tokenizer={tokenizer} (what the encoder was trained with)."
      )
    posemb = self.identity.posemb
    if posemb != model_config.posemb:
      raise ValueError(
        f"{self.where}: position embedding differs: checkpoint {posemb!r} vs "
        f"config.model.posemb={model_config.posemb!r}. Set "
        f"--config.model.posemb={posemb} (what the encoder was trained with)."
      )

  def check_image_shape(self, image_shape) -> None:
    """The data's channels against the checkpoint's."""
    saved = [int(x) for x in self.identity.image_shape]
    channels = int(image_shape[2])
    if saved[2] != channels:
      raise ValueError(
        f"{self.where}: image channels differ: checkpoint {saved[2]} vs {channels} in "
        f"the data (the tokenizer kernel has one row per channel). Fine-tune on data "
        f"with {saved[2]} channel(s) or pre-train on data like yours."
      )

  def resampled_posemb(self, wanted: dict) -> tuple[int, int] | None:
    """(checkpoint grid, classifier grid) when the learned position
    embeddings differ only in their number of (square-grid) positions."""
    saved, want = self.encoder_shapes.get(POSEMB), wanted.get(POSEMB)
    if saved is None or want is None or tuple(saved) == tuple(want):
      return None
    grids = [math.isqrt(shape[1]) for shape in (saved, want)]
    same_layout = len(saved) == len(want) == 3 and saved[::2] == want[::2]
    if not same_layout or any(g * g != shape[1] for g, shape in zip(grids, (saved, want))):
      return None
    return grids[0], grids[1]

  def encoder_plan(self, encoder_abstract) -> tuple[list[str], tuple[int, int] | None]:
    """Compares the classifier's encoder parameters (a pure dict of shapes)
    with the checkpoint's. Returns (the checkpoint parameters dropped, the
    position embedding's (checkpoint grid, classifier grid) when it is
    resampled); raises naming every missing or mismatched one."""
    wanted = checkpoint_lib.flat_shapes(encoder_abstract)
    missing = sorted(set(wanted) - set(self.encoder_shapes))
    grids = self.resampled_posemb(wanted)
    mismatched = sorted(
      k
      for k in set(wanted) & set(self.encoder_shapes)
      if tuple(wanted[k]) != tuple(self.encoder_shapes[k]) and not (k == POSEMB and grids)
    )
    extra = sorted(set(self.encoder_shapes) - set(wanted))
    problems = [
      f"encoder/{k}: checkpoint {tuple(self.encoder_shapes[k])} vs classifier {tuple(wanted[k])}"
      for k in mismatched
    ]
    problems += [f"encoder/{k}: not in the checkpoint" for k in missing]
    problems += [
      f"encoder/{k}: in the checkpoint, the classifier has no such parameter"
      for k in extra
      if k != CLS
    ]
    if problems:
      hint = (
        " The checkpoint has no [CLS] token: use --config.model.pool=gap." if CLS in missing else ""
      )
      raise ValueError(
        f"{self.where}: its encoder does not fit the classifier's: "
        + "; ".join(problems)
        + "."
        + hint
      )
    return [k for k in extra if k == CLS], grids

  def check(self, config, image_shape, abstract_params) -> list[str]:
    """Every check against the model about to be built; returns what loading
    changes, for the log ('dropped cls', 'resampled posemb 4x4 -> 8x8')."""
    self.check_model(config.model)
    self.check_image_shape(image_shape)
    dropped, grids = self.encoder_plan(abstract_params["encoder"])
    changes = [f"dropped {name}" for name in dropped]
    if grids:
      changes.append(
        f"resampled {POSEMB} {grids[0]}x{grids[0]} -> {grids[1]}x{grids[1]} (bilinear)"
      )
    return changes

  # ---------------------------------------------------------------- loading

  def load_encoder(self, params: dict) -> dict:
    """`params` with `params['encoder']` replaced by the checkpoint's encoder,
    restored straight onto each classifier array's sharding. For
    `loop.start(initial_params=...)`."""
    _, grids = self.encoder_plan(params["encoder"])
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params["encoder"]
    )
    if grids:  # read at the saved size (its token axis is not sharded), then resample
      wanted = target[POSEMB]
      target = {
        **target,
        POSEMB: jax.ShapeDtypeStruct(
          tuple(self.encoder_shapes[POSEMB]), wanted.dtype, sharding=wanted.sharding
        ),
      }
    encoder = self.saved.restore({"params": {"encoder": target}})["params"]["encoder"]
    if grids:
      encoder = {
        **encoder,
        POSEMB: jax.device_put(
          vit.resample_posemb(encoder[POSEMB], grids[1]), params["encoder"][POSEMB].sharding
        ),
      }
    return {**params, "encoder": encoder}


def open_checkpoint(init_from: str) -> Pretrained:
  """Finds the checkpoint and reads its identity and parameter shapes."""
  directory, step = checkpoint_lib.locate(init_from)
  where = f"config.init_from={init_from!r} (checkpoint {directory / str(step)})"
  try:
    saved = checkpoint_lib.open_saved(directory, step)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise ValueError(
      f"{where} could not be read as a pixel_vit checkpoint (items 'state' and 'metadata'): {e}"
    ) from e
  tree = saved.state_tree
  params = tree.get("params") if isinstance(tree, dict) else None
  if not isinstance(params, dict) or not isinstance(params.get("encoder"), dict):
    raise ValueError(
      f"{where}: its parameters have no 'encoder' "
      f"(top-level: {sorted(params) if isinstance(params, dict) else params!r}); "
      "init_from loads the encoder of an MAE or classification run."
    )
  try:
    identity = saved.identity()
  except ValueError as e:
    raise ValueError(
      f"{where}: {e}; it was not written by a pixel_vit trainer that init_from can load."
    ) from None
  return Pretrained(
    init_from=init_from,
    saved=saved,
    identity=identity,
    encoder_shapes=checkpoint_lib.flat_shapes(params["encoder"]),
  )


def check_config(config) -> Pretrained | None:
  """For `validate`: when `config.init_from` names an existing path, reads it and
  checks task, variant and posemb against `config.model`. (A missing path is
  reported when a new run starts; a resumed run does not need it.)"""
  init_from = config.get("init_from", "")
  if not isinstance(init_from, str):
    raise ValueError(
      f"config.init_from={init_from!r} must be a path (a string), or '' for random initialisation."
    )
  if not init_from or not epath.Path(init_from).exists():
    return None
  pretrained = open_checkpoint(init_from)
  pretrained.check_model(config.model)
  return pretrained


def for_new_run(config, workdir: str) -> Pretrained | None:
  """The checkpoint a new run in `workdir` starts from (None when
  `config.init_from` is '' or the run resumes), checked against `config.model`."""
  init_from = config.get("init_from", "")
  if not init_from or checkpoint_lib.workdir_has_checkpoint(workdir):
    return None
  pretrained = open_checkpoint(init_from)
  pretrained.check_model(config.model)
  return pretrained


def describe(pretrained: Pretrained, changes: list[str]) -> str:
  identity = pretrained.identity
  text = (
    f"encoder initialised from {pretrained.saved.path} "
    f"(task {identity.task}, {identity.variant}, posemb {identity.posemb})"
  )
  return text + "".join(f"; {change}" for change in changes)
