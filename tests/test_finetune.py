"""Fine-tuning and linear probing from a pre-trained (MAE) checkpoint:
`config.init_from` loading and its checks, layer-wise lr decay, frozen
parameters, the mae_finetune config, and resume winning over init_from.

The MAE checkpoints here are fabricated in the format trainers/mae.py writes
(a `vit.Encoder` with [CLS] under params['encoder'], a decoder beside it, an
AdamW state of that tree, JSON metadata), so these tests do not depend on
MAE training.
"""

import dataclasses
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from pixel_vit import checkpoint as checkpoint_lib
from pixel_vit import optimizer as optimizer_lib
from pixel_vit import parallel
from pixel_vit.models import vit
from pixel_vit.trainers import classification, loop, pretrained
from pixel_vit.trainers import state as state_lib
from support import REPO_ROOT, TINY_RUN, assert_trees_equal, load_config_module, set_dotted

DEPTH = vit.SIZES["mu"].depth


def numpy_tree(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


# ---------------------------------------------------------------- fabricated MAE checkpoints


def write_mae_checkpoint(
  workdir: str, steps_and_seeds, *, image_size=8, variant="mu/1", posemb="learn"
):
  """Saves one MAE-format checkpoint per (step, seed); returns {step: encoder params}."""
  size, patch = vit.parse_variant(variant)
  checkpointer = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=10, async_save=False)
  encoders = {}
  for step, seed in steps_and_seeds:
    encoder = vit.Encoder(
      size=size,
      patch=patch,
      image_size=image_size,
      channels=1,
      posemb=posemb,
      cls_token=True,
      rngs=nnx.Rngs(seed),
    )
    encoder_params = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    # Not the init values: a loader that kept the classifier's init would show.
    encoder_params["cls"] = encoder_params["cls"] + 0.5
    params = {
      "encoder": encoder_params,
      "decoder_embed_kernel": jnp.full((size.width, 32), 0.1),
      "decoder_blocks": {"w": jnp.ones((2, 3))},
    }
    state = state_lib.TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      opt_state=optax.adamw(1e-3, b2=0.95).init(params),
      ema_params=None,
      rng=jax.random.PRNGKey(seed),
    )
    identity = checkpoint_lib.RunIdentity(
      task="mae", variant=variant, posemb=posemb, image_shape=(image_size, image_size, 1)
    )
    checkpointer.save(step, state, identity, force=True)
    encoders[step] = numpy_tree(encoder_params)
  checkpointer.wait()
  checkpointer.close()
  return encoders


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
  """An MAE workdir (mu/1, learned posemb, 8x8x1 like digits) with checkpoints
  at steps 3 and 7 holding different encoders."""
  workdir = str(tmp_path_factory.mktemp("mae") / "workdir")
  encoders = write_mae_checkpoint(workdir, [(3, 1), (7, 2)])
  return workdir, encoders


@pytest.fixture(scope="module")
def mae_run_16px(tmp_path_factory):
  """The same model pre-trained on 16x16 images."""
  workdir = str(tmp_path_factory.mktemp("mae16") / "workdir")
  write_mae_checkpoint(workdir, [(2, 3)], image_size=16)
  return workdir


@pytest.fixture(scope="module")
def mae_finetune():
  return load_config_module(REPO_ROOT / "configs" / "mae_finetune.py")


@pytest.fixture
def finetune_config(mae_finetune):
  """`finetune_config(arg, overrides)`: mae_finetune.py:quick,ARG shortened to
  TINY_RUN, with the learned position embedding of the fabricated checkpoints."""

  def make(arg: str = "", overrides: dict | None = None):
    config = mae_finetune.get_config(",".join(filter(None, ["quick", arg])))
    config = set_dotted(config, {**TINY_RUN, "model.posemb": "learn"})
    return set_dotted(config, overrides or {})

  return make


def classifier_state(config, mesh_devices=None):
  """A freshly created (sharded) classifier state for `config` on digits."""
  train_split, _ = loop.load_splits(config)
  make_model = classification.make_model_fn(config, train_split)
  abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(make_model))[1])
  tx = optimizer_lib.make_optimizer(config.optimizer, optax.constant_schedule(1e-3), abstract)
  mesh = parallel.make_mesh(config.mesh, devices=mesh_devices)
  described, create = state_lib.sharded_state(
    make_model, tx, mesh=mesh, rules=config.sharding_rules, seed=config.seed, ema=False
  )
  return described, create(), abstract, train_split


# ---------------------------------------------------------------- finding and loading


def test_init_from_accepts_workdir_checkpoints_dir_or_step(mae_run, monkeypatch):
  workdir, _ = mae_run
  checkpoints = os.path.join(workdir, "checkpoints")
  monkeypatch.chdir(os.path.dirname(workdir))
  for path, step in (
    (workdir, 7),
    (checkpoints, 7),
    (os.path.join(checkpoints, "3"), 3),
    ("workdir", 7),
    (os.path.join("workdir", "checkpoints", "3"), 3),
  ):
    source = pretrained.open_checkpoint(path)
    assert source.saved.step == step, path
    assert source.identity.task == "mae" and source.identity.variant == "mu/1"
    assert source.encoder_shapes["posemb"] == (1, 64, 64)
    assert source.encoder_shapes["blocks/layers/attn/qkv_kernel"][0] == DEPTH
    assert not any(k.startswith("decoder") for k in source.encoder_shapes)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_loading_puts_the_encoder_exactly_into_the_classifier(mae_run, finetune_config, pool):
  workdir, encoders = mae_run
  config = finetune_config(f"init_from={workdir}", {"model.pool": pool})
  classification.validate(config)
  described, state, abstract, train_split = classifier_state(config)
  source = pretrained.open_checkpoint(workdir)
  changes = source.check(config, train_split.images.shape[1:], abstract)
  assert changes == ([] if pool == "cls" else ["dropped cls"])

  loaded = source.load_encoder(state.params)

  expected = dict(encoders[7])  # the newest step
  if pool == "gap":  # no [CLS] in a global-average-pooling classifier
    assert "cls" not in state.params["encoder"]
    del expected["cls"]
  assert_trees_equal(loaded["encoder"], expected, "encoder")
  # The head keeps its zero initialisation; nothing else comes from the checkpoint.
  assert set(loaded) == {"encoder", "head_kernel", "head_bias"}
  assert not np.any(np.asarray(loaded["head_kernel"])) and not np.any(
    np.asarray(loaded["head_bias"])
  )
  # Restored straight onto the classifier's shardings (8 devices).
  for new, old in zip(jax.tree.leaves(loaded), jax.tree.leaves(state.params)):
    assert new.sharding == old.sharding
  assert len(jax.tree.leaves(loaded)[0].sharding.device_set) == 8


def test_a_step_directory_loads_that_step(mae_run, finetune_config):
  workdir, encoders = mae_run
  config = finetune_config(overrides={"model.pool": "cls"})
  _, state, _, _ = classifier_state(config, mesh_devices=jax.devices()[:1])
  loaded = pretrained.open_checkpoint(os.path.join(workdir, "checkpoints", "3")).load_encoder(
    state.params
  )
  assert_trees_equal(loaded["encoder"], encoders[3], "encoder")
  assert not np.array_equal(encoders[3]["posemb"], encoders[7]["posemb"])


# ---------------------------------------------------------------- mismatches, before any jit


@pytest.mark.parametrize(
  "overrides, match",
  [
    pytest.param(
      {"model.variant": "mu/2"},
      r"patch size \(PATCH of SIZE/PATCH\) differs: checkpoint 1 \(mu/1\) vs "
      r"config\.model\.variant='mu/2' \(2\)\. Fine-tune with "
      r"--config\.model\.variant=mu/1",
      id="patch",
    ),
    pytest.param(
      {"model.variant": "Ti/1"},
      r"model size \(SIZE of SIZE/PATCH\) differs: checkpoint 'mu' \(mu/1\) vs "
      r"config\.model\.variant='Ti/1' \('Ti'\)",
      id="size",
    ),
    pytest.param(
      {"model.posemb": "sincos2d"},
      r"position embedding differs: checkpoint 'learn' vs "
      r"config\.model\.posemb='sincos2d'\. Set --config\.model\.posemb=learn",
      id="posemb",
    ),
  ],
)
def test_mismatched_model_fails_in_validate(
  mae_run, finetune_config, workdir, overrides, match, no_jit
):
  mae_workdir, _ = mae_run
  config = finetune_config(f"init_from={mae_workdir}", overrides)
  where = re.escape(f"config.init_from='{mae_workdir}' (checkpoint {mae_workdir}/checkpoints/7): ")
  with pytest.raises(ValueError, match=where + match):
    classification.validate(config)
  with pytest.raises(ValueError, match=where + match):  # and the trainer on its own
    classification.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def bilinear_halving_reference(table: np.ndarray) -> np.ndarray:
  """[2n, 2n, w] -> [n, n, w] away from the border, written out: shrinking by
  2 with a bilinear (triangle) kernel stretched to the input's scale, which
  is what antialiasing does, averages 4 inputs per axis with weights
  1, 3, 3, 1 (/ 8), centred between input pixels 2i and 2i + 1."""
  weights = np.array([1, 3, 3, 1]) / 8
  n = table.shape[0] // 2
  out = np.zeros((n - 2, n - 2, table.shape[-1]))
  for i in range(1, n - 1):
    for j in range(1, n - 1):
      window = table[2 * i - 1 : 2 * i + 3, 2 * j - 1 : 2 * j + 3]
      out[i - 1, j - 1] = np.einsum("a,b,abw->w", weights, weights, window)
  return out


def test_another_image_size_resamples_the_position_embedding(
  mae_run_16px, finetune_config, workdir, caplog
):
  """A checkpoint pre-trained at 16x16 (a 16x16 grid of positions) fine-tunes
  at 8x8: its learned position embedding is resampled bilinearly to 8x8 (as
  big_vision does); everything else loads as saved, and the log says so."""
  config = finetune_config(f"init_from={mae_run_16px}", {"model.pool": "cls"})
  classification.validate(config)
  described, state, abstract, train_split = classifier_state(config)
  source = pretrained.open_checkpoint(mae_run_16px)
  assert source.encoder_shapes["posemb"] == (1, 256, 64)
  changes = source.check(config, train_split.images.shape[1:], abstract)
  assert changes == ["resampled posemb 16x16 -> 8x8 (bilinear)"]
  loaded = source.load_encoder(state.params)["encoder"]
  saved = source.saved.restore(
    {
      "params": {
        "encoder": jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params["encoder"]
        )
        | {"posemb": jax.ShapeDtypeStruct((1, 256, 64), jnp.float32)}
      }
    }
  )["params"]["encoder"]
  posemb = np.asarray(loaded["posemb"]).reshape(8, 8, 64)
  np.testing.assert_allclose(
    posemb[1:-1, 1:-1],
    bilinear_halving_reference(np.asarray(saved["posemb"]).reshape(16, 16, 64)),
    rtol=1e-5,
    atol=1e-6,
  )
  assert loaded["posemb"].sharding == state.params["encoder"]["posemb"].sharding
  for name in ("cls", "tokenizer_kernel"):
    np.testing.assert_array_equal(loaded[name], saved[name])
  # End to end: the run trains from it and says what it changed.
  caplog.set_level("INFO")
  classification.train_and_evaluate(set_dotted(config, {"total_steps": 2}), workdir)
  assert "resampled posemb 16x16 -> 8x8 (bilinear)" in caplog.text


def test_resample_posemb_keeps_a_grid_of_the_same_size_and_refuses_a_non_square_one():
  table = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(1, 16, 6)
  assert vit.resample_posemb(table, 4) is table
  up = vit.resample_posemb(table, 8)
  assert up.shape == (1, 64, 6)
  # Upsampling a constant grid keeps it constant.
  np.testing.assert_allclose(
    vit.resample_posemb(jnp.ones((1, 9, 2)), 6), np.ones((1, 36, 2)), rtol=1e-6
  )
  with pytest.raises(ValueError, match="12 tokens is not a square grid"):
    vit.resample_posemb(jnp.ones((1, 12, 2)), 4)


def test_missing_init_from_fails_before_compiling(finetune_config, tmp_path, workdir, no_jit):
  missing = str(tmp_path / "no_such_mae_run")
  config = finetune_config(f"init_from={missing}")
  classification.validate(config)  # a resumed run would not need it
  with pytest.raises(
    ValueError,
    match=re.escape(f"config.init_from='{missing}' does not exist. ")
    + r"Point it at a pre-training workdir",
  ):
    classification.train_and_evaluate(config, workdir)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=r"holds no finished checkpoint"):
    classification.train_and_evaluate(finetune_config(f"init_from={empty}"), workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_other_mismatches_are_named(mae_run):
  source = pretrained.open_checkpoint(mae_run[0])
  model = ml_collections.ConfigDict(dict(variant="mu/1", posemb="learn"))
  with pytest.raises(ValueError, match=r"task 'diffusion' cannot initialise a classifier"):
    dataclasses.replace(
      source, identity=dataclasses.replace(source.identity, task="diffusion")
    ).check_model(model)
  dataclasses.replace(
    source, identity=dataclasses.replace(source.identity, task="classification")
  ).check_model(model)  # a classifier's encoder is fine too
  with pytest.raises(ValueError, match=r"image channels differ: checkpoint 1 vs 3"):
    source.check_image_shape((8, 8, 3))
  source.check_image_shape((16, 16, 1))  # another size: the position embedding is resampled
  # Leaf by leaf: a missing [CLS] (with the fix) and a wrong shape, each named.
  shapes = dict(source.encoder_shapes)
  del shapes["cls"]
  shapes["norm/scale"] = (32,)
  # (A flat dict with '/' in its keys names leaves the same way as the nested one.)
  wanted = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in source.encoder_shapes.items()}
  with pytest.raises(
    ValueError,
    match=r"encoder/norm/scale: checkpoint \(32,\) vs classifier "
    r"\(64,\); encoder/cls: not in the checkpoint\..*"
    r"--config\.model\.pool=gap",
  ):
    dataclasses.replace(source, encoder_shapes=shapes).encoder_plan(wanted)


# ---------------------------------------------------------------- layer-wise lr decay


def optimizer_config(**overrides):
  return ml_collections.ConfigDict(
    {
      **dict(
        lr=1e-3,
        end_lr=0.0,
        b1=0.9,
        b2=0.999,
        weight_decay=0.0,
        grad_clip=0.0,
        warmup_steps=0,
        ema_decay=0.0,
      ),
      **overrides,
    }
  )


def first_update(opt, params, grads):
  tx = optimizer_lib.make_optimizer(opt, optax.constant_schedule(opt.lr), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return numpy_tree(updates)


@pytest.fixture(scope="module")
def classifier_params():
  model_config = ml_collections.ConfigDict(
    dict(
      variant="mu/1",
      posemb="learn",
      pool="cls",
      dtype="float32",
      attention="xla",
      scan=True,
      remat="none",
      drop_path=0.0,
    )
  )
  model = vit.build_classifier(
    model_config, image_size=8, channels=1, num_classes=10, rngs=nnx.Rngs(0)
  )
  params = nnx.to_pure_dict(nnx.split(model)[1])
  return jax.tree.map(lambda x: x + 0.01, params)  # no zero parameter (weight decay below)


@pytest.mark.parametrize("decay", [0.75, 0.5])
def test_layer_decay_scales_each_layer(classifier_params, decay):
  params = classifier_params
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  base = first_update(optimizer_config(), params, grads)
  decayed = first_update(optimizer_config(layer_decay=decay), params, grads)
  for layer_one in (optimizer_config(layer_decay=1.0),):  # 1 = off, like 0
    assert_trees_equal(first_update(layer_one, params, grads), base, "layer_decay=1")

  def ratio(path):
    node_base, node_decayed = base, decayed
    for key in path.split("/"):
      node_base, node_decayed = node_base[key], node_decayed[key]
    return node_decayed / node_base

  assert np.all(base["head_kernel"] != 0)
  L = DEPTH
  # The head and the final norm are layer L+1: unscaled.
  for path in ("head_kernel", "head_bias", "encoder/norm/scale"):
    np.testing.assert_allclose(ratio(path), 1.0, rtol=1e-6, err_msg=path)
  # Tokenizer, position embedding, [CLS]: layer 0.
  for path in ("encoder/tokenizer_kernel", "encoder/posemb", "encoder/cls"):
    np.testing.assert_allclose(ratio(path), decay ** (L + 1), rtol=1e-6, err_msg=path)
  # Stacked blocks: block i (1-based) along the leading axis gets decay**(L+1-i).
  for path in (
    "encoder/blocks/layers/attn/qkv_kernel",
    "encoder/blocks/layers/mlp/fc2_bias",
    "encoder/blocks/layers/norm1/scale",
  ):
    r = ratio(path)
    for i in range(1, L + 1):
      np.testing.assert_allclose(
        r[i - 1], decay ** (L + 1 - i), rtol=1e-6, err_msg=f"{path} block {i}"
      )


def test_layer_decay_also_scales_weight_decay(classifier_params):
  """MAE's lr_scale multiplies the whole AdamW step, decoupled weight decay included."""
  params = classifier_params
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  base = first_update(optimizer_config(weight_decay=0.05), params, zero_grads)
  decayed = first_update(optimizer_config(weight_decay=0.05, layer_decay=0.5), params, zero_grads)
  kernel = "qkv_kernel"
  base_k = base["encoder"]["blocks"]["layers"]["attn"][kernel]
  decayed_k = decayed["encoder"]["blocks"]["layers"]["attn"][kernel]
  np.testing.assert_allclose(
    base_k,
    -1e-3 * 0.05 * np.asarray(params["encoder"]["blocks"]["layers"]["attn"][kernel]),
    rtol=1e-5,
  )
  for i in range(1, DEPTH + 1):
    np.testing.assert_allclose(decayed_k[i - 1], base_k[i - 1] * 0.5 ** (DEPTH + 1 - i), rtol=1e-6)


# ---------------------------------------------------------------- freezing


def test_frozen_parameters_get_exactly_zero_updates(classifier_params):
  params = classifier_params
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  opt = optimizer_config(weight_decay=0.05, grad_clip=1.0, freeze=("encoder",), layer_decay=0.75)
  tx = optimizer_lib.make_optimizer(opt, optax.constant_schedule(1e-3), params)
  state = tx.init(params)
  first = None
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    first = updates if first is None else first
    for leaf in jax.tree.leaves(updates["encoder"]):
      assert not np.any(np.asarray(leaf))
    assert np.all(np.asarray(updates["head_kernel"]) != 0)
  # Clipping saw only the head's gradient: its update equals a run without the encoder.
  head_only = {k: v for k, v in params.items() if k != "encoder"}
  tx_head = optimizer_lib.make_optimizer(
    optimizer_config(weight_decay=0.05, grad_clip=1.0), optax.constant_schedule(1e-3), head_only
  )
  head_updates, _ = tx_head.update(
    {k: grads[k] for k in head_only}, tx_head.init(head_only), head_only
  )
  np.testing.assert_allclose(
    numpy_tree(first)["head_kernel"], numpy_tree(head_updates)["head_kernel"], rtol=1e-7
  )


@pytest.mark.parametrize(
  "freeze, match",
  [
    (
      ("encodr",),
      r"config\.optimizer\.freeze=\('encodr',\) names \['encodr'\], which are not "
      r"top-level parameters.*\['encoder', 'head_bias', 'head_kernel'\]",
    ),
    (("encoder", "head_kernel", "head_bias"), r"freezes every parameter"),
  ],
)
def test_bad_freeze_is_named(classifier_params, freeze, match):
  with pytest.raises(ValueError, match=match):
    optimizer_lib.make_optimizer(
      optimizer_config(freeze=freeze), optax.constant_schedule(1e-3), classifier_params
    )


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"optimizer.layer_decay": 1.5}, r"config\.optimizer\.layer_decay=1\.5 must be in \[0, 1\]"),
    ({"optimizer.layer_decay": -0.1}, r"config\.optimizer\.layer_decay=-0\.1"),
    (
      {"optimizer.freeze": ("",)},
      r"config\.optimizer\.freeze=\('',\) must be a tuple of "
      r"top-level parameter names",
    ),
  ],
)
def test_validate_rejects_bad_finetune_options(finetune_config, overrides, match, no_jit):
  with pytest.raises(ValueError, match=match):
    classification.validate(finetune_config(overrides=overrides))


# ---------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_probe_run_loads_the_encoder_and_keeps_it_frozen(mae_run, finetune_config, workdir):
  """A linear probe through the trainer: after 6 steps the encoder is bitwise
  the checkpoint's (so it was loaded, and never moved) and the head learned."""
  mae_workdir, encoders = mae_run
  config = finetune_config(f"mode=probe,init_from={mae_workdir}", {"model.pool": "cls"})
  assert config.optimizer.freeze == ("encoder",)
  classification.validate(config)
  state, results = classification.train_and_evaluate(config, workdir)
  assert int(jax.device_get(state.step)) == TINY_RUN["total_steps"]
  assert_trees_equal(state.params["encoder"], encoders[7], "encoder")
  assert np.abs(np.asarray(state.params["head_kernel"])).max() > 1e-4
  assert np.isfinite(results["eval/loss"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert "train/loss" in f.read()


@pytest.mark.slow
def test_resumed_finetune_does_not_reload_init_from(mae_run, finetune_config, make_workdir):
  """Run A fine-tunes 0 -> 6 from the MAE checkpoint. Run B starts from A's
  step-3 checkpoint with init_from pointing at a path that no longer exists:
  it resumes (the workdir wins), never reads init_from, and ends bitwise where
  A ended."""
  mae_workdir, encoders = mae_run
  config = finetune_config(f"init_from={mae_workdir}", {"keep_checkpoints": 10})
  assert config.optimizer.layer_decay == 0.75 and config.model.pool == "gap"
  run_a, run_b = make_workdir("a"), make_workdir("b")
  state_a, _ = classification.train_and_evaluate(config, run_a)
  moved = max(
    np.abs(np.asarray(a) - b).max()
    for a, b in zip(
      jax.tree.leaves(jax.device_get(state_a.params["encoder"]["blocks"])),
      jax.tree.leaves(encoders[7]["blocks"]),
    )
  )
  assert 0 < moved < 0.1  # fine-tuned from the checkpoint, not from scratch

  os.makedirs(os.path.join(run_b, "checkpoints"))
  shutil.copytree(os.path.join(run_a, "checkpoints", "3"), os.path.join(run_b, "checkpoints", "3"))
  gone = config.copy_and_resolve_references()
  gone.init_from = os.path.join(os.path.dirname(run_b), "deleted_mae_run")
  classification.validate(gone)
  state_b, _ = classification.train_and_evaluate(gone, run_b)
  assert_trees_equal(state_b.params, state_a.params, "params")
  assert_trees_equal(state_b.opt_state, state_a.opt_state, "opt_state")


# ---------------------------------------------------------------- the config


def test_mae_finetune_config(mae_finetune, no_jit):
  finetune = mae_finetune.get_config("init_from=/runs/mae")
  assert finetune.init_from == "/runs/mae" and finetune.task == "classification"
  assert finetune.model.variant == "Ti/1" and finetune.model.posemb == "learn"
  assert finetune.model.pool == "gap" and finetune.model.drop_path == 0.1
  opt = finetune.optimizer
  assert (opt.layer_decay, opt.weight_decay, opt.freeze) == (0.75, 0.05, ())
  assert opt.lr == pytest.approx(5e-4 * finetune.batch_size / 256)
  assert (
    finetune.augment.mixup_alpha,
    finetune.augment.cutmix_alpha,
    finetune.augment.label_smoothing,
  ) == (0.8, 1.0, 0.1)
  finetune.batch_size = 512  # lr follows the batch size (MAE's rule)
  assert finetune.optimizer.lr == pytest.approx(5e-4 * 2)
  assert mae_finetune.get_config("variant=L/2").optimizer.layer_decay == 0.65
  finetune.optimizer.lr = 3e-3  # and it can still be set directly
  assert finetune.optimizer.lr == 3e-3

  probe = mae_finetune.get_config("mode=probe")
  assert probe.optimizer.freeze == ("encoder",) and probe.optimizer.layer_decay == 0.0
  assert probe.optimizer.weight_decay == 0.0 and probe.model.drop_path == 0.0
  assert probe.augment.mixup_alpha == 0.0 and probe.augment.cutmix_alpha == 0.0

  quick = mae_finetune.get_config("quick")
  assert quick.data.source == "digits" and quick.model.variant == "mu/1"
  # The model configs/mae_pixel.py pre-trains with the same arguments.
  mae_pixel = load_config_module(REPO_ROOT / "configs" / "mae_pixel.py")
  for arg in ("quick", "", "variant=S/2"):
    pretraining, finetuning = mae_pixel.get_config(arg).model, mae_finetune.get_config(arg).model
    assert (finetuning.variant, finetuning.posemb) == (pretraining.variant, pretraining.posemb)
  assert quick.init_from == "" and quick.total_steps > 0
  for arg in ("quick", "quick,mode=probe"):
    classification.validate(mae_finetune.get_config(arg))
  with pytest.raises(ValueError, match=r"mode='linear' is not allowed.*finetune.*probe"):
    mae_finetune.get_config("mode=linear")


# ---------------------------------------------------------------- the real pipeline


@pytest.mark.slow
def test_pretrain_finetune_probe_end_to_end(mae_quick_config, mae_finetune, make_workdir):
  """The README's three commands on tiny data: MAE pre-training with the real
  trainer, then fine-tuning and a linear probe from its workdir. The probe's
  encoder is bitwise the pre-trained one; the fine-tuned one moved from it."""
  from pixel_vit.trainers import mae as mae_trainer

  mae_config = mae_quick_config()
  mae_dir = make_workdir("mae")
  mae_trainer.validate(mae_config)
  mae_state, mae_results = mae_trainer.train_and_evaluate(mae_config, mae_dir)
  assert np.isfinite(mae_results["eval/loss"])
  pretrained_encoder = numpy_tree(mae_state.params["encoder"])

  finals = {}
  for mode in ("finetune", "probe"):
    config = mae_finetune.get_config(f"quick,mode={mode},init_from={mae_dir}")
    config = set_dotted(config, TINY_RUN)
    assert config.model.posemb == mae_config.model.posemb  # follows mae_pixel.py
    classification.validate(config)
    state, results = classification.train_and_evaluate(config, make_workdir(mode))
    assert results["eval/count"] == 360
    finals[mode] = numpy_tree(state.params["encoder"])

  # (a `gap` probe has no [CLS]: the loader drops it)
  expected = {k: v for k, v in pretrained_encoder.items() if k in finals["probe"]}
  assert_trees_equal(finals["probe"], expected, "probe encoder")
  moved = max(
    np.abs(a - b).max()
    for a, b in zip(
      jax.tree.leaves(finals["finetune"]["blocks"]), jax.tree.leaves(pretrained_encoder["blocks"])
    )
  )
  assert moved > 0
