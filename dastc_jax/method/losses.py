"""Segmentation losses (pure JAX)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from dastc_jax.models import hrda
from dastc_jax.ops import warp as warp_ops

IGNORE = 255


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    ignore_index: int = IGNORE,
    weights: jax.Array | None = None,
) -> jax.Array:
  """Pixel-wise CE, averaged over the pixels whose label is valid.

  Labels ``>= C`` (e.g. 255) and negative labels are ignored, as in ADVENT's
  ``cross_entropy_2d``. A batch without valid pixels gives 0.

  Args:
    logits: ``[B, H, W, C]``.
    labels: ``[B, H, W]`` integer ids.
    ignore_index: documented ignore id (any id outside [0, C) is ignored).
    weights: optional ``[B]`` per-example weights on each pixel's loss (the
      mean still divides by the number of valid pixels, as DAFormer's
      weighted pseudo-label loss does).

  Returns:
    Scalar float32 loss.
  """
  del ignore_index  # every out-of-range id is ignored
  c = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < c)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  if weights is not None:
    nll = nll * weights.astype(jnp.float32).reshape(
        (-1,) + (1,) * (nll.ndim - 1)
    )
  total = jnp.sum(jnp.where(valid, nll, 0.0))
  count = jnp.sum(valid)
  return total / jnp.maximum(count, 1).astype(jnp.float32)


def upsampled_cross_entropy(
    logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
  """CE after bilinear (align-corners) upsampling of logits to label size."""
  logits = warp_ops.resize_bilinear(logits, labels.shape[1:3])
  return cross_entropy(logits, labels, weights=weights)


SegLoss = Callable[..., jax.Array]


def segmentation_loss(model_config: ml_collections.ConfigDict) -> SegLoss:
  """The loss of a model's output against labels, on any label grid.

  Returns ``loss(out, labels, input_hw, weights=None)``: CE of
  ``out['pred']`` (upsampled to the labels when they are larger). For a
  multi-resolution (HRDA) model in training it is HRDA's
  ``(1 - w) CE(fused) + w CE(detail, labels cropped at the detail box)``
  (``w = model.hrda.detail_loss_weight``; ``input_hw`` the frames' size, by
  which the box is scaled to the label grid).
  """
  spec = hrda.Spec.from_config(model_config)
  weight = spec and float(model_config.hrda.detail_loss_weight)

  def one(logits: jax.Array, labels: jax.Array, weights) -> jax.Array:
    if logits.shape[1:3] != labels.shape[1:3]:
      return upsampled_cross_entropy(logits, labels, weights)
    return cross_entropy(logits, labels, weights=weights)

  def loss(
      out: dict[str, Any],
      labels: jax.Array,
      input_hw: Sequence[int],
      weights: jax.Array | None = None,
  ) -> jax.Array:
    main = one(out['pred'], labels, weights)
    if spec is None or 'detail' not in out:
      return main
    lab = hrda.crop_at_scale(
        labels, out['detail_box'], spec.detail_crop, input_hw
    )
    return (1.0 - weight) * main + weight * one(out['detail'], lab, weights)

  return loss
