"""Segmentation losses (pure JAX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def upsampled_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """CE after bilinear (align-corners) upsampling of logits to label size."""
  logits = warp_ops.resize_bilinear(logits, labels.shape[1:3])
  return cross_entropy(logits, labels)
