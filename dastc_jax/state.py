"""The train state pytree and its creation.

The model is an NNX module used functionally: ``nnx.split`` once into a
static ``graphdef`` plus pure-dict ``params`` and ``batch_stats``; the step
functions ``nnx.merge`` them back inside ``jax.jit``.
"""

from __future__ import annotations

from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dastc_jax import models
from dastc_jax import optim


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed)."""
  step: jax.Array  # int32 scalar
  params: Any  # pure dict of float32 arrays
  batch_stats: Any  # pure dict of BatchNorm running averages
  opt_state: Any
  rng: jax.Array  # uint32 key data; step keys: fold_in(wrap(rng), step)


def init_model(config: ml_collections.ConfigDict, seed: int
               ) -> tuple[nnx.GraphDef, Any, Any]:
  """Builds the model and splits it into (graphdef, params, batch_stats).

  Parameter shapes do not depend on the input size, so no forward pass (and
  no compile at full resolution) is needed.
  """
  model = models.build_model(config.model, nnx.Rngs(params=seed))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def model_graphdef(config: ml_collections.ConfigDict) -> nnx.GraphDef:
  """The model's static graph, without creating any parameter."""
  abstract = nnx.eval_shape(
      lambda: models.build_model(config.model, nnx.Rngs(params=0)))
  return nnx.split(abstract)[0]


def _initial_state(config: ml_collections.ConfigDict) -> TrainState:
  _, params, stats = init_model(config, config.seed)
  tx = optim.make_optimizer(config.optim, params,
                            config.model.freeze_bn_affine)
  # One compiled init for the whole optimizer state (eager would compile
  # one program per parameter shape).
  opt_state = jax.jit(tx.init)(params)
  rng = jax.random.key_data(jax.random.key(config.seed + 1))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=stats, opt_state=opt_state, rng=rng)


def create_train_state(config: ml_collections.ConfigDict, *,
                       abstract: bool = False
                       ) -> tuple[nnx.GraphDef, TrainState,
                                  optax.GradientTransformation]:
  """Creates the initial train state, or only its shapes.

  Args:
    config: the experiment config.
    abstract: return ``jax.ShapeDtypeStruct`` leaves (a restore target)
      without initialising anything.

  Returns:
    ``(graphdef, state, tx)``.
  """
  if abstract:
    state = jax.eval_shape(lambda: _initial_state(config))
  else:
    state = _initial_state(config)
  tx = optim.make_optimizer(config.optim, state.params,
                            config.model.freeze_bn_affine)
  return model_graphdef(config), state, tx


def abstract_train_state(config: ml_collections.ConfigDict) -> TrainState:
  """Shapes and dtypes of the train state, without allocating it."""
  return create_train_state(config, abstract=True)[1]
