"""Bidirectional multi-level spatio-temporal fusion (DA-STC; docs/method.md,
section 3).

Image-sequence level ("video QuadMix"): one patch sequence - classes of the
previous iteration's source clip S', long-tail source patches, and the
confident regions of the previous iteration's target clip T' - is pasted
into a *source-context* clip and a *target-context* clip. Every mask comes
from one class set per clip, applied to each frame with that frame's own
labels; the flows are mixed with the same masks, and so are the labels.

Shallow-feature level (``feature_mode='swap'``, the default): after the
shallow stage, regions of *current-iteration* classes are exchanged between
the two fused clips. The target-context clip receives the source clip's
features of a few current source classes, the source-context clip receives
the target clip's features of a few confident pseudo-label classes. Each
clip uses one class set, applied per frame with that frame's own labels;
the labels and the flows t->t-1 follow the same masks, and the key frame
(t-1) is exchanged with its own t-1 mask, so the flow-guided warp reads the
exchanged key-frame scores where the object moved to. The pasted regions of
the image level are excluded: there both clips already hold the same
pixels. ``feature_mode='blend'`` is the reference decoder variant's formula
(``0.7 own + 0.3 other`` inside the fused mask). See docs/method.md.

Everything is pure JAX on batched arrays: ``[B, T, H, W, ...]`` clips with
T = 2 frames (t, t-1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def pick_classes(
    key: Array,
    label: Array,
    num: int,
    num_classes: int,
    exclude: Array | None = None,
) -> Array:
  """``num`` distinct classes present in ``label``, chosen at random.

  Args:
    key: PRNG key.
    label: ``[H, W]`` (or any shape) ids; ids outside [0, C) are ignored.
    num: how many to pick.
    num_classes: C.
    exclude: optional ``[n]`` ids that must not be picked (-1 = none).

  Returns:
    ``[num]`` int32 class ids, -1 where fewer than ``num`` were available.
  """
  lab = label.reshape(-1).astype(jnp.int32)
  valid = (lab >= 0) & (lab < num_classes)
  present = (
      jnp.zeros((num_classes,), bool).at[jnp.where(valid, lab, 0)].max(valid)
  )
  if exclude is not None:
    ex = (
        jnp.zeros((num_classes + 1,), bool)
        .at[jnp.where(exclude >= 0, exclude, num_classes)]
        .set(True)[:num_classes]
    )
    present &= ~ex
  scores = jnp.where(present, jax.random.uniform(key, (num_classes,)), -1.0)
  top = jnp.argsort(-scores)[:num].astype(jnp.int32)
  return jnp.where(scores[top] >= 0, top, -1)


def class_mask(label: Array, classes: Array) -> Array:
  """``label`` in ``classes`` (-1 entries match nothing). Shapes broadcast:
  label ``[..., H, W]``, classes ``[n]`` -> bool ``[..., H, W]``."""
  lab = label.astype(jnp.int32)[..., None]
  return jnp.any((lab == classes) & (classes >= 0), axis=-1)


def crop(
    x: Array, offsets: Array, size: tuple[int, int], has_channels: bool
) -> Array:
  """Crops the fusion window W out of every example.

  Args:
    x: ``[B, ..., H, W]`` or ``[B, ..., H, W, C]`` (``has_channels``).
    offsets: ``[B, 2]`` (top, left) of W.
    size: ``(h, w)`` of W.
    has_channels: whether the last axis is channels (frames, flows).

  Returns:
    The cropped array.
  """

  def one(xi, off):
    lead = xi.ndim - 3 if has_channels else xi.ndim - 2
    start = [0] * xi.ndim
    start[lead], start[lead + 1] = off[0], off[1]
    sizes = list(xi.shape)
    sizes[lead], sizes[lead + 1] = size
    return jax.lax.dynamic_slice(xi, start, sizes)

  return jax.vmap(one)(x, offsets)


def sample_masks(
    key: Array,
    *,
    prev_src_labels: Array,
    rare_labels: Array,
    rare_classes: Array,
    prev_tgt_masks: Array,
    has_prev: Array,
    num_classes: int,
    num_source_classes: int,
    rare_class_list: tuple[int, ...],
    clip_lt: bool = True,
) -> dict[str, Array]:
  """The paste masks of one iteration (one class set per clip).

  Args:
    key: PRNG key.
    prev_src_labels: ``[B, 2, H, W]`` S' labels (t, t-1), cropped to W.
    rare_labels: ``[B, K, H, W]`` long-tail patch labels (cropped).
    rare_classes: ``[B, K]`` the class of each patch (-1 = no patch).
    prev_tgt_masks: ``[B, 2, H, W]`` confident T' regions (M'_d, M'_c).
    has_prev: bool scalar, False on the first adaptation step.
    num_classes: C.
    num_source_classes: random S' classes per clip (2 in the reference).
    rare_class_list: all long-tail class ids (always pasted from S').
    clip_lt: clip the summed long-tail mask to [0, 1] (the reference does
      not: ``bugs.unclipped_lt_mask``).

  Returns:
    ``src`` ``[B, 2, H, W]`` (S' pastes), ``rare`` ``[B, K, H, W]``,
    ``lt`` ``[B, H, W]`` float long-tail mask, ``tgt`` ``[B, 2, H, W]``
    (T' pastes), ``rare_classes`` and ``source_classes`` ``[B, n]`` (the
    random S' classes).
  """
  b = prev_src_labels.shape[0]
  keys = jax.random.split(key, b)
  picked = jax.vmap(
      lambda k, lab: pick_classes(k, lab[0], num_source_classes, num_classes)
  )(keys, prev_src_labels)
  rare_all = jnp.broadcast_to(
      jnp.asarray(rare_class_list, jnp.int32), (b, len(rare_class_list))
  )
  k_s = jnp.concatenate([picked, rare_all], axis=1)  # [B, n + R]
  src = jax.vmap(class_mask)(prev_src_labels, k_s) & has_prev
  rare = (rare_labels.astype(jnp.int32) == rare_classes[..., None, None]) & (
      rare_classes[..., None, None] >= 0
  )
  lt = jnp.sum(rare.astype(jnp.float32), axis=1)
  if clip_lt:
    lt = jnp.clip(lt, 0.0, 1.0)
  tgt = prev_tgt_masks & has_prev
  return {
      'src': src,
      'rare': rare,
      'lt': lt,
      'tgt': tgt,
      'rare_classes': rare_classes,
      'source_classes': picked,
  }


def compose(
    base: Array,
    base_labels: Array,
    *,
    prev_src: Array,
    prev_src_labels: Array,
    rare: Array,
    prev_tgt: Array,
    prev_tgt_labels: Array,
    masks: dict[str, Array],
) -> tuple[Array, Array]:
  """Pastes S', the long-tail patches and T' into a base clip.

  Per frame tau: ``X = Ms ? S' : base``; for each patch k ``X = Mk ? P_k :
  X``; then ``X = M' ? T' : X``. Labels follow the same masks (a patch's
  pixels get its class).

  Args:
    base: ``[B, 2, H, W, 3]`` normalised base frames.
    base_labels: ``[B, 2, H, W]`` their (pseudo-)labels.
    prev_src: ``[B, 2, H, W, 3]`` normalised S' frames (cropped).
    prev_src_labels: ``[B, 2, H, W]``.
    rare: ``[B, K, H, W, 3]`` normalised long-tail patches.
    prev_tgt: ``[B, 2, H, W, 3]`` normalised T' frames (d', c').
    prev_tgt_labels: ``[B, 2, H, W]`` T' pseudo-labels.
    masks: from ``sample_masks``.

  Returns:
    Mixed frames ``[B, 2, H, W, 3]`` and labels ``[B, 2, H, W]`` (int32).
  """
  x = jnp.where(masks['src'][..., None], prev_src, base)
  y = jnp.where(masks['src'], prev_src_labels, base_labels).astype(jnp.int32)
  for k in range(rare.shape[1]):
    m = masks['rare'][:, k][:, None]  # [B, 1, H, W]: same in t and t-1
    x = jnp.where(m[..., None], rare[:, k][:, None], x)
    y = jnp.where(m, masks['rare_classes'][:, k][:, None, None, None], y)
  x = jnp.where(masks['tgt'][..., None], prev_tgt, x)
  y = jnp.where(masks['tgt'], prev_tgt_labels.astype(jnp.int32), y)
  return x, y


def mix_flow(
    base_flow: Array,
    *,
    prev_src_flow: Array,
    prev_tgt_flow: Array,
    masks: dict[str, Array],
    key_frame_masks: bool,
) -> Array:
  """Mixes the flows t->t-1 with the same paste masks (on frame t's grid).

  ``key_frame_masks=True`` reproduces the reference, which uses the t-1
  masks although the flow lives on frame t's grid (docs/reference_code.md,
  "Known defects").
  Long-tail patches are static (zero motion); their key-frame scores are
  replaced by the current ones in the model (``lt_mask``), so their flow
  does not matter.
  """
  f = 1 if key_frame_masks else 0
  out = jnp.where(masks['src'][:, f][..., None], prev_src_flow, base_flow)
  return jnp.where(masks['tgt'][:, f][..., None], prev_tgt_flow, out)


def _resize_mask(mask: Array, shape: tuple[int, ...], dtype) -> Array:
  """``[B, H, W]`` mask -> ``[B, h, w, 1]`` (nearest) at a feature grid."""
  return jax.image.resize(mask.astype(dtype), shape[:3], 'nearest')[..., None]


def relative_difference(feat_a: Array, feat_b: Array, mask: Array) -> Array:
  """``||a - b|| / ||b||`` over the pixels of ``mask`` ``[B, h, w, 1]``
  (0 for an empty mask); how much an exchange changes the features."""
  diff = jnp.sum(mask * (feat_a - feat_b).astype(jnp.float32) ** 2)
  ref = jnp.sum(mask * feat_b.astype(jnp.float32) ** 2)
  return jnp.sqrt(diff / jnp.maximum(ref, 1e-12))


def feature_swap(
    feat_s: Array, feat_t: Array, masks: dict[str, Array]
) -> tuple[Array, Array, dict[str, Array]]:
  """Exchanges shallow features between the two fused clips (one frame).

  Args:
    feat_s: ``[B, h, w, C]`` source-context clip features.
    feat_t: ``[B, h, w, C]`` target-context clip features.
    masks: ``to_s`` ``[B, H, W]`` (target features go into the source
      clip there) and ``to_t`` (source features go into the target clip).

  Returns:
    The exchanged ``(feat_s, feat_t)`` and ``{'feat_rel_diff_to_s',
    'feat_rel_diff_to_t'}``: the relative difference of the features being
    replaced, measured before the exchange (0 would mean a no-op; two
    unrelated images give about 1 even within one domain, so it does not
    measure a domain gap), and ``{'swap_area_to_s', 'swap_area_to_t'}``:
    the fraction of the feature grid exchanged in each direction. With more
    than one clip per batch also the same-domain baselines
    ``{'feat_rel_diff_same_s', 'feat_rel_diff_same_t'}``: the same measure
    between the exchanged features and those of the *next clip of the same
    domain* at the same pixels (``to_t`` for the source features, ``to_s``
    for the target's). Only the excess of ``feat_rel_diff_to_*`` over these
    can be read as a difference between the domains.
  """
  to_s = _resize_mask(masks['to_s'], feat_s.shape, feat_s.dtype)
  to_t = _resize_mask(masks['to_t'], feat_t.shape, feat_t.dtype)
  info = {
      'feat_rel_diff_to_s': relative_difference(feat_t, feat_s, to_s),
      'feat_rel_diff_to_t': relative_difference(feat_s, feat_t, to_t),
      'swap_area_to_s': jnp.mean(to_s.astype(jnp.float32)),
      'swap_area_to_t': jnp.mean(to_t.astype(jnp.float32)),
  }
  if feat_s.shape[0] > 1:
    # The features that move, against the same domain's next clip there.
    info['feat_rel_diff_same_s'] = relative_difference(
        feat_s, jnp.roll(feat_s, 1, axis=0), to_t
    )
    info['feat_rel_diff_same_t'] = relative_difference(
        feat_t, jnp.roll(feat_t, 1, axis=0), to_s
    )
  new_s = jnp.where(to_s > 0, feat_t, feat_s)
  new_t = jnp.where(to_t > 0, feat_s, feat_t)
  return new_s, new_t, info


SWAP_DIRECTIONS = ('both', 'to_target', 'to_source')
# dastc.feature_mode: the exchange of shallow features, the reference
# decoder's blend, and a control that moves the same regions as pixels.
FEATURE_MODES = ('swap', 'blend', 'pixel_swap')
# dastc.feature_swap_labels: labels follow the exchanged features, or (a
# control that must hurt if the exchange carries content) stay the
# receiving clip's.
SWAP_LABELS = ('exchanged', 'kept')


def swap_masks(
    key: Array,
    *,
    src_labels: Array,
    tgt_labels: Array,
    tgt_confident: Array,
    pasted: Array,
    num_classes: int,
    num_swap_classes: int,
    directions: str,
) -> dict[str, Array]:
  """The shallow-feature exchange masks of one iteration.

  Args:
    key: PRNG key.
    src_labels: ``[B, T, H, W]`` labels of the current source clip (window).
    tgt_labels: ``[B, T, H, W]`` pseudo-labels of the current target clip.
    tgt_confident: ``[B, T, H, W]`` bool, confident pseudo-labels.
    pasted: ``[B, T, H, W]`` the image-level paste mask (excluded).
    num_classes: C.
    num_swap_classes: classes per direction and clip.
    directions: ``'both'``, ``'to_target'`` (only source features go into
      the target-context clip; ``to_s`` is empty) or ``'to_source'`` (only
      target features go into the source-context clip).

  Returns:
    ``to_t`` (current source classes, frame by frame) and ``to_s``
    (confident current pseudo-label classes, not among the source ones)
    ``[B, T, H, W]`` bool, and the picked ``src_classes``/``tgt_classes``
    ``[B, n]``.
  """
  k_src, k_tgt = jax.random.split(key)
  b = src_labels.shape[0]
  free = ~pasted.astype(bool)
  src_cls = jax.vmap(
      lambda k, lab: pick_classes(k, lab[0], num_swap_classes, num_classes)
  )(jax.random.split(k_src, b), src_labels)
  tgt_cls = jax.vmap(
      lambda k, lab, conf, ex: pick_classes(
          k, jnp.where(conf[0], lab[0], -1), num_swap_classes, num_classes, ex
      )
  )(jax.random.split(k_tgt, b), tgt_labels, tgt_confident, src_cls)
  to_t = jax.vmap(class_mask)(src_labels, src_cls) & free
  to_s = jax.vmap(class_mask)(tgt_labels, tgt_cls) & tgt_confident & free
  if directions not in SWAP_DIRECTIONS:
    raise ValueError(
        f'directions={directions!r}; expected one of ' f'{SWAP_DIRECTIONS}.'
    )
  if directions == 'to_target':
    to_s = jnp.zeros_like(to_s)
  elif directions == 'to_source':
    to_t = jnp.zeros_like(to_t)
  return {
      'to_s': to_s,
      'to_t': to_t,
      'src_classes': src_cls,
      'tgt_classes': tgt_cls,
  }


def apply_swap(
    masks: dict[str, Array],
    clip_s: tuple[Array, Array, Any],
    clip_t: tuple[Array, Array, Any],
) -> tuple[tuple[Array, Array, Any], tuple[Array, Array, Any]]:
  """Labels and flows of the two fused clips after the feature exchange.

  Args:
    masks: from ``swap_masks``.
    clip_s: ``(frames, labels [B, T, H, W], flow [B, H, W, 2] or None)`` of
      the source-context clip (frames are returned unchanged: the exchange
      happens on features).
    clip_t: the same for the target-context clip.

  Returns:
    The two clips with exchanged labels (every frame) and flows (frame t's
    masks, the flow's grid).
  """
  (xs, ys, fs), (xt, yt, ft) = clip_s, clip_t
  ys2 = jnp.where(masks['to_s'], yt, ys)
  yt2 = jnp.where(masks['to_t'], ys, yt)
  if fs is not None:
    fs, ft = (
        jnp.where(masks['to_s'][:, 0, ..., None], ft, fs),
        jnp.where(masks['to_t'][:, 0, ..., None], fs, ft),
    )
  return (xs, ys2, fs), (xt, yt2, ft)


def swap_pixels(
    masks: dict[str, Array],
    clip_s: tuple[Array, Array, Any],
    clip_t: tuple[Array, Array, Any],
) -> tuple[tuple[Array, Array, Any], tuple[Array, Array, Any]]:
  """The control ``dastc.feature_mode='pixel_swap'``: the exchange's class
  regions moved as input pixels instead of shallow features (every frame
  with its own masks); labels and flows are left to :func:`apply_swap`.

  Args:
    masks: from ``swap_masks`` (``to_s``/``to_t`` ``[B, T, H, W]``).
    clip_s: ``(frames [B, T, H, W, 3], labels, flow)`` of the
      source-context clip.
    clip_t: the same for the target-context clip.

  Returns:
    The two clips with exchanged frames.
  """
  (xs, ys, fs), (xt, yt, ft) = clip_s, clip_t
  xs2 = jnp.where(masks['to_s'][..., None], xt, xs)
  xt2 = jnp.where(masks['to_t'][..., None], xs, xt)
  return (xs2, ys, fs), (xt2, yt, ft)


def feature_mix(
    feat_s: Array, feat_t: Array, mask: Array, other_weight: float
) -> tuple[Array, Array, dict[str, Array]]:
  """Blends the two clips' shallow features inside the fused mask.

  ``s' = s + m * w * (t - s)`` and ``t' = t + m * w * (s - t)`` with
  ``w = other_weight`` (0.3 in the reference decoder variant, i.e. 0.7 of
  a clip's own feature is kept). An empty mask is the identity.

  Args:
    feat_s: ``[B, h, w, C]`` source-context features.
    feat_t: ``[B, h, w, C]`` target-context features.
    mask: ``[B, H, W]`` fused mask at input resolution (resized nearest).
    other_weight: weight of the other clip's feature inside the mask.

  Returns:
    The mixed ``(feat_s, feat_t)`` and ``{'feat_rel_diff'}``, the relative
    difference of the two clips' features inside the mask before mixing,
    and ``{'mix_area'}``, the fraction of the feature grid mixed.
  """
  inside = _resize_mask(mask, feat_s.shape, feat_s.dtype)
  m = inside * other_weight
  info = {
      'feat_rel_diff': relative_difference(feat_s, feat_t, inside),
      'mix_area': jnp.mean(inside.astype(jnp.float32)),
  }
  return (feat_s + m * (feat_t - feat_s), feat_t + m * (feat_s - feat_t), info)


def fused_mask(masks: dict[str, Any]) -> Array:
  """``clip(Ms + M_lt + M')`` per frame ``[B, 2, H, W]`` (feature fusion)."""
  m = (
      masks['src'].astype(jnp.float32)
      + masks['lt'][:, None]
      + masks['tgt'].astype(jnp.float32)
  )
  return jnp.clip(m, 0.0, 1.0)
