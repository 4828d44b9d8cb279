"""benchmarks/profile_step.py puts a compiled step's ops in the category of the
code that emitted them (the breakdown the performance notes quote)."""

import collections

import jax
import jax.numpy as jnp

from benchmarks import profile_step
from pixel_vit.models import attention, vit


def _categories(fn, *args) -> dict:
  text = jax.jit(fn).lower(*args).compile().as_text()
  instructions = profile_step.parse_hlo(text)
  by_computation = profile_step.group_by_computation(instructions)
  found = collections.defaultdict(set)
  for name, info in instructions.items():
    if info["computation"] and "fused" in info["computation"]:
      continue  # count top-level instructions (what the thunks run)
    found[profile_step.categorise(name, instructions, by_computation)].add(info["opcode"])
  return found


def test_attention_matmuls_projections_and_drop_path_are_told_apart():
  q = jnp.ones((2, 160, 2, 16))
  w = jnp.ones((32, 64))

  def step(q, w):
    out = attention.chunked_attention(q, q, q)  # models/attention/chunked.py
    h = out.reshape(2, 160, 32) @ w  # a projection, from this test file
    return vit.drop_path(h, jnp.float32(0.1), jax.random.key(0)).sum()

  found = _categories(step, q, w)
  assert "attention matmuls" in found
  assert "projection + MLP matmuls" in found
  assert "drop-path" in found
  assert set(found) <= set(profile_step.CATEGORIES)
