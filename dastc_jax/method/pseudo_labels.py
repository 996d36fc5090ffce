"""Teachers and TPS-style cross-frame pseudo-labels (docs/method.md, section 1).

The teacher segments the target pair (t-1, t-2); its class probabilities
for frame t-1 are warped to frame t with the flow t->t-1, giving
pseudo-labels for frame t that the student (which sees t, t-1) cannot copy
from its own input.

Teachers (``dastc.teacher``):

* ``ema``: a mean teacher, ``theta_T <- a theta_T + (1 - a) theta_S`` after
  every step (BatchNorm running averages too), run in eval mode;
* ``reference``: the released code's scheme - the frozen warm-start model
  (eval mode) for the first ``teacher_switch_steps`` adaptation steps, then
  the student itself in train mode (dropout on, and its BatchNorm running
  averages updated by the teacher pass; no gradient).

``dastc.teacher_flip`` (the reference: 0.5) mirrors the teacher's input pair
and flow at random per clip and mirrors its scores back before the warp; the
``dastc.bugs`` flags ``flip_keep_dx`` and ``warp_before_unflip`` reproduce
the reference's flow flip without negating dx and its warp of the still
mirrored scores (docs/reference_code.md, "Known defects").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dastc_jax.ops import warp as warp_ops

# config.dastc.teacher: the EMA mean teacher, or the reference's frozen-
# then-self teacher.
TEACHERS = ('ema', 'reference')


# The pseudo-label grids the losses read, each with its teacher probability.
LABEL_GRIDS = (
    ('label_lo', 'conf_lo'),
    ('label_aux_lo', 'conf_aux_lo'),
    ('label_t', 'conf_t'),
    ('label_t1', 'conf_t1'),
)


def ema_update(teacher: Any, student: Any, decay: float | jax.Array) -> Any:
  """``decay * teacher + (1 - decay) * student`` leaf by leaf."""
  return jax.tree.map(
      lambda t, s: decay * t + (1.0 - decay) * s, teacher, student
  )


def cross_frame(
    pred: jax.Array,
    pred_aux: jax.Array,
    flow_t_t1: jax.Array,
    out_size: tuple[int, int],
    *,
    confidence_from_logit: bool = False,
) -> dict[str, jax.Array]:
  """Pseudo-labels for frame t from the teacher's scores of frame t-1.

  Args:
    pred: ``[B, h, w, C]`` teacher fused scores of frame t-1 (its pair is
      (t-1, t-2)).
    pred_aux: ``[B, h, w, C]`` the aux scores.
    flow_t_t1: ``[B, H, W, 2]`` flow t->t-1 on the image grid.
    out_size: ``(H, W)`` of the full-resolution labels.
    confidence_from_logit: reproduce the reference's frame-(t-1) confidence,
      the max *logit* instead of the max probability (docs/reference_code.md,
      "Known defects").

  Returns:
    ``label_lo``/``label_aux_lo`` ``[B, h, w]`` (warped argmax at the score
    resolution, targets of the consistency loss) with their confidences
    ``conf_lo``/``conf_aux_lo`` and the warped probabilities ``probs_lo``
    ``[B, h, w, C]``; ``label_t``/``conf_t``
    ``[B, H, W]`` (warped to t, upsampled) and ``label_t1``/``conf_t1`` (the
    unwarped frame t-1) at full resolution.
  """
  flow_lo = warp_ops.resize_flow(flow_t_t1, pred.shape[1:3])
  warped_lo = warp_ops.warp(jax.nn.softmax(pred, -1), flow_lo)
  warped_aux = warp_ops.warp(jax.nn.softmax(pred_aux, -1), flow_lo)
  up = warp_ops.resize_bilinear(pred, out_size)
  probs = jax.nn.softmax(up, -1)
  warped = warp_ops.warp(probs, warp_ops.resize_flow(flow_t_t1, out_size))
  conf_t1 = jnp.max(up if confidence_from_logit else probs, -1)
  return {
      'probs_lo': warped_lo,
      'label_lo': jnp.argmax(warped_lo, -1).astype(jnp.int32),
      'conf_lo': jnp.max(warped_lo, -1),
      'label_aux_lo': jnp.argmax(warped_aux, -1).astype(jnp.int32),
      'conf_aux_lo': jnp.max(warped_aux, -1),
      'label_t': jnp.argmax(warped, -1).astype(jnp.int32),
      'conf_t': jnp.max(warped, -1),
      'label_t1': jnp.argmax(up, -1).astype(jnp.int32),
      'conf_t1': conf_t1,
  }


def same_frame(
    pred: jax.Array, pred_aux: jax.Array, out_size: tuple[int, int]
) -> dict[str, jax.Array]:
  """Pseudo-labels of the image domain (clip length 1): the teacher's own
  scores of frame t, with the keys of ``cross_frame`` that apply (no
  ``label_t1``).
  """
  probs_lo = jax.nn.softmax(pred, -1)
  probs_aux = jax.nn.softmax(pred_aux, -1)
  probs = jax.nn.softmax(warp_ops.resize_bilinear(pred, out_size), -1)
  return {
      'label_lo': jnp.argmax(probs_lo, -1).astype(jnp.int32),
      'conf_lo': jnp.max(probs_lo, -1),
      'label_aux_lo': jnp.argmax(probs_aux, -1).astype(jnp.int32),
      'conf_aux_lo': jnp.max(probs_aux, -1),
      'label_t': jnp.argmax(probs, -1).astype(jnp.int32),
      'conf_t': jnp.max(probs, -1),
  }


def hflip(x: jax.Array, flip: jax.Array) -> jax.Array:
  """Flips ``x`` ``[B, ..., H, W, C]`` horizontally where ``flip`` ``[B]``."""
  f = flip.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(f, x[..., ::-1, :], x)


def hflip_labels(x: jax.Array, flip: jax.Array) -> jax.Array:
  """Flips label/confidence maps ``[B, H, W]`` where ``flip`` ``[B]``."""
  return hflip(x[..., None], flip)[..., 0]


def hflip_flow(
    flow: jax.Array, flip: jax.Array, negate_dx: bool = True
) -> jax.Array:
  """Flips a flow ``[B, H, W, 2]`` where ``flip``; a mirrored flow's dx
  changes sign (``negate_dx=False`` is the TPS/reference bug)."""
  flipped = flow[:, :, ::-1]
  if negate_dx:
    flipped = flipped * jnp.asarray([-1.0, 1.0], flow.dtype)
  return jnp.where(flip[:, None, None, None], flipped, flow)


def use_student(
    step: jax.Array, adapt_start: int, switch_steps: int
) -> jax.Array:
  """Reference scheme: True once ``switch_steps`` adaptation steps ran."""
  return step >= adapt_start + switch_steps


def quality(pl: dict[str, jax.Array], threshold: float) -> jax.Array:
  """DAFormer's pseudo-label quality estimate: per clip ``[B]``, the share
  of frame t's score-grid pixels whose teacher probability is at least
  ``threshold`` (its released value: 0.968)."""
  conf = pl['conf_lo'].astype(jnp.float32)  # [B, h, w]
  return jnp.mean(conf >= threshold, axis=tuple(range(1, conf.ndim)))


def ignore_unconfident(
    pl: dict[str, jax.Array], threshold: float
) -> dict[str, jax.Array]:
  """Sets pseudo-labels whose probability is below ``threshold`` to 255.

  ``threshold=0`` keeps the reference's hard labels on every pixel.
  """
  if threshold <= 0:
    return pl
  out = dict(pl)
  for label, conf in LABEL_GRIDS:
    if label not in pl:
      continue
    out[label] = jnp.where(pl[conf] >= threshold, pl[label], 255)
  return out


def keep_class_top(
    pl: dict[str, jax.Array], portion: float, num_classes: int
) -> dict[str, jax.Array]:
  """Class-balanced selection (CBST, Zou et al. 2018): per class, keeps the
  ``portion`` of its pseudo-labelled pixels in the batch with the highest
  teacher probability and sets the rest to 255, on every label grid.

  A global threshold lets the large classes keep their uncertain pixels
  (often a small class they swallow) while a small class predicted with
  lower confidence loses all of its own; a per-class quantile keeps the
  most confident part of every class. ``portion`` 0 (or 1) changes nothing.
  """
  if portion <= 0 or portion >= 1:
    return pl
  out = dict(pl)
  for label, conf in LABEL_GRIDS:
    if label not in pl:
      continue
    lab = pl[label]
    cf = pl[conf].astype(jnp.float32)
    valid = lab != 255
    cls = jnp.where(valid, lab.astype(jnp.int32), num_classes).ravel()
    # One sort of all pixels by (class, probability); class c's values are
    # then sorted[start_c : start_c + n_c] (invalid pixels last).
    order = jnp.lexsort((cf.ravel(), cls))
    sorted_cf = cf.ravel()[order]
    n = jnp.bincount(cls, length=num_classes + 1)[:num_classes]  # [C]
    start = jnp.cumsum(n) - n
    # The linear-interpolated (1 - portion) quantile of each class, as
    # numpy's default; classes without pixels are never compared.
    q = (1.0 - portion) * jnp.maximum(n - 1, 0).astype(jnp.float32)
    lo = jnp.floor(q).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    last = sorted_cf.shape[0] - 1
    v_lo = sorted_cf[jnp.minimum(start + lo, last)]
    v_hi = sorted_cf[jnp.minimum(start + hi, last)]
    thr = v_lo + (q - lo) * (v_hi - v_lo)  # [C]
    keep = valid & (
        cf >= thr[jnp.clip(lab.astype(jnp.int32), 0, num_classes - 1)]
    )
    out[label] = jnp.where(keep, lab, 255).astype(lab.dtype)
  return out


def ignore_outside(
    pl: dict[str, jax.Array], valid: jax.Array
) -> dict[str, jax.Array]:
  """Sets pseudo-labels outside ``valid`` ``[B, H, W]`` (nonzero: trusted,
  on the target frame's grid) to 255, on every label grid (nearest
  sample of ``valid`` at each grid's pixel centres): HRDA's pseudo-label
  margins."""
  out = dict(pl)
  for label, _ in LABEL_GRIDS:
    if label not in pl:
      continue
    h, w = pl[label].shape[-2:]
    rows = (jnp.arange(h) + 0.5) * valid.shape[1] / h
    cols = (jnp.arange(w) + 0.5) * valid.shape[2] / w
    keep = valid[:, rows.astype(jnp.int32)][:, :, cols.astype(jnp.int32)]
    out[label] = jnp.where(keep > 0, pl[label], 255)
  return out
