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
class ModelShapes:
  """A model traced once with `nnx.eval_shape`: no arrays allocated."""

  graphdef: nnx.GraphDef
  state: nnx.State  # abstract variables, with their logical-axis metadata

  @property
  def params(self) -> dict:
    """Pure dict of ShapeDtypeStructs (what optimizers and loaders need)."""
    return nnx.to_pure_dict(self.state)


def model_shapes(make_model: Callable[[], nnx.Module]) -> ModelShapes:
  return ModelShapes(*nnx.split(nnx.eval_shape(make_model)))


@dataclasses.dataclass(frozen=True)
class ShardedState:
  """A freshly created (or restorable) state and everything needed to use it."""

  graphdef: nnx.GraphDef
  abstract: TrainState  # ShapeDtypeStructs carrying their shardings (restore target)
  shardings: TrainState  # NamedShardings, same structure
  param_shardings: Any


def merge_model(graphdef: nnx.GraphDef, params) -> nnx.Module:
  """The NNX module for a pure-dict of parameters (inside jit)."""
  return nnx.merge(graphdef, nnx.State(params))


def sharded_state(
  make_model: Callable[[], nnx.Module],
  tx: optax.GradientTransformation,
  *,
  mesh,
  rules,
  seed: int,
  ema: bool,
  shapes: ModelShapes | None = None,
) -> tuple[ShardedState, Callable[[], TrainState]]:
  """Returns the state's description and a jitted function that creates it.

  `shapes` (from `model_shapes`) saves tracing the model again when the
  caller already has them.
  """
  shapes = shapes or model_shapes(make_model)
  param_shardings = parallel.param_shardings(shapes.state, mesh, rules)
  replicated = parallel.replicated(mesh)

  def init() -> TrainState:
    params = nnx.to_pure_dict(nnx.split(make_model())[1])
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=params if ema else None,
      rng=jax.random.PRNGKey(seed),
    )

  # The optimizer state's shapes follow from the parameters' alone.
  abstract_params = shapes.params
  abstract = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=abstract_params,
    opt_state=jax.eval_shape(tx.init, abstract_params),
    ema_params=abstract_params if ema else None,
    rng=jax.eval_shape(jax.random.PRNGKey, seed),
  )
  opt_shardings = optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    abstract.opt_state,
    param_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
  )
  shardings = TrainState(
    step=replicated,
    params=param_shardings,
    opt_state=opt_shardings,
    ema_params=param_shardings if ema else None,
    rng=replicated,
  )
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )

  def create() -> TrainState:
    with parallel.activate(mesh, rules):
      return jax.jit(init, out_shardings=shardings)()

  return ShardedState(shapes.graphdef, abstract, shardings, param_shardings), create


def apply_gradients(
  state: TrainState, grads, tx: optax.GradientTransformation, ema_decay: float
) -> TrainState:
  """One optimizer update, the EMA (when on) and the step count."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = (
    None
    if state.ema_params is None
    else optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
  )
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
