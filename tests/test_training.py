"""The classification trainer end to end on digits, with 8 fake CPU devices
(the default mesh, data=-1, is then 8-way data parallel): learning, workdir
artifacts, exact resume, exact evaluation counts, device-count invariance."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixel_vit import configuration, parallel
from pixel_vit import optimizer as optimizer_lib
from pixel_vit.data import pipeline, sources
from pixel_vit.evaluation import accuracy
from pixel_vit.trainers import classification, loop
from pixel_vit.trainers import state as state_lib
from support import (
  TINY_RUN,
  as_numpy_leaves,
  assert_trees_equal,
  read_metrics,
  set_dotted,
  train_losses,
)

DIGITS_TEST_EXAMPLES = 360


# ---------------------------------------------------------------- a short run learns


@pytest.fixture(scope="module")
def learning_run(cls_pixel, tmp_path_factory):
  """40 steps on digits, evaluated with a batch (16) that does not divide the
  360 test examples.

  Patch 4 (mu/4, 4 tokens per 8x8 digit), not pixels: mu/1 sits on the
  uniform-loss plateau (~2.30) for its first ~50-60 steps at any learning
  rate we tried before it starts to fall, which would make this test slow
  or flaky. mu/4 falls from 2.30 to ~1.3 in 40 steps.
  """
  config = set_dotted(
    cls_pixel.get_config("variant=mu/4,quick"),
    {
      **TINY_RUN,
      "total_steps": 40,
      "batch_size": 64,
      "eval_batch_size": 16,
      "optimizer.lr": 2e-3,
      "optimizer.warmup_steps": 3,
      "log_every": 4,
      "eval_every": 20,
      "checkpoint_every": 20,
    },
  )
  classification.validate(config)
  workdir = str(tmp_path_factory.mktemp("learning") / "workdir")
  state, results = classification.train_and_evaluate(config, workdir)
  return config, workdir, state, results


@pytest.mark.slow
def test_training_loss_falls(learning_run):
  _, workdir, state, results = learning_run
  losses = train_losses(workdir)
  steps = sorted(losses)
  assert steps[0] == 4 and steps[-1] == 40, steps
  first, last = losses[steps[0]], losses[steps[-1]]
  assert np.isfinite(list(losses.values())).all()
  assert first > 2.0  # ~log(10): the zero-initialised head starts uniform
  assert last < 0.75 * first, losses
  assert losses[steps[-1]] < losses[steps[len(steps) // 2]] < first, losses
  assert int(jax.device_get(state.step)) == 40
  # And it generalises a bit: far above the 10% of chance on held-out digits.
  assert results["eval/top1"] > 0.3, results


@pytest.mark.slow
def test_workdir_artifacts(learning_run):
  config, workdir, _, _ = learning_run
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["total_steps"] == 40 and saved["model"]["variant"] == config.model.variant
  assert saved["optimizer"]["lr"] == pytest.approx(config.optimizer.lr)
  assert saved["data"]["source"] == "digits"
  records = read_metrics(workdir)
  assert all("step" in r for r in records)
  eval_steps = [r["step"] for r in records if "eval/top1" in r]
  assert eval_steps == [20, 40]
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  checkpoints = sorted(
    int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()
  )
  assert 20 in checkpoints and 40 in checkpoints, checkpoints
  assert len(checkpoints) <= config.keep_checkpoints


@pytest.mark.slow
@pytest.mark.parametrize(
  "first_step,steps", [(3, 2), (5, 4)], ids=["inside_the_run", "past_its_end"]
)
def test_profile_trace_is_written(quick_config, workdir, first_step, steps):
  """config.profile records a jax.profiler trace into the workdir, also when
  the run ends before the trace's last step (written at close)."""
  config = quick_config({"profile.steps": steps, "profile.first_step": first_step})
  classification.train_and_evaluate(config, workdir)
  traces = glob.glob(os.path.join(workdir, "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces


def test_profile_window_starts_and_stops_the_trace_once(monkeypatch, tmp_path):
  from pixel_vit.trainers import reporting

  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda logdir: calls.append(("start", logdir)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  window = reporting.ProfileWindow(str(tmp_path), first_step=3, steps=2)
  for step in range(1, 9):
    window(step)
    if step == 3:
      assert calls == [("start", str(tmp_path))]
    if step == 4:
      assert len(calls) == 1  # steps 3 and 4 are traced
  assert calls == [("start", str(tmp_path)), ("stop",)]
  window.close()  # already stopped: nothing more
  assert len(calls) == 2
  ended_inside = reporting.ProfileWindow(str(tmp_path), first_step=2, steps=10)
  for step in (1, 2, 3):
    ended_inside(step)
  ended_inside.close()  # the run ended inside the window: written now
  assert calls[2:] == [("start", str(tmp_path)), ("stop",)]


@pytest.mark.slow
def test_no_profile_by_default(quick_config, workdir):
  config = quick_config()
  assert config.profile.steps == 0
  classification.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "plugins"))


@pytest.mark.slow
def test_trainer_eval_counts_every_example_once(learning_run):
  config, workdir, _, results = learning_run
  assert config.eval_batch_size == 16 and DIGITS_TEST_EXAMPLES % 16 != 0
  assert results["eval/count"] == DIGITS_TEST_EXAMPLES
  for record in read_metrics(workdir):
    if "eval/count" in record:
      assert record["eval/count"] == DIGITS_TEST_EXAMPLES, record
      assert 0.0 <= record["eval/top1"] <= record["eval/top5"] <= 1.0


# ---------------------------------------------------------------- exact resume


@pytest.mark.slow
@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["no_ema", "ema"])
def test_resume_is_exact(quick_config, make_workdir, ema_decay):
  """Run A goes 0 -> 6 uninterrupted. Run B starts in a fresh workdir holding
  only A's step-3 checkpoint (what an interruption after step 3 leaves), and
  goes 3 -> 6 with the same config (so the same schedule). Everything in the
  state must match bitwise: same programs, same inputs, float32 on CPU."""
  config = quick_config(
    {
      "keep_checkpoints": 10,
      "optimizer.ema_decay": ema_decay,
      # Randomness and schedule that a wrong resume would get wrong:
      "model.drop_path": 0.1,
      "augment.crop": True,
      "augment.flip": True,
      "augment.label_smoothing": 0.1,
    }
  )
  classification.validate(config)
  run_a, run_b = make_workdir("a"), make_workdir("b")
  state_a, _ = classification.train_and_evaluate(config, run_a)
  assert sorted(int(d) for d in os.listdir(os.path.join(run_a, "checkpoints")) if d.isdigit())[
    -2:
  ] == [3, 6]

  os.makedirs(os.path.join(run_b, "checkpoints"))
  shutil.copytree(os.path.join(run_a, "checkpoints", "3"), os.path.join(run_b, "checkpoints", "3"))
  state_b, _ = classification.train_and_evaluate(config, run_b)

  # B really resumed: it logged no training before step 4.
  losses_a, losses_b = train_losses(run_a), train_losses(run_b)
  assert min(losses_b) == 4 and 2 in losses_a
  assert losses_b[6] == losses_a[6]  # both the mean over steps 5 and 6

  assert int(jax.device_get(state_b.step)) == int(jax.device_get(state_a.step)) == 6
  assert (state_a.ema_params is None) == (ema_decay == 0.0)
  assert_trees_equal(state_b.params, state_a.params, "params")
  assert_trees_equal(state_b.opt_state, state_a.opt_state, "opt_state")
  assert_trees_equal(state_b.ema_params, state_a.ema_params, "ema_params")
  assert_trees_equal(state_b.rng, state_a.rng, "rng")
  if ema_decay:  # the EMA really moved: it is neither the initial nor the current params
    initial = nnx.to_pure_dict(
      nnx.split(classification.make_model_fn(config, loop.load_splits(config)[0])())[1]
    )
    for other, what in ((initial, "initial"), (state_a.params, "current")):
      diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(as_numpy_leaves(other), as_numpy_leaves(state_a.ema_params))
      )
      assert diff > 1e-6, f"EMA equals the {what} parameters"


# ---------------------------------------------------------------- evaluation


def test_evaluate_counts_37_examples_once_on_8_devices(cls_pixel):
  """37 examples in batches of 8 over 8 devices: 5 batches, the last padded
  with 3 masked examples that would count as correct if the mask were ignored."""
  num_classes, n = 5, 37
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  split = sources.ImageSplit(
    images=images,
    labels=labels,
    num_classes=num_classes,
    total_examples=n,
    process_index=0,
    process_count=1,
  )
  weights = rng.normal(size=(16, num_classes)).astype(np.float32) / 255.0
  bias = np.array([0.3, 0, 0, 0, 0], np.float32)  # a blank (padding) image predicts 0

  def numpy_logits(x):
    return x.reshape(len(x), -1).astype(np.float32) @ weights + bias

  mesh = parallel.make_mesh(cls_pixel.get_config("quick").mesh)
  assert mesh.devices.size == 8
  rules = configuration.SHARDING_RULES

  @jax.jit
  def sums(batch):
    x = batch["images"].reshape(batch["images"].shape[0], -1).astype(jnp.float32)
    return accuracy.masked_sums(x @ weights + bias, batch["labels"], batch["mask"])

  local_batches = list(pipeline.eval_batches(split, local_batch_size=8))
  assert len(local_batches) == 5 and local_batches[-1]["mask"].sum() == n - 4 * 8
  global_batches = [parallel.host_to_global(b, mesh, rules) for b in local_batches]
  assert len(global_batches[0]["images"].sharding.device_set) == 8
  metrics = accuracy.evaluate(sums, iter(global_batches))

  logits = numpy_logits(images)
  assert numpy_logits(np.zeros((1, 4, 4, 1), np.uint8)).argmax() == 0
  top5 = np.argsort(-logits, axis=1)[:, :5]
  log_probs = (
    logits
    - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    - logits.max(1, keepdims=True)
  )
  assert metrics["count"] == n
  assert metrics["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1e-9)
  assert metrics["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)), abs=1e-9)
  assert metrics["loss"] == pytest.approx(-np.mean(log_probs[np.arange(n), labels]), rel=1e-5)
  assert 0 < metrics["top1"] < 1


# ---------------------------------------------------------------- device-count invariance


def run_train_steps(config, devices, steps: int):
  """What the trainer builds, on a mesh over `devices`: `steps` train steps."""
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  rules = config.sharding_rules
  train_split, _ = loop.load_splits(config)
  make_model = classification.make_model_fn(config, train_split)
  abstract_params = nnx.to_pure_dict(nnx.split(nnx.eval_shape(make_model))[1])
  total_steps, warmup_steps = loop.schedule_steps(
    config, pipeline.steps_per_epoch(train_split, config.batch_size)
  )
  schedule = optimizer_lib.make_schedule(config.optimizer, total_steps, warmup_steps)
  tx = optimizer_lib.make_optimizer(config.optimizer, schedule, abstract_params)
  described, create_state = state_lib.sharded_state(
    make_model, tx, mesh=mesh, rules=rules, seed=config.seed, ema=config.optimizer.ema_decay > 0
  )
  state = create_state()
  batch_shardings = {
    name: parallel.batch_sharding(mesh, rules, ndim)
    for name, ndim in (("images", 4), ("labels", 1))
  }
  with parallel.activate(mesh, rules):
    train_step = jax.jit(
      classification.make_train_step(
        config, described.graphdef, tx, schedule, train_split.num_classes
      ),
      in_shardings=(described.shardings, batch_shardings),
      out_shardings=(described.shardings, parallel.replicated(mesh)),
    )
    batches = pipeline.train_batches(
      train_split, local_batch_size=config.batch_size, seed=config.seed
    )
    losses = []
    for _ in range(steps):
      state, metrics = train_step(state, parallel.host_to_global(next(batches), mesh, rules))
      losses.append(float(metrics["train/loss"]))
  assert all(len(x.sharding.device_set) == len(devices) for x in jax.tree.leaves(state))
  return jax.device_get(state), losses, mesh


@pytest.mark.slow
def test_one_device_and_eight_devices_train_the_same(quick_config):
  config = quick_config(
    {
      "optimizer.ema_decay": 0.9,
      "model.drop_path": 0.1,
      "augment.crop": True,
      "augment.flip": True,
      "augment.mixup_alpha": 0.8,
      "augment.cutmix_alpha": 1.0,
    }
  )
  assert config.mesh.data == -1
  classification.validate(config)
  # The lr warms up from 0 and the head starts at 0: the third step is the
  # first whose loss depends on earlier updates.
  state1, losses1, mesh1 = run_train_steps(config, jax.devices()[:1], steps=3)
  state8, losses8, mesh8 = run_train_steps(config, jax.devices(), steps=3)
  assert dict(mesh1.shape)["data"] == 1 and dict(mesh8.shape)["data"] == 8
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  assert losses1[2] != losses1[0]
  # Different reduction orders: equal to float32 rounding, not bitwise.
  for what in ("params", "ema_params"):
    for a, b in zip(as_numpy_leaves(getattr(state8, what)), as_numpy_leaves(getattr(state1, what))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=what)
  initial = nnx.to_pure_dict(
    nnx.split(classification.make_model_fn(config, loop.load_splits(config)[0])())[1]
  )
  moved = max(
    float(np.abs(a - b).max())
    for a, b in zip(as_numpy_leaves(state1.params), as_numpy_leaves(initial))
  )
  assert moved > 1e-4  # the steps changed the parameters
