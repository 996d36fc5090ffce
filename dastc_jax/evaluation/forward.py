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
from dastc_jax.models import hrda
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
    slide: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> jax.Array:
  """Fused scores ``[B, *out_size, C]`` of uint8 clips ``[B, T, H, W, 3]``.

  ``slide``: ``(window, stride)`` in pixels (image models): the scores of
  overlapping windows, each resized to its window (bilinear, half-pixel),
  averaged where they overlap; None segments the whole frame at once.
  """
  model = nnx.merge(graphdef, params, batch_stats)
  x = image_ops.normalize(frames, dtype)
  if slide is None:
    return warp_ops.resize_bilinear(
        model.clip(x, flow, train=False)['pred'], out_size
    )
  window, stride = slide

  def scores(w: jax.Array) -> jax.Array:  # [n * B, h, w, 3] windows
    pred = model.clip(w[:, None], None, train=False)['pred']
    return hrda.resize_half_pixel(pred, w.shape[1:3])

  hw = x.shape[2:4]
  full = hrda.slide(scores, x[:, 0], window, hw, stride)  # [B, H, W, C]
  return warp_ops.resize_bilinear(full, out_size)


def slide_setting(
    config: ml_collections.ConfigDict,
) -> tuple[tuple[int, int], tuple[int, int]] | None:
  """``(window, stride)`` of ``config.eval``, or None (whole frames)."""
  e = config.eval
  if e.get('slide_window') is None:
    return None
  return tuple(e.slide_window), tuple(e.slide_stride)


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
  slide = slide_setting(config)

  def eval_step(params, batch_stats, batch):
    logits = predict_logits(
        graphdef,
        params,
        batch_stats,
        batch['frames'],
        batch.get('flow'),
        batch['label'].shape[1:3],
        dtype,
        slide,
    )
    pred = jnp.argmax(logits, axis=-1).astype(jnp.uint8)  # [B, Hl, Wl]
    cm = metrics_lib.confusion_matrix(
        pred, batch['label'], num_classes, batch['mask']
    )
    return cm, pred

  return eval_step
