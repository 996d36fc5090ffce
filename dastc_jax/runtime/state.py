"""The train state pytree and its creation.

The model is an NNX module used functionally: ``nnx.split`` once into a
static ``graphdef`` plus pure-dict ``params`` and ``batch_stats``; the step
functions ``nnx.merge`` them back inside ``jax.jit``.
"""

from __future__ import annotations

from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dastc_jax.method.train_state import empty_carried
from dastc_jax.method.train_state import TrainState
from dastc_jax import models
from dastc_jax.data import pipeline
from dastc_jax.runtime import checkpointing
from dastc_jax.runtime import optim


def init_model(
    config: ml_collections.ConfigDict, seed: int
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
  return _graphdef(config.model)


def _graphdef(model: ml_collections.ConfigDict) -> nnx.GraphDef:
  abstract = nnx.eval_shape(
      lambda: models.build_model(model, nnx.Rngs(params=0))
  )
  return nnx.split(abstract)[0]


def frozen_teacher_model(
    config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict | None:
  """The model section of ``dastc.frozen_teacher`` (the student's with
  ``model_name``/``head`` replaced), or None when the frozen teacher is the
  run's own weights."""
  if config.method != 'dastc' or not config.dastc.frozen_teacher.weights:
    return None
  f = config.dastc.frozen_teacher
  model = ml_collections.ConfigDict(config.model.to_dict())
  model.name = f.model_name or model.name
  model.head = f.head or model.head
  return model


def frozen_teacher_graphdef(
    config: ml_collections.ConfigDict,
) -> nnx.GraphDef | None:
  """The frozen teacher's static graph (None: it is the student's)."""
  model = frozen_teacher_model(config)
  return None if model is None else _graphdef(model)


def _initial_state(
    config: ml_collections.ConfigDict, sizes: dict[str, Any] | None
) -> tuple[nnx.GraphDef, TrainState]:
  """The model's graph and the initial train state."""
  graphdef, params, stats = init_model(config, config.seed)
  tx = optim.make_optimizer(
      config.optim,
      params,
      config.model.freeze_bn_affine,
      optim.adaptation_start(config),
  )
  # One compiled init for the whole optimizer state (eager would compile
  # one program per parameter shape).
  opt_state = jax.jit(tx.init)(params)
  rng = jax.random.key_data(jax.random.key(config.seed + 1))
  teacher = carried = imagenet = None
  if config.method == 'dastc':
    frozen = frozen_teacher_model(config)
    if frozen is None:
      # The teacher is reset to the student when adaptation starts.
      # Own buffers: the state is donated to the step, leaf by leaf.
      teacher = jax.tree.map(jnp.copy, {'params': params, 'batch_stats': stats})
    else:  # a separate model; its weights are loaded by load_frozen_teacher
      _, t_params, t_stats = init_model(
          ml_collections.ConfigDict({'model': frozen}), config.seed
      )
      teacher = {'params': t_params, 'batch_stats': t_stats}
    imagenet = _encoder_copy(config, params, stats)
    carried = empty_carried(
        sizes['batch'],
        sizes['source'],
        sizes['target'],
        models.clip_length(config.model),
        config.model.num_classes,
    )
  return graphdef, TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=stats,
      opt_state=opt_state,
      rng=rng,
      teacher=teacher,
      carried=carried,
      imagenet_encoder=imagenet,
  )


def _encoder_copy(
    config: ml_collections.ConfigDict, params: Any, stats: Any
) -> dict[str, Any] | None:
  """Own copies of the backbone's weights for the feature distance (None
  when it is off)."""
  if config.method != 'dastc' or not config.dastc.feature_distance.weight:
    return None
  return jax.tree.map(
      jnp.copy,
      {'params': params['backbone'], 'batch_stats': stats.get('backbone', {})},
  )


def create_train_state(
    config: ml_collections.ConfigDict,
    *,
    abstract: bool = False,
    sizes: dict[str, Any] | None = None,
) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
  """Creates the initial train state, or only its shapes.

  Args:
    config: the experiment config.
    abstract: return ``jax.ShapeDtypeStruct`` leaves (a restore target)
      without initialising anything.
    sizes: for DA-STC, ``{'batch': global batch, 'source': (H, W),
      'target': (H, W)}`` of the carried clips.

  Returns:
    ``(graphdef, state, tx)``.
  """
  if config.method == 'dastc' and sizes is None:
    raise ValueError('DA-STC train states need the carried clip sizes.')
  # The graph comes from the one build of the model (eager, or traced for
  # shapes): a second, traced build costs ~9 s for MiT-B5
  # (docs/performance.md). A graph holds no arrays, so it may leave the trace.
  built = {}

  def initial():
    built['graphdef'], state = _initial_state(config, sizes)
    return state

  state = jax.eval_shape(initial) if abstract else initial()
  graphdef = built['graphdef']
  tx = optim.make_optimizer(
      config.optim,
      state.params,
      config.model.freeze_bn_affine,
      optim.adaptation_start(config),
  )
  return graphdef, state, tx


def abstract_train_state(
    config: ml_collections.ConfigDict, sizes: dict[str, Any] | None = None
) -> TrainState:
  """Shapes and dtypes of the train state, without allocating it."""
  return create_train_state(config, abstract=True, sizes=sizes)[1]


def carried_sizes(
    config: ml_collections.ConfigDict, data_root: str
) -> dict[str, Any] | None:
  """Global batch and clip sizes of DA-STC's carried state."""
  if config.method != 'dastc':
    return None

  def size(key):
    d = config.data[key]
    if d.crop_size:
      return tuple(d.crop_size)
    return pipeline.native_size(d, data_root, f'config.data.{key}')

  return {
      'batch': config.train.batch_size,
      'source': size('source'),
      'target': size('target'),
  }


def init_from_checkpoint(
    config: ml_collections.ConfigDict, state: TrainState
) -> TrainState:
  """Replaces the initial weights by those of ``config.train.init_from``."""
  root, step = checkpointing.resolve('.', config.train.init_from)
  params, stats, step = checkpointing.load_weights(
      root, step, state.params, state.batch_stats
  )
  logging.info('Initialised the weights from %s step %d.', root, step)
  teacher = state.teacher
  if teacher is not None and frozen_teacher_model(config) is None:
    teacher = jax.tree.map(jnp.copy, {'params': params, 'batch_stats': stats})
  imagenet = state.imagenet_encoder
  if imagenet is not None:  # the loaded (ImageNet) backbone
    imagenet = _encoder_copy(config, params, stats)
  return state.replace(
      params=params,
      batch_stats=stats,
      teacher=teacher,
      imagenet_encoder=imagenet,
  )


def load_frozen_teacher(
    config: ml_collections.ConfigDict, state: TrainState
) -> TrainState:
  """Puts the weights of ``dastc.frozen_teacher.weights`` into the teacher
  (no-op when the frozen teacher is the run's own weights)."""
  if frozen_teacher_model(config) is None:
    return state
  root, step = checkpointing.resolve('.', config.dastc.frozen_teacher.weights)
  params, stats, step = checkpointing.load_weights(
      root, step, state.teacher['params'], state.teacher['batch_stats']
  )
  logging.info('Frozen teacher: %s step %d.', root, step)
  return state.replace(teacher={'params': params, 'batch_stats': stats})
