"""The latent codec: Flax AutoencoderKL == diffusers' on the same weights (small and SD
KL-f8 configs, current and legacy attention names), loader errors, posterior
sampling, and the dataset encoding tool (`pixel_vit.encode_latents`).

Tests that compare with diffusers skip without torch / diffusers (the [parity] extra); the loader
error and tool tests write their checkpoints with the torch-free exporter
`vae.diffusers_state_dict` (whose mapping the diffusers tests prove).
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from safetensors import numpy as safetensors_numpy

from pixel_vit import encode_latents
from pixel_vit.data import sources
from pixel_vit.models import vae as vae_lib

TOLERANCE = 1e-4  # max abs error vs diffusers, float32
PARITY = (
  "needs {} for the diffusers reference: install the [parity] extra: "
  "pip install torch==2.13.0 (CPU wheel) diffusers"
)
SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
SD_KL_F8 = dict(
  block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4
)
# The tool tests' VAE: 4 levels (downsampling 8, as SD) but 8-16 channels wide.
TINY = vae_lib.VaeConfig(
  block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=0.5
)
# Where the downsampling factor does not matter: 2 levels compile twice as fast.
TWO_LEVELS = vae_lib.VaeConfig(
  block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=0.25
)


@nnx.jit
def _encode(model, images):
  return model.encode(images)


@nnx.jit
def _encode_to_latents(model, images, key=None):
  return model.encode_to_latents(images, key=key)


@nnx.jit
def _encode_decode(model, images, latents):
  mean, logvar = model.encode(images)
  return dict(mean=mean, logvar=logvar, decoded=model.decode(latents))


@nnx.jit
def _codec(model, images, latents):
  """Every codec output in one compile: encode, decode, and the scaled [0, 1] path."""
  mean, logvar = model.encode(images)
  return dict(
    mean=mean,
    logvar=logvar,
    decoded=model.decode(latents),
    scaled=model.encode_to_latents(images),
    decoded_01=model.decode_latents(latents * model.config.scaling_factor),
  )


def random_vae(config: vae_lib.VaeConfig, seed: int = 0) -> vae_lib.AutoencoderKL:
  """A VAE with random numpy weights (GroupNorm scales and biases too), built
  without running JAX's initialisers eagerly (slow: one compile per shape)."""
  abstract = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(0, fan_in**-0.5, leaf.shape).astype(np.float32)
    base = 1.0 if name == "scale" else 0.0
    return (base + rng.normal(0, 0.2, leaf.shape)).astype(np.float32)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def to_nhwc(tensor) -> np.ndarray:
  return tensor.detach().permute(0, 2, 3, 1).numpy()


def max_error(actual, desired) -> float:
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.shape == desired.shape, (actual.shape, desired.shape)
  return float(np.abs(actual - desired).max())


def diffusers_vae(config: dict, seed: int = 0):
  """A diffusers AutoencoderKL with random weights, GroupNorms included (their
  default ones / zeros would hide a scale / bias mix-up)."""
  torch = pytest.importorskip("torch", reason=PARITY.format("torch"))
  diffusers = pytest.importorskip("diffusers", reason=PARITY.format("diffusers"))
  levels = len(config["block_out_channels"])
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * levels,
    up_block_types=("UpDecoderBlock2D",) * levels,
    **config,
  )
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "norm" in name:
        base = 1.0 if name.endswith("weight") else 0.0
        parameter.copy_(base + 0.3 * torch.randn_like(parameter))
  return model.eval()


def torch_state_dict(model) -> dict:
  return {key: value.detach().contiguous() for key, value in model.state_dict().items()}


def compare_with_diffusers(
  reference,
  model: vae_lib.AutoencoderKL,
  *,
  batch: int,
  height: int,
  width: int,
  seed: int = 1,
  scaled_path: bool = True,
) -> None:
  """Encoder mean/logvar and decoder output agree, and (with `scaled_path`)
  encode_to_latents / decode_latents agree with the scaled [0, 1] codec."""
  torch = pytest.importorskip("torch", reason=PARITY.format("torch"))
  generator = torch.Generator().manual_seed(seed)
  images = torch.rand(batch, 3, height, width, generator=generator) * 2 - 1
  with torch.no_grad():
    posterior = reference.encode(images).latent_dist
    decoded = reference.decode(posterior.mean).sample
    scale = reference.config.scaling_factor
    decoded_01 = ((decoded + 1) / 2).clamp(0, 1)
  latents = to_nhwc(posterior.mean)
  codec = _codec if scaled_path else _encode_decode
  outputs = codec(model, jnp.asarray(to_nhwc(images)), jnp.asarray(latents))
  assert np.abs(latents).max() > 0.1  # a non-trivial comparison
  assert max_error(outputs["mean"], latents) < TOLERANCE
  assert max_error(outputs["logvar"], to_nhwc(posterior.logvar)) < TOLERANCE
  assert max_error(outputs["decoded"], to_nhwc(decoded)) < TOLERANCE
  if scaled_path:
    assert max_error(outputs["scaled"], latents * scale) < TOLERANCE
    assert max_error(outputs["decoded_01"], to_nhwc(decoded_01)) < TOLERANCE


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
  """(diffusers model with the SMALL config, its save_pretrained directory)."""
  reference = diffusers_vae(SMALL)
  directory = tmp_path_factory.mktemp("small_vae")
  reference.save_pretrained(directory)
  assert (directory / vae_lib.WEIGHTS_FILENAME).is_file()
  return reference, directory


def save_tiny_vae(directory, config: vae_lib.VaeConfig = TINY, seed: int = 0):
  """A random Flax VAE saved (torch-free) as a diffusers model directory; returns it."""
  model = random_vae(config, seed)
  os.makedirs(directory, exist_ok=True)
  safetensors_numpy.save_file(
    vae_lib.diffusers_state_dict(model), os.path.join(directory, vae_lib.WEIGHTS_FILENAME)
  )
  diffusers_config = {
    "_class_name": "AutoencoderKL",
    **{k: v for k, v in vars(config).items() if k not in ("use_quant_conv", "use_post_quant_conv")},
  }
  with open(os.path.join(directory, vae_lib.CONFIG_FILENAME), "w") as f:
    json.dump(diffusers_config, f)
  return model


# ---------------------------------------------------------------- equivalence with diffusers


@pytest.mark.torch
def test_small_config_matches_diffusers(small_reference):
  reference, directory = small_reference
  model = vae_lib.load_vae(str(directory))  # directory: config.json gives norm_num_groups=8
  assert model.config == vae_lib.VaeConfig(**SMALL)
  # Non-square, so height and width cannot be swapped unnoticed.
  compare_with_diffusers(reference, model, batch=2, height=16, width=24)


@pytest.mark.torch
def test_sd_kl_f8_config_matches_diffusers(tmp_path):
  """The real SD layout (4 levels, 2 resnets, 32 groups, shortcut convs) loads from
  a bare safetensors file: the architecture comes from the tensor shapes."""
  safetensors_torch = pytest.importorskip("safetensors.torch", reason=PARITY.format("torch"))
  reference = diffusers_vae(SD_KL_F8, seed=2)
  path = tmp_path / "sd_vae.safetensors"
  safetensors_torch.save_file(torch_state_dict(reference), str(path))
  model = vae_lib.load_vae(str(path))
  assert model.config == vae_lib.VaeConfig()
  compare_with_diffusers(reference, model, batch=1, height=16, width=24, scaled_path=False)


@pytest.mark.torch
def test_legacy_attention_names_load_the_same(small_reference, tmp_path):
  """query/key/value/proj_attn (linear, or 1x1 conv [O, I, 1, 1]) == to_q/to_k/to_v/to_out.0."""
  _, directory = small_reference
  current = safetensors_numpy.load_file(str(directory / vae_lib.WEIGHTS_FILENAME))
  legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for key, value in current.items():
    for new, old in legacy_names.items():
      if f".attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        if key.startswith("decoder") and value.ndim == 2:  # as 1x1 conv kernels
          value = value[:, :, None, None]
    legacy[key] = value
  assert sum(".query." in key for key in legacy) == 4  # weight and bias, encoder and decoder
  legacy_dir = tmp_path / "legacy"
  legacy_dir.mkdir()
  safetensors_numpy.save_file(legacy, str(legacy_dir / vae_lib.WEIGHTS_FILENAME))
  (legacy_dir / vae_lib.CONFIG_FILENAME).write_text(
    (directory / vae_lib.CONFIG_FILENAME).read_text()
  )

  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  latents = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  current_outputs, legacy_outputs = (
    _codec(vae_lib.load_vae(str(path)), images, latents) for path in (directory, legacy_dir)
  )
  for name, value in current_outputs.items():
    np.testing.assert_array_equal(np.asarray(legacy_outputs[name]), np.asarray(value), err_msg=name)


# ---------------------------------------------------------------- loader (torch-free)


def test_export_then_load_is_exact(tmp_path):
  model = save_tiny_vae(tmp_path / "vae")
  loaded = vae_lib.load_vae(str(tmp_path / "vae"))
  assert loaded.config == TINY
  expected = nnx.to_flat_state(nnx.state(model, nnx.Param))
  actual = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  assert len(actual) == len(expected)
  for path, variable in expected:
    np.testing.assert_array_equal(
      np.asarray(actual[path].get_value()), np.asarray(variable.get_value()), err_msg=str(path)
    )


def test_diffusers_key_names():
  assert (
    vae_lib.diffusers_key(("encoder", "down_blocks", 0, "downsampler", "conv", "kernel"))
    == "encoder.down_blocks.0.downsamplers.0.conv.weight"
  )
  assert (
    vae_lib.diffusers_key(("decoder", "mid_block", "attentions", 0, "to_out", "bias"))
    == "decoder.mid_block.attentions.0.to_out.0.bias"
  )
  assert (
    vae_lib.diffusers_key(("encoder", "conv_norm_out", "scale")) == "encoder.conv_norm_out.weight"
  )


@pytest.fixture
def tiny_tensors(tmp_path):
  save_tiny_vae(tmp_path / "vae")
  return safetensors_numpy.load_file(str(tmp_path / "vae" / vae_lib.WEIGHTS_FILENAME))


def write_weights(tmp_path, tensors) -> str:
  """`tensors` as a diffusers directory with TINY's config.json; returns the directory."""
  directory = tmp_path / "edited"
  directory.mkdir()
  safetensors_numpy.save_file(tensors, str(directory / vae_lib.WEIGHTS_FILENAME))
  (directory / vae_lib.CONFIG_FILENAME).write_text(
    (tmp_path / "vae" / vae_lib.CONFIG_FILENAME).read_text()
  )
  return str(directory)


def test_missing_key_is_named(tmp_path, tiny_tensors):
  del tiny_tensors["decoder.up_blocks.1.resnets.0.conv2.bias"]
  with pytest.raises(
    ValueError,
    match=r"1 missing: decoder\.up_blocks\.1\.resnets\.0"
    r"\.conv2\.bias.*diffusion_pytorch_model\.safetensors",
  ):
    vae_lib.load_vae(write_weights(tmp_path, tiny_tensors))


def test_wrong_shape_is_named(tmp_path, tiny_tensors):
  tiny_tensors["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
  # A legacy-named tensor is reported under the name the file uses.
  del tiny_tensors["decoder.mid_block.attentions.0.to_q.weight"]
  tiny_tensors["decoder.mid_block.attentions.0.query.weight"] = np.zeros((16, 8), np.float32)
  with pytest.raises(
    ValueError,
    match=r"2 with the wrong shape: decoder\.mid_block\."
    r"attentions\.0\.query\.weight \(16, 8\) \(expected "
    r"\(16, 16\)\), encoder\.conv_in\.weight "
    r"\(8, 3, 5, 5\) \(expected \(8, 3, 3, 3\)\)",
  ):
    vae_lib.load_vae(write_weights(tmp_path, tiny_tensors))


def test_unexpected_key_is_named(tmp_path, tiny_tensors):
  tiny_tensors["encoder.mid_block.resnets.2.conv1.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError, match=r"1 unexpected: encoder\.mid_block\.resnets\.2"):
    vae_lib.load_vae(write_weights(tmp_path, tiny_tensors))


def test_bad_paths_and_files(tmp_path):
  with pytest.raises(ValueError, match="do not exist.*diffusers AutoencoderKL"):
    vae_lib.load_vae(str(tmp_path / "nowhere.safetensors"))
  with pytest.raises(ValueError, match="has no diffusion_pytorch_model.safetensors"):
    vae_lib.load_vae(str(tmp_path))
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="cannot read .*garbage.safetensors"):
    vae_lib.load_vae(str(garbage))
  other = tmp_path / "other.safetensors"
  safetensors_numpy.save_file({"unet.conv_in.weight": np.zeros((1,), np.float32)}, str(other))
  with pytest.raises(ValueError, match="not an AutoencoderKL state dict"):
    vae_lib.load_vae(str(other))


def test_unsupported_diffusers_config_is_rejected():
  with pytest.raises(ValueError, match="act_fn"):
    vae_lib.VaeConfig.from_diffusers_config({"act_fn": "gelu"})
  with pytest.raises(ValueError, match="does not divide"):
    vae_lib.VaeConfig(block_out_channels=(48, 64), norm_num_groups=32)
  config = vae_lib.VaeConfig.from_diffusers_config(
    {
      "block_out_channels": [32, 64],
      "norm_num_groups": 8,
      "shift_factor": None,
      "scaling_factor": 0.13025,
      "sample_size": 1024,
    }
  )
  assert config.block_out_channels == (32, 64) and config.scaling_factor == 0.13025
  assert config.shift_factor == 0.0 and config.layers_per_block == 2


# ---------------------------------------------------------------- codec API


@nnx.jit
def _sampling_outputs(model, images, key, keys):
  mean, logvar = model.encode(images)
  return dict(
    mean=mean,
    logvar=logvar,
    sample=model.encode_to_latents(images, key),
    batched=model.encode_to_latents(images, keys),
    decoded=model.decode(mean),
    decoded_01=model.decode_latents(mean * model.config.scaling_factor),
  )


def test_posterior_samples_and_scaling():
  """A sample is (mean + std * N(0,1) from the key) * scale; with one key per image,
  each image's noise comes from its own key alone; decode_latents undoes the scale."""
  model = random_vae(TWO_LEVELS, seed=3)
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1)
  key = jax.random.key(7)
  keys = jax.random.split(key, 4)
  out = {k: np.asarray(v) for k, v in _sampling_outputs(model, images, key, keys).items()}
  noise = np.asarray(jax.random.normal(key, out["mean"].shape))
  expected = (out["mean"] + np.exp(0.5 * out["logvar"]) * noise) * TWO_LEVELS.scaling_factor
  np.testing.assert_allclose(out["sample"], expected, rtol=1e-5, atol=1e-6)
  assert max_error(out["sample"], out["mean"] * TWO_LEVELS.scaling_factor) > 1e-3
  per_image_noise = np.stack([np.asarray(jax.random.normal(k, noise.shape[1:])) for k in keys])
  expected = (
    out["mean"] + np.exp(0.5 * out["logvar"]) * per_image_noise
  ) * TWO_LEVELS.scaling_factor
  np.testing.assert_allclose(out["batched"], expected, rtol=1e-5, atol=1e-6)

  reference = np.clip((out["decoded"] + 1) / 2, 0, 1)
  np.testing.assert_allclose(out["decoded_01"], reference, rtol=1e-5, atol=1e-6)
  assert out["decoded_01"].shape == (4, 16, 16, 3)
  assert 0 < (out["decoded_01"] == 0).mean() + (out["decoded_01"] == 1).mean() < 1


def test_bad_image_shapes_are_rejected():
  model = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(TINY, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="multiple of 8"):
    model.encode(jnp.zeros((1, 12, 16, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    model.encode(jnp.zeros((1, 16, 16, 1)))


# ---------------------------------------------------------------- encode_latents tool


def run_tool(**flag_values):
  """`python -m pixel_vit.encode_latents --flag=value ...`, in-process: the
  command line is parsed as absl would, then every flag is reset."""
  argv = ["encode_latents"] + [f"--{name}={value}" for name, value in flag_values.items()]
  try:
    encode_latents.main(flags.FLAGS(argv))
  finally:
    flags.FLAGS.unparse_flags()


def digits_as_model_input(split: str) -> tuple[np.ndarray, np.ndarray]:
  data = sources.parse_source("digits").load(split, image_size=16)
  images = data.images.astype(np.float32) / 127.5 - 1.0
  return np.repeat(images, 3, axis=-1), data.labels


@pytest.mark.slow
def test_tool_writes_the_latents_of_every_split(tmp_path):
  model = save_tiny_vae(tmp_path / "vae")
  out = tmp_path / "latents" / "digits_{split}.npz"  # the directory does not exist yet
  # 1437 / 360 examples: the last batch of 64 is padded in both splits.
  run_tool(
    vae=tmp_path / "vae",
    source="digits",
    splits="train,test",
    image_size=16,
    batch_size=64,
    out=out,
  )
  inputs = {split: digits_as_model_input(split) for split in ("train", "test")}
  all_images = np.concatenate([images for images, _ in inputs.values()])
  all_expected = np.asarray(_encode_to_latents(model, jnp.asarray(all_images)))
  expected = dict(zip(inputs, np.split(all_expected, [len(inputs["train"][0])])))
  for split, (images, labels) in inputs.items():
    with np.load(str(out).replace("{split}", split), allow_pickle=False) as data:
      arrays = {key: data[key] for key in data.files}
    assert sorted(arrays) == ["labels", "latent_scale", "latents", "vae_weights"]
    assert arrays["latents"].dtype == np.float32
    assert arrays["latents"].shape == (len(images), 2, 2, TINY.latent_channels)
    np.testing.assert_allclose(arrays["latents"], expected[split], rtol=1e-5, atol=1e-5)
    assert arrays["labels"].dtype == np.int32
    np.testing.assert_array_equal(arrays["labels"], labels)
    assert arrays["latent_scale"].dtype == np.float32 and arrays["latent_scale"].shape == ()
    assert arrays["latent_scale"] == np.float32(TINY.scaling_factor)  # from config.json
    assert str(arrays["vae_weights"]) == vae_lib.WEIGHTS_FILENAME


@pytest.mark.slow
def test_tool_samples_the_posterior_with_a_fixed_seed(tmp_path):
  model = save_tiny_vae(tmp_path / "vae", TWO_LEVELS)
  weights = tmp_path / "vae" / vae_lib.WEIGHTS_FILENAME  # the file form of --vae
  out = tmp_path / "sampled.npz"
  run_tool(
    vae=weights,
    source="digits",
    splits="test",
    image_size=16,
    batch_size=64,
    out=out,
    sample="true",
    seed=5,
  )
  images, _ = digits_as_model_input("test")
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(len(images)))
  expected = _encode_to_latents(model, jnp.asarray(images), keys)
  with np.load(out) as data:  # a tool that ignored --sample would store the mean instead
    np.testing.assert_allclose(data["latents"], np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(image_size=12), r"--image_size=12 must be a positive multiple of 8"),
    (dict(splits="train,test", out="latents.npz"), r"has no '\{split\}'.*latents_\{split\}"),
    (dict(vae="missing_dir"), r"--vae='.*missing_dir' does not exist"),
    (dict(batch_size=12), r"--batch_size=12 must be a positive multiple of the 8 local"),
    (dict(splits="train,train"), r"distinct"),
  ],
)
def test_tool_rejects_bad_flags_before_compiling(tmp_path, capsys, no_jit, overrides, message):
  save_tiny_vae(tmp_path / "vae")
  flag_values = dict(
    vae=tmp_path / "vae",
    source="digits",
    splits="test",
    image_size=16,
    batch_size=64,
    out=tmp_path / "out_{split}.npz",
  )
  flag_values.update(overrides)
  if "vae" in overrides:
    flag_values["vae"] = tmp_path / overrides["vae"]
  with pytest.raises(SystemExit) as stopped:  # the command's one-message exit (no --traceback)
    run_tool(**flag_values)
  assert stopped.value.code == 1
  assert re.search(message, capsys.readouterr().err), message
  assert not list(tmp_path.glob("out_*"))


def test_tool_rejects_image_channels_the_vae_cannot_take(tmp_path, no_jit):
  save_tiny_vae(
    tmp_path / "vae",
    vae_lib.VaeConfig(
      in_channels=2, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4
    ),
  )
  with pytest.raises(ValueError, match="1 channels but the VAE takes 2"):
    encode_latents.encode_dataset(
      vae_path=str(tmp_path / "vae"),
      source="digits",
      splits=["test"],
      out=str(tmp_path / "x.npz"),
      image_size=16,
      batch_size=64,
    )
