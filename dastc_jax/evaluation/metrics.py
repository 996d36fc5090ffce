"""Confusion-matrix mIoU (scenic-style, global over the eval set)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(
    pred: jax.Array,
    label: jax.Array,
    num_classes: int,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Counts (label, prediction) pairs; labels outside [0, C) are ignored.

  Args:
    pred: ``[B, H, W]`` predicted ids.
    label: ``[B, H, W]`` ground-truth ids (255 = ignore).
    num_classes: C.
    mask: optional ``[B]`` bool, False for padded examples.

  Returns:
    ``[C, C]`` int32 matrix, rows = ground truth, columns = prediction.
  """
  label = label.astype(jnp.int32)
  pred = pred.astype(jnp.int32)
  valid = (label >= 0) & (label < num_classes)
  if mask is not None:
    valid &= mask.reshape((-1,) + (1,) * (label.ndim - 1))
  idx = jnp.where(valid, label * num_classes + pred, 0)
  counts = jnp.bincount(
      idx.reshape(-1),
      weights=valid.reshape(-1).astype(jnp.int32),
      length=num_classes * num_classes,
  )
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
  """IoU_k = TP / (TP + FP + FN); NaN for classes absent from GT and preds."""
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  denom = cm.sum(0) + cm.sum(1) - tp
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denom > 0, tp / denom, np.nan)


def mean_iou(cm: np.ndarray, scored: Sequence[int] | None = None) -> float:
  """nanmean of the IoUs of the ``scored`` classes (all by default).

  ``scored`` implements the SYNTHIA rule: train 12 classes, score 11.
  """
  iou = iou_per_class(cm)
  if scored is not None:
    iou = iou[list(scored)]
  if np.all(np.isnan(iou)):
    return float('nan')
  return float(np.nanmean(iou))


def pixel_accuracy(cm: np.ndarray) -> float:
  cm = np.asarray(cm, np.float64)
  total = cm.sum()
  return float(np.trace(cm) / total) if total else float('nan')
