"""Category-aware spatio-temporal feature alignment (DA-STC).

Default (``alignment.aggregation='frames'``), see docs/method.md:

1. *Views*: every frame that a student pass of the step sees is a view -
   for the target, frame t of the strongly augmented pass (t, t-1) and of
   the clean pass (t, t-2), and the key frames t-1 and t-2 of those passes;
   for the source, frames t and t-1 of the source pass. Current frames
   carry gradients, key frames are gradient-free (as ACCEL's key frame).
2. *Spatial aggregation*: per view and class, the mean deep feature (the
   256-d pre-logit feature, or the C-d scores with ``feature='logits'``)
   over the pixels of that class in that frame, with the frame's *own*
   labels: the teacher's (``target_labels='teacher'``: its warped labels
   for t, its labels of t-1 and t-2) or the student's argmax
   (``'student'``); for the source, the ground truth where the student's
   prediction agrees with it. No warp, so no occlusion smear.
3. *Temporal aggregation*: the class prototype is a weighted mean over the
   views where the class is present, with one weight per class and view:
   ``softmax_v(r_{v,k} / tau)``, ``r_{v,k}`` the mean reliability of class
   k's pixels in view v. Reliability is the teacher's clean probability of
   the pixel's label (target) or the student's gradient-free probability of
   the true class (source), so it is comparable across frames whatever the
   augmentation. The more reliable view gets *more* weight. A class seen in
   one frame only still gets a prototype.
4. *Loss*: cross-domain intra-class alignment and inter-class separation in
   one contrastive (InfoNCE) form with cosine similarity, temperature and an
   additive margin on the positive pair, symmetrised over target->source and
   source->target. Classes absent from either domain are masked out of
   positives *and* negatives; they never act as zero prototypes.
   ``kind='cosine'`` keeps the intra-class pull alone (``cosine_pull``).

The reference (``aggregation='pairs'``): per temporal pair, the class means
of the pair's *fused* output with its own argmax as labels, averaged over
the pairs (t, t-1) and (t, t-2) with fixed or entropy weights (one weight per
pair for the batch), and ``mmd_rbf``: an RBF-MMD between the two sets of C
class-mean vectors, zero rows included.

All functions are pure jnp on global arrays, so under ``jax.jit`` with a
sharded batch they compute the same value on 1 or N devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def class_prototypes(
    features: Array, labels: Array, num_classes: int, min_pixels: int
) -> tuple[Array, Array]:
  """Per-class mean feature over all pixels of a batch.

  Args:
    features: ``[B, h, w, D]``.
    labels: ``[B, h, w]`` int ids; ids outside [0, C) are ignored.
    num_classes: C.
    min_pixels: a class needs at least this many pixels to be present.

  Returns:
    ``protos`` ``[C, D]`` (zero for absent classes) and ``present`` ``[C]``.
  """
  lab = labels.reshape(-1).astype(jnp.int32)
  feat = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
  onehot = jax.nn.one_hot(lab, num_classes, dtype=jnp.float32)  # 0 if OOR
  counts = jnp.sum(onehot, 0)
  sums = onehot.T @ feat
  present = counts >= min_pixels
  protos = jnp.where(
      present[:, None], sums / jnp.maximum(counts, 1)[:, None], 0.0
  )
  return protos, present


def class_reliability(
    labels: Array, reliability: Array, num_classes: int
) -> Array:
  """Mean of ``reliability`` over each class's pixels.

  Args:
    labels: ``[B, h, w]`` int ids; ids outside [0, C) are ignored.
    reliability: ``[B, h, w]`` per-pixel reliability (no gradient).
    num_classes: C.

  Returns:
    ``[C]`` (0 for a class without pixels).
  """
  lab = labels.reshape(-1).astype(jnp.int32)
  onehot = jax.nn.one_hot(lab, num_classes, dtype=jnp.float32)
  rel = jax.lax.stop_gradient(reliability).reshape(-1).astype(jnp.float32)
  return (rel @ onehot) / jnp.maximum(jnp.sum(onehot, 0), 1.0)


def view_weights(
    reliability: Array, present: Array, temperature: float, adaptive: bool
) -> Array:
  """Per class, weights over the views where it is present.

  Args:
    reliability: ``[V, C]`` mean reliability of each class in each view.
    present: ``[V, C]``.
    temperature: tau of ``softmax_v(r / tau)``; smaller is sharper.
    adaptive: False gives equal weights to the views where present.

  Returns:
    ``[V, C]`` weights; each present class's column sums to 1, an absent
    class's column is 0.
  """
  r = jax.lax.stop_gradient(reliability).astype(jnp.float32)
  score = r / temperature if adaptive else jnp.zeros_like(r)
  score = jnp.where(present, score, -jnp.inf)
  any_present = jnp.any(present, 0, keepdims=True)
  w = jax.nn.softmax(jnp.where(any_present, score, 0.0), axis=0)
  return jnp.where(present & any_present, w, 0.0)


def aggregate_views(
    protos: Array, present: Array, weights: Array
) -> tuple[Array, Array]:
  """``sum_v w_{v,k} p_{v,k}`` per class (weights from ``view_weights``).

  Args:
    protos: ``[V, C, D]`` per-view prototypes.
    present: ``[V, C]``.
    weights: ``[V, C]``.

  Returns:
    ``[C, D]`` prototypes and ``[C]`` presence (present in any view).
  """
  return jnp.einsum('vc,vcd->cd', weights, protos), jnp.any(present, 0)


def spatio_temporal_prototypes(
    views: list[dict[str, Array]],
    num_classes: int,
    min_pixels: int,
    temperature: float,
    adaptive: bool,
) -> tuple[Array, Array, Array]:
  """Prototypes aggregated over space and over the views (frames).

  Args:
    views: each ``{'feat': [B, h, w, D], 'label': [B, h, w],
      'reliability': [B, h, w]}``, all at one feature grid.
    num_classes: C.
    min_pixels: pixels a class needs in a view to be present there.
    temperature: tau of the adaptive weights.
    adaptive: reliability-adaptive (True) or equal weights.

  Returns:
    ``protos`` ``[C, D]``, ``present`` ``[C]`` and the weights ``[V, C]``.
  """
  protos, present, rel = [], [], []
  for v in views:
    p, m = class_prototypes(v['feat'], v['label'], num_classes, min_pixels)
    protos.append(p)
    present.append(m)
    rel.append(class_reliability(v['label'], v['reliability'], num_classes))
  present = jnp.stack(present)
  w = view_weights(jnp.stack(rel), present, temperature, adaptive)
  out, pres = aggregate_views(jnp.stack(protos), present, w)
  return out, pres, w


def mean_entropy(logits: Array) -> Array:
  """Mean normalised prediction entropy in [0, 1] (``H / log C``)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  h = -jnp.sum(jnp.exp(logp) * logp, -1)
  return jnp.mean(h) / jnp.log(logits.shape[-1])


def temporal_weights(
    entropies: Array, temperature: float, adaptive: bool
) -> Array:
  """Pair weights: ``softmax(-H / tau)`` (adaptive) or uniform.

  Args:
    entropies: ``[P]`` mean normalised entropy of each temporal pair.
    temperature: tau; smaller is sharper.
    adaptive: False gives the reference's fixed ``1 / P``.

  Returns:
    ``[P]`` weights summing to 1 (no gradient).
  """
  if not adaptive:
    return jnp.full(entropies.shape, 1.0 / entropies.shape[0])
  return jax.nn.softmax(-jax.lax.stop_gradient(entropies) / temperature)


def aggregate_pairs(
    protos: Array, present: Array, weights: Array, renormalize: bool = True
) -> tuple[Array, Array]:
  """Weighted mean of per-pair prototypes over the pairs where present.

  Args:
    protos: ``[P, C, D]``.
    present: ``[P, C]``.
    weights: ``[P]``.
    renormalize: True divides by the weight of the pairs where the class is
      present; False is the reference's plain ``sum_i w_i p_i`` with zero
      rows for absent classes (a class seen in one of two pairs gets half
      its prototype).

  Returns:
    ``[C, D]`` prototypes and ``[C]`` presence (present in any pair).
  """
  w = weights[:, None] * present.astype(jnp.float32)  # [P, C]
  out = jnp.einsum('pc,pcd->cd', w, protos)
  if renormalize:
    out = out / jnp.maximum(jnp.sum(w, 0), 1e-12)[:, None]
  return out, jnp.any(present, 0)


def _normalize(x: Array) -> Array:
  """Unit rows; a zero row stays zero with a finite (zero) gradient."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, x / jnp.maximum(jnp.sqrt(safe), 1e-6), 0.0)


def contrastive(
    source: Array,
    target: Array,
    present: Array,
    *,
    temperature: float,
    margin: float,
) -> Array:
  """Class-aware cross-domain contrastive loss with a margin.

  For each class k present in both domains, with cosine similarities
  ``s(k, j) = cos(target_k, source_j)``:
  ``-log( e^{(s(k,k) - m)/tau} / (e^{(s(k,k) - m)/tau} +
  sum_{j != k, present} e^{s(k,j)/tau}) )``, averaged over k and over the
  two directions. Low when same-class prototypes coincide and other classes
  are far apart.

  Args:
    source: ``[C, D]`` source prototypes.
    target: ``[C, D]`` target prototypes.
    present: ``[C]`` classes present in both domains.
    temperature: tau.
    margin: m, subtracted from the positive similarity.

  Returns:
    Scalar loss (0 when fewer than one class is present).
  """
  c = source.shape[0]
  sim = _normalize(target) @ _normalize(source).T  # [C(target), C(source)]
  eye = jnp.eye(c, dtype=bool)
  logits = (sim - margin * eye) / temperature
  valid = present[:, None] & present[None, :]
  logits = jnp.where(valid, logits, -jnp.inf)

  def direction(lg):
    lp = jax.nn.log_softmax(jnp.where(present[:, None], lg, 0.0), -1)
    per_class = -jnp.diagonal(lp)
    n = jnp.maximum(jnp.sum(present), 1)
    return jnp.sum(jnp.where(present, per_class, 0.0)) / n

  return 0.5 * (direction(logits) + direction(logits.T))


def cosine_pull(source: Array, target: Array, present: Array) -> Array:
  """Intra-class pull only: the mean over classes present in both domains
  of ``1 - cos(target_k, source_k)``. Unlike ``contrastive`` it does not
  saturate once other classes are far apart: its gradient stays until the
  two class means point the same way (0 when no class is present)."""
  cos = jnp.sum(_normalize(target) * _normalize(source), axis=-1)  # [C]
  n = jnp.maximum(jnp.sum(present), 1)
  return jnp.sum(jnp.where(present, 1.0 - cos, 0.0)) / n


def mmd_rbf(
    source: Array, target: Array, kernel_num: int = 5, kernel_mul: float = 2.0
) -> Array:
  """The reference's RBF-MMD between two sets of C prototypes (§4.6).

  Rows are treated as 2C samples (absent classes are zero rows, as in the
  released code); the bandwidth is the mean off-diagonal squared distance
  divided by ``kernel_mul ** (kernel_num // 2)``, without gradient.
  """
  z = jnp.concatenate([source, target], 0).astype(jnp.float32)
  n = z.shape[0]
  d = jnp.sum((z[:, None] - z[None]) ** 2, -1)
  bw = jax.lax.stop_gradient(jnp.sum(d) / (n * n - n))
  bw = bw / kernel_mul ** (kernel_num // 2)
  k = sum(jnp.exp(-d / (bw * kernel_mul**q)) for q in range(kernel_num))
  c = source.shape[0]
  return jnp.mean(k[:c, :c] + k[c:, c:] - k[:c, c:] - k[c:, :c])
