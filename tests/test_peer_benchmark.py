"""benchmarks/peer.py: the PyTorch ViT is pixel_vit's model, and the script runs.

Skipped without torch (the `parity` extra), except the test that the
benchmark says how to get it and exits 0.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import peer, throughput

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pixel_vit_params(variant, image_size, channels, num_classes, pool):
  from flax import nnx

  from pixel_vit.models import vit

  config = throughput._load_config(os.path.join(REPO_ROOT, "configs", "cls_pixel.py"))
  config.model.variant = variant
  config.model.pool = pool
  model = nnx.eval_shape(
    lambda: vit.build_classifier(
      config.model,
      image_size=image_size,
      channels=channels,
      num_classes=num_classes,
      rngs=nnx.Rngs(0),
      pixel_stats=(config.augment.mean, config.augment.std),
    )
  )
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.torch
@pytest.mark.parametrize("variant,pool", [("mu/2", "cls"), ("mu/1", "gap"), ("Ti/4", "cls")])
def test_torch_vit_has_pixel_vits_parameters_and_matmuls(variant, pool):
  torch = pytest.importorskip("torch", reason="the parity extra (pip install torch==2.13.0)")
  from torch.utils.flop_counter import FlopCounterMode

  size, channels, classes = 8, 3, 10
  model = peer.torch_vit(
    variant, image_size=size, channels=channels, num_classes=classes, pool=pool, drop_path=0.1
  )
  assert sum(p.numel() for p in model.parameters()) == _pixel_vit_params(
    variant, size, channels, classes, pool
  )
  # Every Linear's FLOPs as analytic_flops counts them (FlopCounterMode does
  # not count the CPU flash-attention kernel, so the two attention matmuls
  # are left out of the comparison).
  model.eval()
  with FlopCounterMode(display=False) as counter:
    model(torch.zeros(2, size, size, channels))
  flops = throughput.analytic_flops(variant, size, channels, classes, cls_token=pool == "cls")
  parts = flops["parts"]
  assert counter.get_total_flops() / 2 == (
    flops["forward"] - parts["attn_scores"] - parts["attn_weighted_sum"]
  )


def test_without_torch_says_how_to_get_it_and_exits_0(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  assert peer.main(["--variant=mu/4", "--image_size=8", "--batch=8", "--steps=1"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and "pip install torch==2.13.0" in out[0] and "parity" in out[0]


@pytest.mark.torch
@pytest.mark.slow  # ~60 s on the loaded 2-core machine: imports, one compile, two steps
def test_runs_end_to_end(tmp_path):
  pytest.importorskip("torch", reason="the parity extra (pip install torch==2.13.0)")
  out = tmp_path / "peer.json"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.peer",
      "--variant=mu/4",
      "--image_size=8",
      "--batch=8",
      "--steps=1",
      "--rounds=1",
      "--warmup=0",
      "--matmul_size=128",
      "--matmul_repeats=1",
      "--scan=false",
      "--remat=none",
      f"--json_out={out}",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| mu/4 | float32 | 5 | 8 |" in proc.stdout
  (result,) = json.loads(out.read_text())["results"]
  assert "error" not in result, result
  pixel_vit, torch_side = result["sides"]
  assert (pixel_vit["name"], torch_side["name"]) == ("pixel_vit", "torch")
  assert result["ratio"] == pytest.approx(torch_side["step_s"] / pixel_vit["step_s"])
  assert 0 < pixel_vit["peak_fraction"] and 0 < torch_side["peak_fraction"]
