"""The train steps as the runtime runs them.

The pure steps of ``method/`` return ``(state, metrics)``. Here each gets
the learning rates of its parameter groups as metrics and the non-finite
guard (``train.nonfinite``: a non-finite step stops the run, or is skipped
with the state unchanged), and DA-STC gets the class set's names and
long-tail classes.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import ml_collections
import optax

from dastc_jax.data import labels as labels_lib
from dastc_jax.method import dastc_step
from dastc_jax.method import train_step
from dastc_jax.runtime import divergence
from dastc_jax.runtime import optim
from dastc_jax.runtime import state as state_lib

Step = Callable[[Any, Any], tuple[Any, dict[str, Any]]]


def _with_runtime(step: Step, config: ml_collections.ConfigDict) -> Step:
  schedules = optim.group_schedules(
      config.optim, optim.adaptation_start(config)
  )
  policy = config.train.nonfinite

  def run(state, batch):
    new_state, metrics = step(state, batch)
    metrics = {
        **metrics,
        'lr_backbone': schedules['backbone'](state.step),
        'lr_head': schedules['head'](state.step),
    }
    return divergence.guard(policy, state, new_state, metrics)

  return run


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    domain: str = 'source',
) -> Step:
  """The supervised step on ``domain``'s labels (source-only, oracle)."""
  return _with_runtime(
      train_step.make_train_step(config, graphdef, tx, domain), config
  )


def make_dastc_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
) -> Step:
  """The DA-STC step for ``config.data.class_set``."""
  cs = labels_lib.get_class_set(config.data.class_set)
  return _with_runtime(
      dastc_step.make_dastc_step(
          config,
          graphdef,
          tx,
          class_names=tuple(cs.classes),
          teacher_graphdef=state_lib.frozen_teacher_graphdef(config),
          rare_classes=labels_lib.RARE_CLASSES[config.data.class_set],
      ),
      config,
  )
