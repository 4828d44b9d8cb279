"""Every task trains the same on any mesh layout: one device vs data=8, fsdp=8,
data=2 x fsdp=2 x tensor=2 and data=2 x seq=4 (ring attention) over the 8
fake CPU devices give the same loss and updated parameters, the parameters
really are sharded as the rules say, and with `seq` every attention really
runs on a quarter of the sequence per device."""

import copy

import jax
import numpy as np
import pytest

from pixel_vit.models.attention import ring as ring_attention
from pixel_vit.trainers import classification, diffusion, mae
from support import (
  DIT_PIXEL_PATH,
  MAE_TINY_RUN,
  REPO_ROOT,
  TINY_RUN,
  as_numpy_leaves,
  load_config_module,
  read_metrics,
  record_first_shapes,
  set_dotted,
)

pytestmark = pytest.mark.slow  # every test runs the real trainers, one per task and layout

LAYOUTS = {
  "data8": dict(data=8, fsdp=1, seq=1, tensor=1),
  "fsdp8": dict(data=1, fsdp=8, seq=1, tensor=1),
  "data2_fsdp2_tensor2": dict(data=2, fsdp=2, seq=1, tensor=2),
  "data2_seq4": dict(data=2, fsdp=1, seq=4, tensor=1),
}
# Config overrides a layout needs: splitting `seq` is tested with `ring` named
# explicitly (`auto` would pick it too); the one-device reference runs `auto`,
# which is `xla` at these lengths.
LAYOUT_OVERRIDES = {"data2_seq4": {"model.attention": "ring"}}
# Per task, the (padded) token counts of its attentions: classification quick
# (gap pooling) and DiT see 8x8 = 64 pixel tokens; the MAE encoder sees the
# 32 visible + [CLS] = 33 (padded to 36 for seq=4), its decoder 64 + [CLS].
ATTENTION_LENGTHS = {"classification": {64}, "mae": {36, 68}, "diffusion": {64}}
ONE_DEVICE = dict(data=1, fsdp=1, seq=1, tensor=1)

# Three steps: the lr warms up from 0 and a classifier's head starts at 0, so
# the third step is the first whose loss depends on an earlier update.
STEPS = {
  "total_steps": 3,
  "log_every": 1,
  "eval_every": 3,
  "checkpoint_every": 3,
  "optimizer.warmup_steps": 1,
}


def config_for(task: str):
  if task == "classification":
    config = load_config_module(REPO_ROOT / "configs" / "cls_pixel.py").get_config("quick")
    set_dotted(config, copy.deepcopy(TINY_RUN))
    set_dotted(config, {"eval_batch_size": 40})
    return config, classification
  if task == "mae":
    config = load_config_module(REPO_ROOT / "configs" / "mae_pixel.py").get_config("quick")
    set_dotted(config, copy.deepcopy(MAE_TINY_RUN))
    return config, mae
  config = load_config_module(DIT_PIXEL_PATH).get_config("quick")
  set_dotted(
    config,
    {
      "batch_size": 32,
      "eval_batch_size": 40,
      "sample.steps": "2",
      "sample.grid_columns": 1,
      "fid.batch_size": 40,
    },
  )
  return config, diffusion


def run(task: str, mesh: dict, devices, workdir: str, overrides: dict | None = None):
  config, trainer = config_for(task)
  set_dotted(config, dict(STEPS))
  set_dotted(config, dict(overrides or {}))
  config.mesh.update(mesh)
  state, _ = trainer.train_and_evaluate(config, workdir, devices=devices)
  losses = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
  return state, losses


def spec_of(array):
  return tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))


@pytest.fixture(scope="module")
def one_device_runs(tmp_path_factory):
  return {
    task: run(
      task, ONE_DEVICE, jax.devices()[:1], str(tmp_path_factory.mktemp(f"{task}_1dev") / "run")
    )
    for task in ("classification", "mae", "diffusion")
  }


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("task", ["classification", "mae", "diffusion"])
def test_layout_trains_like_one_device(task, layout, one_device_runs, make_workdir, monkeypatch):
  state1, losses1 = one_device_runs[task]
  # The q block shape each device's ring body sees while tracing.
  ring_blocks = record_first_shapes(monkeypatch, ring_attention, "_ring_body")
  state, losses = run(
    task,
    LAYOUTS[layout],
    jax.devices(),
    make_workdir(f"{task}_{layout}"),
    LAYOUT_OVERRIDES.get(layout),
  )
  assert len(losses) == len(losses1) == 3
  np.testing.assert_allclose(losses, losses1, rtol=2e-5, err_msg=f"{task} {layout}")
  assert losses1[0] != losses1[2]
  # Adam moves every parameter by ~lr per step whatever its gradient's size, so
  # a near-zero gradient's rounding can flip an update: compare with an
  # absolute tolerance well below one update (lr ~ 1e-4..1e-3).
  for a, b in zip(as_numpy_leaves(state.params), as_numpy_leaves(state1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{task} {layout}")

  # The shardings follow the rules (embed -> fsdp, mlp / heads -> tensor).
  mesh = dict(LAYOUTS[layout])
  blocks = (
    state.params["encoder"]["blocks"]["layers"]
    if task != "diffusion"
    else state.params["blocks"]["layers"]
  )
  fc1 = blocks["mlp"]["fc1_kernel"]  # (layers, embed, mlp)
  qkv = blocks["attn"]["qkv_kernel"]  # (layers, embed, 3, heads, kv)
  assert spec_of(fc1) == (None, "fsdp", "tensor"), (task, layout, fc1.sharding.spec)
  assert spec_of(qkv) == (None, "fsdp", None, "tensor", None), (task, layout, qkv.sharding.spec)
  # ... and the shards really are that size on this mesh.
  shard = fc1.addressable_shards[0].data.shape
  assert shard == (fc1.shape[0], fc1.shape[1] // mesh["fsdp"], fc1.shape[2] // mesh["tensor"])
  assert qkv.addressable_shards[0].data.shape[3] == qkv.shape[3] // mesh["tensor"]
  # Optimizer moments are sharded like their parameters.
  moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", None) == fc1.shape]
  assert moments and all(m.sharding.spec == fc1.sharding.spec for m in moments)

  # With `seq`, every attention (train, eval, sampling) ran as a ring over
  # contiguous quarter-length blocks; without it there was no ring.
  if mesh["seq"] == 1:
    assert not ring_blocks
  else:
    assert {shape[1] * mesh["seq"] for shape in ring_blocks} == ATTENTION_LENGTHS[task], (
      task,
      layout,
      ring_blocks,
    )
