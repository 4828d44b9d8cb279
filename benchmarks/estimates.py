r"""Expected MFU of a train step on GPU and TPU: from compiled programs where a
compiler is at hand (TPU), on paper otherwise (GPU).

TPU rows (`--tpus`, needs the [tpu] extra): the real train step of each
workload (configs/cls_pixel.py or dit_pixel.py, bfloat16, `auto` attention
and remat, `--per_chip_batch` examples per chip) is compiled for a small
slice of each chip with `pixel_vit.compile`; the bound is the model FLOPs
over max(compiled matmul FLOPs / peak, estimated HBM traffic / bandwidth),
both read from the compiled program. Still an ESTIMATE (no TPU ran it),
but of the program the pod would run, padding, remat and layout included.

GPU rows: a hand roofline (no GPU compiler is installed here by default;
`pixel_vit.compile --topology=h100:8` works with jax's CUDA plugin). For each
of the paper's shapes and each backend it counts, per example and per layer,
forward + backward:

- matmul FLOPs: the model FLOPs MFU is based on (`throughput.analytic_flops`'s
  convention: 3 x forward) plus what the backend recomputes (flash backends
  run QK^T again in their backward pass);
- HBM bytes: the activations every backend moves (LayerNorm, residual, GELU,
  bias, the projections' inputs and outputs, forward and backward: counted as
  `ACTIVATION_PASSES` reads or writes of each token's width- and mlp-sized
  vectors), plus attention's own:
  * `xla` and `chunked` on an accelerator write the [heads, N, N] scores to
    HBM and read them back (logits, probabilities, their gradients:
    `SCORE_BYTES` per score in bf16 compute with float32 softmax). `chunked`
    does it a block at a time, so its memory is linear in N but its traffic
    is not: XLA does not keep a block's scores on chip between the two
    matmuls (on a CPU the block stays in cache, which is why it wins there);
  * `splash` (TPU Pallas) and `dot_product` (cuDNN flash on GPU) keep score
    tiles on chip and only stream q, k, v, the output and their gradients,
    k and v once per query block.

Step time = max(FLOPs / peak, bytes / bandwidth) (perfect overlap), so the
MFU printed is an upper bound at full matmul efficiency; real steps reach
perhaps 50-70% of it. `auto` is `attention.choose_backend` for the platform
in bfloat16.

  python -m benchmarks.estimates                      # GPU roofline + TPU compiles (~15 min)
  python -m benchmarks.estimates --tpus=               # the GPU roofline only (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks import throughput
from pixel_vit.models import attention, vit


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  platform: str  # what jax.default_backend() says there
  bf16_tflops: float  # dense matmul peak
  hbm_tb_s: float


# Published dense bf16 peaks and HBM bandwidths of the GPUs (the TPUs' are
# pixel_vit.hardware.CHIPS).
ACCELERATORS = (
  Accelerator("A100 SXM", "gpu", 312.0, 2.04),
  Accelerator("H100 SXM", "gpu", 989.0, 3.35),
)
# The TPU slices the compiled rows are compiled for (4 chips each).
TPU_SLICES = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1")


@dataclasses.dataclass(frozen=True)
class Workload:
  label: str
  variant: str
  image_size: int
  channels: int
  cls_token: bool  # DiT's blocks are counted as the encoder's (adaLN adds ~1%)
  config: str  # what pixel_vit.compile builds for the TPU rows


# The paper's shapes.
WORKLOADS = (
  Workload("CIFAR-100 ViT-Ti/2", "Ti/2", 32, 3, True, "cls_pixel.py:variant=Ti/2"),
  Workload("CIFAR-100 PiT-Ti/1", "Ti/1", 32, 3, True, "cls_pixel.py:variant=Ti/1"),
  Workload("CIFAR-100 PiT-S/1", "S/1", 32, 3, True, "cls_pixel.py:variant=S/1"),
  Workload(
    "ImageNet 28x28 PiT-B/1", "B/1", 28, 3, True, "cls_pixel.py:variant=B/1,dataset=imagenet28"
  ),
  Workload(
    "ImageNet 28x28 PiT-L/1", "L/1", 28, 3, True, "cls_pixel.py:variant=L/1,dataset=imagenet28"
  ),
  Workload("DiT latents 32x32x4 PiT-L/1", "L/1", 32, 4, False, "dit_pixel.py:variant=L/1"),
)
BACKENDS = ("xla", "chunked", "dot_product")

BF16 = 2
# Reads + writes of each token's width-sized vectors per layer, forward and
# backward (2 LayerNorms, 2 residual adds, q/k/v/out, the drop-path scales),
# and of its mlp-sized vectors (fc1 out, GELU, their gradients).
ACTIVATION_PASSES = {"width": 40, "mlp": 8}
# Bytes per score through HBM when the scores are materialised: float32
# logits written and read, bf16 probabilities written and read twice
# (AV, dV), float32 dP and dS written and read (dS twice: dQ, dK).
SCORE_BYTES = 4 + 4 + 2 + 2 + 2 + 4 + 4 + 4 + 4 + 4
FLASH_QUERY_BLOCK = 512  # k, v re-read once per query block


def per_layer(size: vit.EncoderSize, tokens: int, backend: str) -> tuple[float, float]:
  """(executed matmul FLOPs, HBM bytes) of one layer, forward + backward, one example."""
  forward = throughput.block_flops(size, tokens)
  scores = size.heads * tokens * tokens
  activation_bytes = (
    BF16
    * tokens
    * (ACTIVATION_PASSES["width"] * size.width + ACTIVATION_PASSES["mlp"] * size.mlp_dim)
  )
  if backend in ("xla", "chunked"):
    score_bytes = SCORE_BYTES * scores
    recompute = forward["attn_scores"] if backend == "chunked" else 0  # QK^T again
  else:  # on-chip tiles: q, k, v, o, dO, dq, dk, dv, with k, v per query block
    blocks = -(-tokens // FLASH_QUERY_BLOCK)
    score_bytes = BF16 * tokens * size.width * (8 + 4 * blocks)
    recompute = forward["attn_scores"]
  return 3 * sum(forward.values()) + recompute, activation_bytes + score_bytes


def estimate(
  accelerator: Accelerator,
  variant: str,
  image_size: int,
  channels: int,
  cls_token: bool,
  backend: str,
) -> dict:
  size, _ = vit.parse_variant(variant)
  flops = throughput.analytic_flops(
    variant, image_size, channels, num_classes=1000, cls_token=cls_token
  )
  executed, moved = per_layer(size, flops["tokens"], backend)
  executed, moved = executed * size.depth, moved * size.depth
  compute_s = executed / (accelerator.bf16_tflops * 1e12)
  memory_s = moved / (accelerator.hbm_tb_s * 1e12)
  step_s = max(compute_s, memory_s)
  return dict(
    mfu=flops["train"] / step_s / (accelerator.bf16_tflops * 1e12),
    bound="memory" if memory_s > compute_s else "compute",
  )


def tokens_of(workload: Workload) -> int:
  _, patch = vit.parse_variant(workload.variant)
  return (workload.image_size // patch) ** 2 + workload.cls_token


def table() -> str:
  """The GPU rows: a hand roofline per backend."""
  lines = [
    "| accelerator | workload | tokens | auto picks | "
    + " | ".join(f"{b} MFU bound" for b in BACKENDS)
    + " |",
    "|---|---|---|---|" + "---|" * len(BACKENDS),
  ]
  for acc in ACCELERATORS:
    for w in WORKLOADS:
      tokens = tokens_of(w)
      picked = attention.choose_backend(platform=acc.platform, length=tokens, dtype="bfloat16")
      cells = []
      for backend in BACKENDS:
        e = estimate(acc, w.variant, w.image_size, w.channels, w.cls_token, backend)
        mark = "**" if backend == picked else ""
        cells.append(f"{mark}{100 * e['mfu']:.0f}%{mark} ({e['bound'][0]})")
      lines.append(f"| {acc.name} | {w.label} | {tokens} | {picked} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def compiled_bound(workload: Workload, train_cost, chip, per_chip_batch: int) -> dict:
  """The MFU bound of a compiled train step (program_costs.ProgramCost, per
  chip): model FLOPs (3 x forward) over the step's time bound."""
  model = throughput.analytic_flops(
    workload.variant,
    workload.image_size,
    workload.channels,
    num_classes=1000,
    cls_token=workload.cls_token,
  )
  compute_s = train_cost.flops / chip.bf16_flops
  memory_s = train_cost.hbm_traffic_bytes / chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  return dict(
    mfu=per_chip_batch * model["train"] / step_s / chip.bf16_flops,
    bound="memory" if memory_s > compute_s else "compute",
    step_s=step_s,
  )


def compiled_table(slices, per_chip_batch: int) -> str:
  """The TPU rows: each workload's real train step compiled for each slice."""
  import jax

  from pixel_vit import command_line, hardware
  from pixel_vit import compile as compile_lib

  jax.config.update("jax_platforms", "cpu")  # compile-only devices; this host's CPU runs nothing
  lines = [
    "| TPU (compiled) | workload | tokens | auto: remat, attention | MFU bound | "
    "step bound | peak GiB / chip |",
    "|---|---|---|---|---|---|---|",
  ]
  for topology in slices:
    devices = hardware.tpu_devices(topology)
    for w in WORKLOADS:
      config = command_line.load_config(f"{throughput.REPO_ROOT}/configs/{w.config}")
      config.model.dtype = "bfloat16"
      config.batch_size = per_chip_batch * len(devices)
      report = compile_lib.compile_run(config, devices, topology=topology, programs=["train_step"])
      chosen = ", ".join(c.chose for _, c in report.choices)
      if not report.costs:
        lines.append(
          f"| {report.chip.name} | {w.label} | {tokens_of(w)} | {chosen} | refused: "
          f"{report.refusals[0].compiler_says} | | |"
        )
        continue
      cost = report.costs[0]
      e = compiled_bound(w, cost, report.chip, per_chip_batch)
      lines.append(
        f"| {report.chip.name} | {w.label} | {tokens_of(w)} | {chosen} | "
        f"{100 * e['mfu']:.0f}% ({e['bound'][0]}) | {e['step_s'] * 1e3:.3g} ms | "
        f"{cost.peak_bytes / hardware.GIB:.2f} |"
      )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.estimates", description=__doc__.split("\n")[0]
  )
  parser.add_argument(
    "--tpus",
    default=",".join(TPU_SLICES),
    help="TPU slices to compile for ('' for none; needs the [tpu] extra)",
  )
  parser.add_argument(
    "--per_chip_batch", type=int, default=32, help="examples per chip of the compiled train steps"
  )
  args = parser.parse_args(argv)
  print("GPU, a hand roofline (no GPU compiler here):\n")
  print(table())
  print(
    "\nMFU upper bound = model FLOPs / max(executed FLOPs / peak, HBM bytes / bandwidth);"
    " (c) compute-bound, (m) memory-bound; bold = what `auto` runs (bfloat16)."
  )
  slices = [s for s in args.tpus.split(",") if s]
  if slices:
    print(
      f"\nTPU, from the compiled train step (bfloat16, {args.per_chip_batch} examples per "
      "chip; an estimate: no TPU ran it):\n"
    )
    print(compiled_table(slices, args.per_chip_batch))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
