"""ImageNet feature distance (DAFormer's FD, in the released HRDA configs).

The student's last encoder stage on a source image is pulled towards the
same stage of a frozen copy of the encoder as it was at the start of the
run (the ImageNet weights), at the feature-grid cells that are mostly (at
least ``min_ratio`` of their pixels) one of the listed "thing" classes:

  FD = mean over those cells of || f_student - f_imagenet ||_2

A batch without such a cell gives 0 and no gradient (the released code
takes the mean of an empty set, NaN, but never lets it reach the weights).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

IGNORE = 255


def downscale_label_ratio(
    labels: jax.Array, factor: int, min_ratio: float, num_classes: int
) -> jax.Array:
  """Majority label of each ``factor x factor`` cell, or ignore.

  Args:
    labels: ``[B, H, W]`` int train ids (255 ignored).
    factor: the cell size; trailing rows/columns that do not fill a cell
      are dropped (average pooling's floor).
    min_ratio: a cell whose majority covers less than this share of its
      pixels is ignored; an ignored majority stays ignored.
    num_classes: train ids ``0 .. num_classes - 1``.

  Returns:
    ``[B, H // factor, W // factor]`` int32.
  """
  b, h, w = labels.shape
  th, tw = h // factor, w // factor
  lab = labels[:, : th * factor, : tw * factor].astype(jnp.int32)
  lab = jnp.where(lab == IGNORE, num_classes, lab)
  onehot = jax.nn.one_hot(lab, num_classes + 1, dtype=jnp.float32)
  ratio = onehot.reshape(b, th, factor, tw, factor, num_classes + 1).mean(
      axis=(2, 4)
  )  # [B, th, tw, C + 1]
  best = jnp.argmax(ratio, axis=-1)
  share = jnp.max(ratio, axis=-1)
  out = jnp.where(best == num_classes, IGNORE, best)
  return jnp.where(share < min_ratio, IGNORE, out).astype(jnp.int32)


def feature_distance(
    student: jax.Array,
    reference: jax.Array,
    labels: jax.Array,
    classes: Sequence[int],
    min_ratio: float,
    num_classes: int,
) -> tuple[jax.Array, jax.Array]:
  """The masked mean L2 distance and the share of cells it averages.

  Args:
    student: ``[B, h, w, F]`` the student's last encoder stage.
    reference: ``[B, h, w, F]`` the frozen encoder's (no gradient flows).
    labels: ``[B, H, W]`` source labels of the same images, ``H`` a
      multiple of ``h`` as the released code assumes (``W // w`` is the
      cell size).
    classes: train ids whose cells count.
    min_ratio: see ``downscale_label_ratio``.
    num_classes: number of train ids.
  """
  h, w = student.shape[1:3]
  factor = labels.shape[2] // w
  if factor < 1 or labels.shape[1] // factor != h:
    raise ValueError(
        f'feature distance: labels {labels.shape[1:]} do not tile the '
        f'feature grid {(h, w)} in whole cells (the encoder must reduce '
        'the input by an integer factor).'
    )
  cells = downscale_label_ratio(labels, factor, min_ratio, num_classes)
  mask = jnp.isin(cells, jnp.asarray(classes, jnp.int32))  # [B, h, w]
  diff = student.astype(jnp.float32) - jax.lax.stop_gradient(
      reference.astype(jnp.float32)
  )
  # The norm's gradient is NaN at 0 (a student still equal to the
  # reference): guard the square root there.
  sq = jnp.sum(diff * diff, axis=-1)
  safe = jnp.where(sq > 0, sq, 1.0)
  dist = jnp.where(sq > 0, jnp.sqrt(safe), 0.0)
  m = mask.astype(jnp.float32)
  n = jnp.sum(m)
  return jnp.sum(dist * m) / jnp.maximum(n, 1.0), jnp.mean(m)
