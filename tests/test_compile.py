"""Compiling for TPU slices on this CPU machine (`pixel_vit.compile`): the real
TPU compiler (libtpu, the [tpu] extra), compile-only devices, no TPU.

Each task compiles for a small slice at the paper's token count and global
batch: its train step and its evaluation or sampling step. The splash
kernel goes through Mosaic (not Pallas interpret mode) forward and backward,
ring attention compiles with a `seq` axis, a two-slice mesh puts `data`
over the data-centre network, a run too big for its slice is refused by
name with exit 1, and `attention=auto` picks splash for a TPU target while
the compiling machine is a CPU.
"""

import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if importlib.util.find_spec("libtpu") is None:
  pytest.skip(
    "needs libtpu, the TPU compiler: pip install -e '.[tpu]' (no TPU needed)",
    allow_module_level=True,
  )

from pixel_vit import compile as compile_lib  # noqa: E402
from pixel_vit import configuration, hardware, parallel, program_costs  # noqa: E402
from pixel_vit.models import attention  # noqa: E402
from pixel_vit.models.attention import ring, splash  # noqa: E402
from support import REPO_ROOT, load_config_module, set_dotted  # noqa: E402

pytestmark = pytest.mark.tpu_compile


def compile_config(
  config_file: str, arg: str, topology: str, *, num_slices: int = 1, programs=None, **overrides
) -> compile_lib.Report:
  config = load_config_module(REPO_ROOT / "configs" / config_file).get_config(arg)
  set_dotted(config, overrides)
  devices = hardware.tpu_devices(topology, num_slices)
  return compile_lib.compile_run(
    config,
    devices,
    config_name=f"{config_file}:{arg}",
    topology=topology,
    num_slices=num_slices,
    programs=programs,
  )


def chose(report, setting):
  return {choice.chose for _, choice in report.choices if choice.setting == setting}


def assert_fits(report, programs):
  assert {c.name for c in report.costs} == set(programs), report.refusals
  assert report.fits, compile_lib.format_report(report)
  for cost in report.costs:
    assert 0 < cost.peak_bytes <= report.chip.usable_hbm_bytes
    assert cost.flops > 0 and cost.hbm_traffic_bytes > 0


# ---------------------------------------------------------------- topologies


def test_topology_names_and_slices():
  assert hardware.canonical_topology("v5p-32") == "v5p:2x2x4"
  assert hardware.canonical_topology("v5litepod-16") == "v5e:4x4"
  assert hardware.slice_name("v4:2x2x1") == "v4-8"  # v4 and v5p count TensorCores
  assert hardware.slice_name("v6e:2x4") == "v6e-8"
  with pytest.raises(hardware.TopologyError, match="GENERATION:SHAPE"):
    hardware.canonical_topology("v9:2x2")
  with pytest.raises(hardware.TopologyError, match="2 axes"):
    hardware.canonical_topology("v5e:2x2x1")


@pytest.mark.parametrize(
  "topology, devices, kind",
  [
    ("v5e:2x4", 8, "TPU v5 lite"),
    ("v5p:2x2x2", 8, "TPU v5"),
    ("v4:2x2x1", 4, "TPU v4"),  # megacore: one device per chip, as on a pod
    ("v6e:2x2", 4, "TPU v6 lite"),
  ],
)
def test_compile_only_devices_per_chip(topology, devices, kind):
  found = hardware.tpu_devices(topology)
  assert len(found) == devices and {d.device_kind for d in found} == {kind}
  target = hardware.Target.of(found)
  assert target.platform == "tpu" and target.memory_bytes == target.chip.usable_hbm_bytes
  # The mesh builder lays every chip out (v4 used to fail here: megacore).
  mesh = parallel.make_mesh(configuration.mesh_config(), found)
  assert mesh.shape["data"] == devices


def test_auto_attention_picks_splash_for_a_tpu_target_on_a_cpu_machine():
  assert jax.default_backend() == "cpu"
  devices = hardware.tpu_devices("v5e:2x2")
  mesh = parallel.make_mesh(configuration.mesh_config(), devices)
  q = jax.ShapeDtypeStruct((4, 1025, 3, 64), jnp.bfloat16)
  with hardware.recording_choices() as made, parallel.activate(mesh, configuration.SHARDING_RULES):
    jaxpr = jax.make_jaxpr(attention.auto_attention)(q, q, q)
  assert [c.chose for c in made] == ["splash"], made
  kernels = [e for e in jaxpr.jaxpr.eqns if "pallas" in str(e)]
  assert kernels and "interpret=False" in str(kernels[0]).replace(" ", "")
  # The same call for this machine's own CPU devices runs a CPU backend.
  with hardware.recording_choices() as made:
    jax.make_jaxpr(attention.auto_attention)(q, q, q)
  assert [c.chose for c in made] == ["chunked"]


# ---------------------------------------------------------------- kernels


def _compile_attention(fn, mesh, rules, shape, dtype=jnp.bfloat16):
  """fn's forward and backward (grad of a sum), compiled for the mesh."""
  sharding = parallel.batch_sharding(mesh, rules, 4)
  x = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  def loss(q, k, v):
    return fn(q, k, v).astype(jnp.float32).sum()

  with parallel.activate(mesh, rules):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()


@pytest.mark.parametrize("length", [1025, 257, 4096])
def test_splash_compiles_through_mosaic_forward_and_backward(length):
  devices = hardware.tpu_devices("v5e:2x2")
  mesh = parallel.make_mesh(configuration.mesh_config(), devices)
  compiled = _compile_attention(
    splash.splash_attention, mesh, configuration.SHARDING_RULES, (4, length, 3, 64)
  )
  text = compiled.as_text()
  # Mosaic kernels (not the interpret-mode emulation): forward, dK/dV and dQ.
  for kernel in ("splash_mha_fwd", "splash_mha_dkv", "splash_mha_dq"):
    assert kernel in text, f"no {kernel} kernel in the compiled program"
  assert 'custom_call_target="tpu_custom_call"' in text


def test_ring_attention_compiles_with_a_seq_axis():
  devices = hardware.tpu_devices("v5e:2x2")
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, seq=4, tensor=1), devices)
  assert mesh.shape["seq"] == 4
  compiled = _compile_attention(
    ring.ring_attention, mesh, configuration.SHARDING_RULES, (2, 1024, 3, 64)
  )
  traffic = program_costs.hlo_traffic(compiled.as_text())
  permutes = {c.kind: c for c in traffic.collectives}.get("collective-permute")
  # k and v travel the ring: 3 hops forward, and back again in the backward pass.
  assert permutes is not None and permutes.count >= 3, traffic.collectives


# ---------------------------------------------------------------- the tasks, at paper size


def test_classification_compiles_for_a_v5e_slice():
  # PiT-Ti/1 on CIFAR-100 (1,025 tokens, global batch 1,024), the paper's recipe.
  report = compile_config("cls_pixel.py", "variant=Ti/1", "v5e:2x2")
  assert_fits(report, ["train_step", "eval_step"])
  assert chose(report, "model.attention=auto") == {"splash"}
  assert report.mesh["data"] == 4 and report.total_steps == 2400 * (50_000 // 1024)
  train = {c.name: c for c in report.costs}["train_step"]
  # Gradients are summed over the data axis; matmul FLOPs are about 3x the
  # forward pass (more with remat), per device.
  assert "all-reduce" in {c.kind for c in train.collectives}
  forward = 1024 / 4 * 20.57e9
  assert 3 * forward < train.flops < 5.5 * forward
  assert report.step_estimate()["chip_hours"] > 0


def test_mae_pretraining_and_fine_tuning_compile_for_a_v5e_slice():
  # MAE PiT-Ti/1 at batch 1,024 on 4 v5e chips. remat=auto chose `dots` for
  # the encoder here while it left out splash's residuals (a log-sum-exp
  # over 128 float32 lanes per head, at the padded length), and the compiler
  # refused the program (18.9 GiB); counted, auto keeps `full` and it fits.
  pretrain = compile_config("mae_pixel.py", "variant=Ti/1", "v5e:2x2")
  assert_fits(pretrain, ["train_step", "eval_step", "reconstruct"])
  assert chose(pretrain, "model.remat=auto") == {"full"}
  finetune = compile_config(
    "mae_finetune.py", "variant=Ti/1,init_from=/nowhere/mae_Ti1", "v5e:2x2", programs=["train_step"]
  )
  assert_fits(finetune, ["train_step"])


def test_dit_compiles_for_a_v5p_slice():
  # PiT-L/1 on 32x32x4 latents (1,024 tokens, batch 256) and its 250-step sampler.
  report = compile_config("dit_pixel.py", "variant=L/1", "v5p:2x2x1")
  assert_fits(report, ["train_step", "eval_step", "sample"])
  sample = {c.name: c for c in report.costs}["sample"]
  train = {c.name: c for c in report.costs}["train_step"]
  # 250 denoising steps of a guided (doubled) batch of 256: the sampler's loop
  # is counted per iteration.
  assert sample.flops > 10 * train.flops / 3


# ---------------------------------------------------------------- slices and refusals


def test_two_slices_put_data_over_the_data_centre_network():
  devices = hardware.tpu_devices("v5e:2x2", num_slices=2)
  assert {d.slice_index for d in devices} == {0, 1}
  config = load_config_module(REPO_ROOT / "configs" / "cls_pixel.py").get_config("quick")
  mesh = parallel.make_mesh(config.mesh, devices)
  grid = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  # data is split slices x chips: each slice holds half of the data axis.
  assert mesh.shape["data"] == 8 and sorted(np.unique(grid[:4])) == [0]
  assert sorted(np.unique(grid[4:])) == [1]
  report = compile_config("cls_pixel.py", "quick", "v5e:2x2", num_slices=2, programs=["train_step"])
  assert_fits(report, ["train_step"])
  assert "all-reduce" in {c.kind for c in report.costs[0].collectives}


def _command(*args):
  return subprocess.run(
    [sys.executable, "-m", "pixel_vit.compile", *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_a_run_that_cannot_fit_is_refused_by_name():
  # 16,384 eval images of 1,025 tokens with xla attention: the scores alone
  # are ~48 GiB per v5e chip.
  result = _command(
    "--config=configs/cls_pixel.py:variant=Ti/1",
    "--topology=v5e:2x2",
    "--programs=eval_step",
    "--config.eval_batch_size=16384",
    "--config.model.attention=xla",
  )
  assert result.returncode == 1, result.stderr[-2000:]
  error = result.stderr.split("\nerror: ")[-1]
  assert "eval_step does not fit a v5e chip" in error and "GiB" in error
  assert "exceeds available HBM" in error
  for knob in (
    "config.eval_batch_size=16384",
    "config.model.remat",
    "config.mesh.fsdp",
    "config.model.attention",
  ):
    assert knob in error
  assert "| eval_step | refused by the compiler" in result.stdout


def test_an_unknown_topology_and_a_missing_libtpu_get_one_line_each():
  result = _command("--config=configs/cls_pixel.py:quick", "--topology=v5e:3x3")
  assert result.returncode == 1
  assert "error: libtpu does not know the topology v5e:3x3" in result.stderr
  assert "Traceback" not in result.stderr
  # No libtpu: JAX finds no TPU library.
  hidden = subprocess.run(
    [
      sys.executable,
      "-c",
      "import jax._src.xla_bridge as xb; "
      "xb.get_tpu_library_path = lambda: None; "
      "from pixel_vit import hardware; hardware.tpu_devices('v5e:2x2')",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert (
    "compiling for TPU needs libtpu, which is not installed: pip install -e '.[tpu]'"
    in hardware_error(hidden.stderr)
  )


def hardware_error(stderr: str) -> str:
  return stderr.strip().splitlines()[-1]
