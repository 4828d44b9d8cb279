"""The train state every trainer shares, created already sharded.

Shapes first, then allocation: the model is traced with `nnx.eval_shape`,
parameter shardings come from its logical-axis annotations and the config's
rules, optimizer-state shardings mirror the parameters', and one jitted init
with `out_shardings` creates everything in place. Nothing is built whole on
one device and moved.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pixel_vit import parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any  # pure dict of float32 arrays
  opt_state: Any
  ema_params: Any  # pure dict, or None when EMA is off
  rng: jax.Array  # base PRNG key; step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class ShardedState:
  """A freshly created (or restorable) state and everything needed to use it."""
  graphdef: nnx.GraphDef
  abstract: TrainState  # ShapeDtypeStructs
  shardings: TrainState  # NamedShardings, same structure
  param_shardings: Any


def merge_model(graphdef: nnx.GraphDef, params) -> nnx.Module:
  """The NNX module for a pure-dict of parameters (inside jit)."""
  return nnx.merge(graphdef, nnx.State(params))


def sharded_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                  *, mesh, rules, seed: int, ema: bool) -> tuple[ShardedState, Callable[[], TrainState]]:
  """Returns the state's description and a jitted function that creates it."""
  graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model))
  param_shardings = parallel.param_shardings(abstract_params, mesh, rules)
  replicated = parallel.replicated(mesh)

  def init() -> TrainState:
    params = nnx.to_pure_dict(nnx.split(make_model())[1])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if ema else None,
                      rng=jax.random.PRNGKey(seed))

  abstract = jax.eval_shape(init)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract.opt_state, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                         ema_params=param_shardings if ema else None, rng=replicated)

  def create() -> TrainState:
    with parallel.activate(mesh, rules):
      return jax.jit(init, out_shardings=shardings)()

  return ShardedState(graphdef, abstract, shardings, param_shardings), create


def ema_update(ema_params, params, decay: float):
  return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
