"""The pure supervised train step (jitted once, with shardings, in train.py).

``train_step(state, batch) -> (state, metrics)`` is the source-only
supervised step of ACCEL (docs/reference_code.md, "Training"): CE with ignore
255 on the fused scores plus ``loss.aux_weight`` x CE on the fused aux
scores, both upsampled to the label size (a multi-resolution model adds its
detail loss, ``losses.segmentation_loss``).
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dastc_jax.method import losses
from dastc_jax.method.train_state import TrainState
from dastc_jax import models
from dastc_jax.ops import image as image_ops

Batch = dict[str, Any]


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    domain: str = 'source',
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Any]]]:
  """Builds the supervised train step on one domain's labels.

  ``domain='source'`` is source-only training (and DA-STC's warm start);
  ``domain='target'`` is the target oracle (it needs target labels).

  Args:
    config: experiment config.
    graphdef: static NNX graph of the model.
    tx: the optimizer.
    domain: which labelled clips to train on.

  Returns:
    ``train_step(state, batch) -> (state, metrics)``; ``batch[domain]``
    holds ``frames`` ``[B, T, H, W, 3]`` uint8 (t, t-1, ...), ``flow``
    ``[B, H, W, 2]`` (t->t-1; none for the image model) and the labels of frame
    t (source
    ``labels[:, 0]``, target ``label``).
  """
  aux_weight = config.loss.aux_weight
  seg_loss = losses.segmentation_loss(config.model)
  dtype = models.compute_dtype(config.model.dtype)

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    src = batch[domain]
    frames = image_ops.normalize(src['frames'], dtype)  # [B, T, H, W, 3]
    label = (
        src['labels'][:, 0] if domain == 'source' else src['label']
    ).astype(
        jnp.int32
    )  # [B, H, W]

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats)
      out = model.clip(frames, src.get('flow'), train=True, rng=rng)
      l_main = seg_loss(out, label, frames.shape[2:4])
      l_aux = losses.upsampled_cross_entropy(out['pred_aux'], label)
      loss = l_main + aux_weight * l_aux
      stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      return loss, ({'loss_src_main': l_main, 'loss_src_aux': l_aux}, stats)

    (loss, (terms, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss,
        **terms,
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(params),
    }
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=stats,
        opt_state=opt_state,
    )
    return new_state, metrics

  return train_step
