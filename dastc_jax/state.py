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
  rng: jax.Array  # uint32[2] root key; per-step keys are fold_in(rng, step)


def init_model(config: ml_collections.ConfigDict, seed: int
               ) -> tuple[nnx.GraphDef, Any, Any]:
  """Builds the model and splits it into (graphdef, params, batch_stats).

  Parameter shapes do not depend on the input size, so no forward pass (and
  no compile at full resolution) is needed.
  """
  model = models.build_model(config.model, nnx.Rngs(params=seed))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def create_train_state(config: ml_collections.ConfigDict
                       ) -> tuple[nnx.GraphDef, TrainState,
                                  optax.GradientTransformation]:
  """Creates the initial train state.

  Args:
    config: the experiment config.

  Returns:
    ``(graphdef, state, tx)``.
  """
  graphdef, params, stats = init_model(config, config.seed)
  tx = optim.make_optimizer(config.optim, params,
                            config.model.freeze_bn_affine)
  # One compiled init for the whole optimizer state (eager would compile
  # one program per parameter shape).
  opt_state = jax.jit(tx.init)(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=stats, opt_state=opt_state,
                     rng=jax.random.PRNGKey(config.seed + 1))
  return graphdef, state, tx


def abstract_train_state(config: ml_collections.ConfigDict) -> TrainState:
  """Shapes and dtypes of the train state, without allocating it."""
  return jax.eval_shape(lambda: create_train_state(config)[1])
