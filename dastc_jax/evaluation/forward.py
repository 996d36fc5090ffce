"""The one evaluation forward pass (training's evaluation, eval jobs).

``model.clip`` on normalised frames in eval mode (running BN averages, no
dropout); the fused scores are upsampled (corners aligned) to the label
size before the argmax (docs/reference_code.md, "Training").
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from dastc_jax.evaluation import metrics as metrics_lib
from dastc_jax import models
from dastc_jax.ops import image as image_ops
from dastc_jax.ops import warp as warp_ops


def predict_logits(
    graphdef: nnx.GraphDef,
    params: Any,
    batch_stats: Any,
    frames: jax.Array,
    flow: jax.Array | None,
    out_size: tuple[int, int],
    dtype: Any,
) -> jax.Array:
  """Fused scores ``[B, *out_size, C]`` of uint8 clips ``[B, T, H, W, 3]``."""
  model = nnx.merge(graphdef, params, batch_stats)
  out = model.clip(image_ops.normalize(frames, dtype), flow, train=False)
  return warp_ops.resize_bilinear(out['pred'], out_size)


def make_eval_step(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef
) -> Callable[..., Any]:
  """Builds ``eval_step(params, batch_stats, batch) -> (confusion, pred)``.

  The fused logits are upsampled (align corners) to the label size before
  the argmax (docs/reference_code.md, "Training"). ``batch``: ``frames`` ``[B,
  2, H, W, 3]``,
  ``flow`` ``[B, H, W, 2]``, ``label`` ``[B, Hl, Wl]``, ``mask`` ``[B]``.
  """
  num_classes = config.model.num_classes
  dtype = models.compute_dtype(config.model.dtype)

  def eval_step(params, batch_stats, batch):
    logits = predict_logits(
        graphdef,
        params,
        batch_stats,
        batch['frames'],
        batch.get('flow'),
        batch['label'].shape[1:3],
        dtype,
    )
    pred = jnp.argmax(logits, axis=-1).astype(jnp.uint8)  # [B, Hl, Wl]
    cm = metrics_lib.confusion_matrix(
        pred, batch['label'], num_classes, batch['mask']
    )
    return cm, pred

  return eval_step
