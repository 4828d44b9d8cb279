r"""On paper, for GPU and TPU: expected MFU of a train step per attention backend.

An ESTIMATE from FLOP and byte counts (a roofline), not a measurement: this
machine has no accelerator. For each of the paper's shapes and each backend
it counts, per example and per layer, forward + backward:

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

  python -m benchmarks.estimates            # the README's table
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


# Published dense bf16 peaks and HBM bandwidths.
ACCELERATORS = (
    Accelerator("A100 SXM", "gpu", 312.0, 2.04),
    Accelerator("H100 SXM", "gpu", 989.0, 3.35),
    Accelerator("TPU v4", "tpu", 275.0, 1.2),
    Accelerator("TPU v5e", "tpu", 197.0, 0.82),
    Accelerator("TPU v5p", "tpu", 459.0, 2.76),
)

# (label, variant, image size, channels, [CLS] token): the paper's shapes.
# DiT's blocks are counted as the encoder's (its adaLN modulation adds ~1%).
WORKLOADS = (
    ("CIFAR-100 ViT-Ti/2", "Ti/2", 32, 3, True),
    ("CIFAR-100 PiT-Ti/1", "Ti/1", 32, 3, True),
    ("CIFAR-100 PiT-S/1", "S/1", 32, 3, True),
    ("ImageNet 28x28 PiT-B/1", "B/1", 28, 3, True),
    ("ImageNet 28x28 PiT-L/1", "L/1", 28, 3, True),
    ("DiT latents 32x32x4 PiT-L/1", "L/1", 32, 4, False),
)
BACKENDS = ("xla", "chunked", "dot_product", "splash")
ON_PLATFORM = {"gpu": ("xla", "chunked", "dot_product"), "tpu": ("xla", "chunked", "splash")}

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
  activation_bytes = BF16 * tokens * (ACTIVATION_PASSES["width"] * size.width
                                      + ACTIVATION_PASSES["mlp"] * size.mlp_dim)
  if backend in ("xla", "chunked"):
    score_bytes = SCORE_BYTES * scores
    recompute = forward["attn_scores"] if backend == "chunked" else 0  # QK^T again
  else:  # on-chip tiles: q, k, v, o, dO, dq, dk, dv, with k, v per query block
    blocks = -(-tokens // FLASH_QUERY_BLOCK)
    score_bytes = BF16 * tokens * size.width * (8 + 4 * blocks)
    recompute = forward["attn_scores"]
  return 3 * sum(forward.values()) + recompute, activation_bytes + score_bytes


def estimate(accelerator: Accelerator, variant: str, image_size: int, channels: int,
             cls_token: bool, backend: str) -> dict:
  size, _ = vit.parse_variant(variant)
  flops = throughput.analytic_flops(variant, image_size, channels, num_classes=1000,
                                    cls_token=cls_token)
  executed, moved = per_layer(size, flops["tokens"], backend)
  executed, moved = executed * size.depth, moved * size.depth
  compute_s = executed / (accelerator.bf16_tflops * 1e12)
  memory_s = moved / (accelerator.hbm_tb_s * 1e12)
  step_s = max(compute_s, memory_s)
  return dict(mfu=flops["train"] / step_s / (accelerator.bf16_tflops * 1e12),
              bound="memory" if memory_s > compute_s else "compute")


def table() -> str:
  lines = ["| accelerator | workload | tokens | auto picks | "
           + " | ".join(f"{b} MFU bound" for b in BACKENDS) + " |",
           "|---|---|---|---|" + "---|" * len(BACKENDS)]
  for acc in ACCELERATORS:
    for label, variant, image_size, channels, cls_token in WORKLOADS:
      _, patch = vit.parse_variant(variant)
      tokens = (image_size // patch) ** 2 + cls_token
      picked = attention.choose_backend(platform=acc.platform, length=tokens,
                                        dtype="bfloat16")
      cells = []
      for backend in BACKENDS:
        if backend not in ON_PLATFORM[acc.platform]:
          cells.append("—")
          continue
        e = estimate(acc, variant, image_size, channels, cls_token, backend)
        mark = "**" if backend == picked else ""
        cells.append(f"{mark}{100 * e['mfu']:.0f}%{mark} ({e['bound'][0]})")
      lines.append(f"| {acc.name} | {label} | {tokens} | {picked} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  argparse.ArgumentParser(prog="python -m benchmarks.estimates",
                          description=__doc__.split("\n")[0]).parse_args(argv)
  print(table())
  print("\nMFU upper bound = model FLOPs / max(executed FLOPs / peak, HBM bytes / bandwidth);"
        " (c) compute-bound, (m) memory-bound; bold = what `auto` runs (bfloat16).")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
