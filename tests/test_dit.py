"""The DiT model (adaLN-Zero, conditioning, backends, scan), the diffusion
trainer (exact resume with EMA, sample grids, the sample command), latent
datasets and the diffusion config's validation."""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixel_vit import sample as sample_lib
from pixel_vit.data import sources
from pixel_vit.diffusion import sampling
from pixel_vit.evaluation import sample_quality
from pixel_vit.models import dit, vit
from pixel_vit.trainers import diffusion as diffusion_trainer
from pixel_vit.trainers import loop
from support import (
  CLS_PIXEL_PATH,
  DIT_PIXEL_PATH,
  DIT_TINY_RUN,
  assert_trees_equal,
  load_config_module,
  read_metrics,
  set_dotted,
  snapshot,
  train_losses,
)


@pytest.fixture(scope="module")
def dit_pixel():
  return load_config_module(DIT_PIXEL_PATH)


def tiny_config(dit_pixel, overrides=None, arg="quick"):
  config = dit_pixel.get_config(arg)
  set_dotted(config, copy.deepcopy(DIT_TINY_RUN))
  return set_dotted(config, overrides or {})


def small_dit(**kwargs) -> dit.DiT:
  options = dict(
    size=vit.SIZES["mu"], patch=1, image_size=8, channels=1, num_classes=10, rngs=nnx.Rngs(0)
  )
  options.update(kwargs)
  return dit.DiT(**options)


def randomize(model: nnx.Module, seed: int = 1) -> nnx.Module:
  """Every parameter replaced by noise, so zero-initialised gates are open."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def inputs(batch=4, size=8, channels=1, seed=0):
  key = jax.random.PRNGKey(seed)
  x = jax.random.normal(key, (batch, size, size, channels))
  t = jnp.arange(batch, dtype=jnp.int32) * 237 % 1000
  labels = jnp.arange(batch, dtype=jnp.int32) % 10
  return x, t, labels


# ---------------------------------------------------------------- model


def test_adaln_zero_blocks_are_identity_maps_and_output_is_zero():
  model = small_dit()
  x, t, labels = inputs()
  tokens = model.tokenize(x)
  cond = model.condition(t, labels)
  assert float(jnp.abs(cond).max()) > 0  # the conditioning itself is not zero
  np.testing.assert_array_equal(model.blocks(tokens, cond=cond), tokens)
  np.testing.assert_array_equal(model(x, t, labels), jnp.zeros((4, 8, 8, 2)))
  # Not an artefact of the test: opened gates change the tokens.
  opened = randomize(model)
  assert float(jnp.abs(opened.blocks(tokens, cond=cond) - tokens).max()) > 1e-3


@pytest.mark.parametrize(
  "patch,size,channels,learn_sigma", [(1, 8, 1, True), (2, 8, 4, True), (1, 4, 4, False)]
)
def test_output_shape_follows_patch_channels_and_learned_sigma(patch, size, channels, learn_sigma):
  model = randomize(
    small_dit(patch=patch, image_size=size, channels=channels, learn_sigma=learn_sigma)
  )
  x, t, labels = inputs(size=size, channels=channels)
  out = model(x, t, labels)
  assert out.shape == (4, size, size, channels * (2 if learn_sigma else 1))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_timestep_and_label_both_condition_the_output():
  model = randomize(small_dit())
  x, t, labels = inputs()
  base = model(x, t, labels)
  assert float(jnp.abs(model(x, t + 1, labels) - base).max()) > 1e-4
  assert float(jnp.abs(model(x, t, (labels + 1) % 10) - base).max()) > 1e-4


def test_timestep_features_are_cos_then_sin_of_geometric_frequencies():
  t = jnp.array([0.0, 3.0, 999.0])
  features = np.asarray(dit.timestep_features(t, 8))
  freqs = np.exp(-np.log(10_000.0) * np.arange(4) / 4)
  want = np.concatenate([np.cos(np.outer(t, freqs)), np.sin(np.outer(t, freqs))], axis=1)
  np.testing.assert_allclose(features, want, rtol=1e-5, atol=1e-5)


def test_label_dropout_uses_the_null_class():
  model = randomize(small_dit(class_dropout=0.999))
  x, t, labels = inputs()
  null = jnp.full_like(labels, model.null_label)
  dropped = model(x, t, labels, key=jax.random.PRNGKey(3))
  np.testing.assert_allclose(dropped, model(x, t, null), rtol=1e-6, atol=1e-6)
  # Without a key (evaluation, sampling) nothing is dropped.
  assert float(jnp.abs(model(x, t, labels) - model(x, t, null)).max()) > 1e-4


def test_scan_unrolled_remat_and_attention_backends_agree():
  x, t, labels = inputs()
  reference = randomize(small_dit(scan=True))
  ref_out = reference(x, t, labels)
  _, ref_state = nnx.split(reference)

  def loss(model):
    return jnp.sum(model(x, t, labels) ** 2)

  ref_grads = nnx.grad(loss)(reference)
  for options in (
    dict(scan=False),
    dict(scan=True, remat="full"),
    dict(scan=False, attention="dot_product"),
  ):
    other = small_dit(**options)
    graphdef, _ = nnx.split(other)
    other = nnx.merge(graphdef, ref_state)
    np.testing.assert_allclose(
      other(x, t, labels), ref_out, rtol=1e-5, atol=1e-5, err_msg=str(options)
    )
    grads = nnx.grad(loss)(other)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=str(options))


def test_guidance_scale_one_is_the_conditional_dit():
  model = randomize(small_dit())
  x, t, labels = inputs()
  fn = lambda x, t, y: model(x, t, y)
  guided = sampling.guided(fn, cfg_scale=1.0, null_label=model.null_label, channels=1)
  np.testing.assert_array_equal(guided(x, t, labels), model(x, t, labels))
  strong = sampling.guided(fn, cfg_scale=3.0, null_label=model.null_label, channels=1)
  cond = model(x, t, labels)
  uncond = model(x, t, jnp.full_like(labels, model.null_label))
  want_eps = uncond[..., :1] + 3.0 * (cond[..., :1] - uncond[..., :1])
  np.testing.assert_allclose(strong(x, t, labels)[..., :1], want_eps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(strong(x, t, labels)[..., 1:], cond[..., 1:], rtol=1e-5, atol=1e-6)


def test_dit_parameters_carry_logical_axes():
  model = small_dit()
  blocks = model.blocks.layers
  assert blocks.modulation.kernel.get_metadata("logical_axes") == ("layers", "embed", None, None)
  assert model.class_table.get_metadata("logical_axes") == (None, "embed")


# ---------------------------------------------------------------- latent data


def write_latents(path, n=40, size=4, channels=4, seed=0):
  rng = np.random.default_rng(seed)
  latents = rng.normal(size=(n, size, size, channels)).astype(np.float32)
  labels = (np.arange(n) % 3).astype(np.int32)
  np.savez(
    path,
    latents=latents,
    labels=labels,
    latent_scale=np.float32(0.18215),
    vae_weights="random.safetensors",
  )
  return latents, labels


def test_latent_npz_reads_as_float_split(tmp_path):
  latents, labels = write_latents(tmp_path / "lat_train.npz")
  write_latents(tmp_path / "lat_test.npz", n=12, seed=1)
  source = sources.parse_source(f"npz:{tmp_path}/lat_{{split}}.npz")
  split = source.load("train")
  assert split.is_latent and split.images.dtype == np.float32
  np.testing.assert_array_equal(split.images, latents)
  np.testing.assert_array_equal(split.labels, labels)
  with pytest.raises(ValueError, match="cannot be resized.*encode_latents"):
    source.load("train", image_size=8)


@pytest.mark.parametrize("dtype, value", [(np.float32, np.nan), (np.float16, np.inf)])
def test_non_finite_latents_are_refused_when_read_naming_file_split_count_and_index(
  tmp_path, dtype, value
):
  """A NaN in either split would train on silently (eval/loss=nan, exit 0)
  or look like a divergence at step 1: it is bad data, found when read."""
  write_latents(tmp_path / "lat_train.npz")
  latents, labels = write_latents(tmp_path / "lat_test.npz", n=12, seed=1)
  latents = latents.astype(dtype)
  latents[7, 0, 1, 2] = value
  latents[9, 3, 3, 0] = value
  np.savez(
    tmp_path / "lat_test.npz", latents=latents, labels=labels, latent_scale=np.float32(0.18215)
  )
  source = sources.parse_source(f"npz:{tmp_path}/lat_{{split}}.npz")
  assert source.load("train").images.shape[0] == 40  # the other split is fine
  with pytest.raises(
    ValueError,
    match=r"lat_test\.npz \(split 'test'\): 2 of 12 latents hold "
    r"NaN or Inf \(2 values; the first is example 7\)",
  ):
    source.load("test")


def test_float_images_are_not_taken_for_latents(tmp_path):
  np.savez(
    tmp_path / "f.npz", images=np.zeros((4, 8, 8, 1), np.float32), labels=np.zeros(4, np.int32)
  )
  with pytest.raises(ValueError, match="expected uint8"):
    sources.parse_source(f"npz:{tmp_path}/f.npz").load("train")


def test_classifier_refuses_latent_data(tmp_path, dit_pixel):
  write_latents(tmp_path / "lat_train.npz")
  write_latents(tmp_path / "lat_test.npz", n=12, seed=1)
  cls = load_config_module(CLS_PIXEL_PATH).get_config("quick")
  cls.data.source = f"npz:{tmp_path}/lat_{{split}}.npz"
  with pytest.raises(ValueError, match="holds VAE latents, which only the diffusion task"):
    loop.load_splits(cls)


@pytest.mark.slow
def test_diffusion_trains_on_latents_and_decodes_grids_with_the_vae(
  tmp_path, dit_pixel, make_workdir
):
  """A latent dataset trains like any source; with VAE weights the grid shows
  decoded images (2x the latent size here), exactly the VAE's decoding."""
  from safetensors.numpy import save_file

  from pixel_vit.models import vae

  codec = vae.AutoencoderKL(
    vae.VaeConfig(block_out_channels=(32, 32), layers_per_block=1), rngs=nnx.Rngs(0)
  )
  weights = str(tmp_path / "vae.safetensors")
  save_file({k: np.asarray(v) for k, v in vae.diffusers_state_dict(codec).items()}, weights)
  write_latents(tmp_path / "lat_train.npz", n=64)
  write_latents(tmp_path / "lat_test.npz", n=16, seed=1)
  config = tiny_config(
    dit_pixel,
    {
      "data.source": f"npz:{tmp_path}/lat_{{split}}.npz",
      "eval_batch_size": 16,
      "total_steps": 3,
      "vae.weights": weights,
    },
  )
  diffusion_trainer.validate(config)
  workdir = make_workdir("latent_run")
  state, results = diffusion_trainer.train_and_evaluate(config, workdir)
  assert np.isfinite(results["eval/loss"])
  from PIL import Image

  grid = np.asarray(Image.open(os.path.join(workdir, "pictures", "samples_0000003.png")))
  # 3 classes x 2 columns of 8x8 RGB decodings, enlarged 8x, 2-pixel separators.
  assert grid.shape == (3 * 64 + 2 * 2, 2 * 64 + 2, 3)
  assert np.asarray(grid).std() > 0

  plan = loop.plan(config, diffusion_trainer.make_model_fn)
  run = loop.start(config, workdir, plan, read_only=True)
  generator = diffusion_trainer.run_generator(run, cfg_scale=1.0)
  latents = generator._sample(run.state.ema_params, jnp.zeros(8, jnp.int32), jax.random.PRNGKey(0))
  run.checkpointer.close()
  assert latents.shape == (8, 4, 4, 4)
  np.testing.assert_allclose(
    generator.decode(latents), codec.decode_latents(latents), rtol=1e-5, atol=1e-5
  )


# ---------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def learning_run(dit_pixel, tmp_path_factory):
  """40 steps of the quick config (tiny batches): loss falls; checkpoints at 20, 40."""
  config = tiny_config(
    dit_pixel,
    {
      "total_steps": 40,
      "eval_every": 20,
      "checkpoint_every": 20,
      "log_every": 5,
      "optimizer.warmup_steps": 5,
    },
  )
  diffusion_trainer.validate(config)
  workdir = str(tmp_path_factory.mktemp("dit") / "run")
  state, results = diffusion_trainer.train_and_evaluate(config, workdir)
  return config, workdir, state, results


@pytest.mark.slow
def test_loss_falls_and_grids_are_written(learning_run):
  _, workdir, state, results = learning_run
  losses = train_losses(workdir)
  assert np.mean([losses[s] for s in (35, 40)]) < 0.7 * np.mean([losses[s] for s in (5, 10)])
  evals = [r for r in read_metrics(workdir) if "eval/loss" in r]
  assert [r["step"] for r in evals] == [20, 40]
  for step in (20, 40):
    path = os.path.join(workdir, "pictures", f"samples_{step:07d}.png")
    assert os.path.isfile(path)
  assert state.ema_params is not None


@pytest.mark.slow
def test_grid_uses_fixed_noise_and_labels(learning_run):
  """The same parameters give the same grid: comparable across steps."""
  config, workdir, state, _ = learning_run
  plan = loop.plan(config, diffusion_trainer.make_model_fn)
  run = loop.start(config, workdir, plan, read_only=True)
  generator = diffusion_trainer.run_generator(run, cfg_scale=config.sample.grid_cfg_scale)
  first = sample_quality.sample_grid(config, generator, run.state.ema_params)
  second = sample_quality.sample_grid(config, generator, run.state.ema_params)
  run.checkpointer.close()
  np.testing.assert_array_equal(first, second)
  from PIL import Image

  saved = np.asarray(Image.open(os.path.join(workdir, "pictures", "samples_0000040.png")))
  np.testing.assert_array_equal(first, saved)


@pytest.mark.slow
def test_resume_is_exact_including_ema(learning_run, make_workdir):
  config, run_a, state_a, results_a = learning_run
  run_b = make_workdir("resumed")
  os.makedirs(os.path.join(run_b, "checkpoints"))
  shutil.copytree(
    os.path.join(run_a, "checkpoints", "20"), os.path.join(run_b, "checkpoints", "20")
  )
  state_b, results_b = diffusion_trainer.train_and_evaluate(config, run_b)
  losses_a, losses_b = train_losses(run_a), train_losses(run_b)
  assert min(losses_b) == 25
  assert {s: losses_a[s] for s in losses_b} == losses_b
  for what in ("params", "opt_state", "ema_params", "rng", "step"):
    assert_trees_equal(getattr(state_b, what), getattr(state_a, what), what)
  assert results_b["eval/loss"] == results_a["eval/loss"]
  from PIL import Image

  grid = lambda d: np.asarray(Image.open(os.path.join(d, "pictures", "samples_0000040.png")))
  np.testing.assert_array_equal(grid(run_b), grid(run_a))


@pytest.mark.slow
def test_resume_with_another_model_is_refused(learning_run):
  config, workdir, _, _ = learning_run
  before = snapshot(workdir)
  other = set_dotted(config.copy_and_resolve_references(), {"model.learn_sigma": False})
  with pytest.raises(ValueError, match="learn_sigma: checkpoint True vs config False"):
    diffusion_trainer.train_and_evaluate(other, workdir)
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_sample_command_writes_adm_npz_grid_and_json(learning_run, tmp_path):
  config, workdir, _, _ = learning_run
  out = str(tmp_path / "samples" / "s")
  with open(os.path.join(workdir, "config.json")) as f:
    trained_with = f.read()
  sampling = set_dotted(config.copy_and_resolve_references(), {"sample.cfg_scale": 2.5})
  metrics = sample_lib.sample_and_evaluate(sampling, workdir, num_samples=50, out=out)
  with open(os.path.join(workdir, "config.json")) as f:  # the training record is kept
    assert f.read() == trained_with
  with open(out + ".config.json") as f:  # the sampling config sits beside its output
    assert json.load(f)["sample"]["cfg_scale"] == 2.5
  assert metrics == {}  # no feature extractor configured
  with np.load(out + ".npz") as data:
    assert data["arr_0"].shape == (50, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(data["arr_1"], np.arange(50) % 10)
  assert os.path.isfile(out + ".png")
  with open(out + ".json") as f:
    assert json.load(f)["num_samples"] == 50


@pytest.mark.slow
def test_sample_command_writes_a_picture_for_a_few_samples(learning_run, tmp_path):
  config, workdir, _, _ = learning_run
  out = str(tmp_path / "few")
  sample_lib.sample_and_evaluate(config, workdir, num_samples=3, out=out)
  from PIL import Image

  assert Image.open(out + ".png").size[0] > 0


def test_sample_command_needs_a_checkpoint(dit_pixel, make_workdir):
  config = tiny_config(dit_pixel)
  with pytest.raises(ValueError, match="holds no checkpoint to sample from"):
    sample_lib.sample_and_evaluate(config, make_workdir("empty"), num_samples=4)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"sample.sampler": "euler"}, r"config.sample.sampler='euler' is not allowed"),
    ({"sample.steps": "ddim999"}, r"config.sample.steps: .*ddim999"),
    ({"diffusion.schedule": "quadratic"}, r"config.diffusion.schedule"),
    ({"model.posemb": "none"}, r"config.model.posemb='none'"),
    ({"model.class_dropout": 0.0}, r"guidance scales > 1 need a model trained with"),
    ({"fid.num_samples": 100}, r"config.fid.num_samples=100 needs config.fid.features"),
    ({"fid.features": "classifier:/nonexistent/cls"}, r"holds no classifier checkpoint"),
    ({"fid.features": "clip:/x"}, r"config.fid.features='clip:/x' must be"),
    ({"fid.features": "inception:/nonexistent.pth"}, r"no weights file at"),
    ({"vae.weights": "/nonexistent.safetensors"}, r"config.vae.weights=.* does not exist"),
    ({"fid.batch_size": 12}, r"config.fid.batch_size=12 must be divisible by the 8"),
  ],
)
def test_bad_diffusion_config_is_rejected_before_compiling(dit_pixel, overrides, match, no_jit):
  config = tiny_config(dit_pixel, overrides)
  with pytest.raises(ValueError, match=match):
    diffusion_trainer.validate(config)


def test_paper_config_names_the_latent_tool_offline(dit_pixel, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = dit_pixel.get_config()
  assert (config.model.variant, config.batch_size, config.optimizer.ema_decay) == (
    "L/1",
    256,
    0.9999,
  )
  assert dit_pixel.get_config("variant=L/2").model.variant == "L/2"
  with pytest.raises(ValueError, match="encode_latents"):
    diffusion_trainer.validate(config)


def test_quick_config_validates(dit_pixel):
  config = dit_pixel.get_config("quick")
  diffusion_trainer.validate(config)
  assert config.data.source == "digits" and config.model.variant == "mu/1"


@pytest.mark.slow
def test_training_evaluation_reports_sample_metrics_with_the_own_classifier(
  dit_pixel, quick_config, make_workdir
):
  """classifier=DIR: every evaluation generates samples and scores them with the
  project's classifier; sample accuracy is a fraction of the generated count."""
  from pixel_vit.trainers import classification

  cls_config = quick_config()
  cls_dir = make_workdir("classifier")
  classification.train_and_evaluate(cls_config, cls_dir)
  config = tiny_config(
    dit_pixel,
    {"total_steps": 3, "fid.num_samples": 48, "fid.reference_examples": 200},
    arg=f"quick,classifier={cls_dir}",
  )
  diffusion_trainer.validate(config)
  _, results = diffusion_trainer.train_and_evaluate(config, make_workdir("dit"))
  assert results["samples/count"] == 48
  assert np.isfinite(results["samples/fid"]) and results["samples/fid"] > 0
  assert 0.0 <= results["samples/accuracy"] <= 1.0
  assert results["samples/accuracy"] * 48 == pytest.approx(round(results["samples/accuracy"] * 48))
  for key in ("samples/inception_score", "samples/precision", "samples/recall"):
    assert key in results
