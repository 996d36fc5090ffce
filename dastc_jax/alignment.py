"""Category-aware spatio-temporal feature alignment (DA-STC).

1. *Spatial aggregation*: per class, the mean of the deep features (the
   256-d pre-logit feature or the C-d fused logits, ``alignment.feature``)
   over the pixels of that class in a clip's prediction.
2. *Temporal aggregation*: the target prototype of a class is the weighted
   mean of its prototypes from the temporal pairs (t, t-1) and (t, t-2).
   The weights are adaptive: ``softmax(-H_i / tau)`` over pairs, with H_i
   the pair's mean normalised prediction entropy (one weight per pair for
   the batch). The more certain pair gets *more* weight. As in the
   reference, pair 1 is the strongly augmented (t, t-1) clip and pair 2 the
   clean (t, t-2) clip, so H_i reflects both the augmentation and the flow
   span. The reference's disabled variant gave more weight to higher
   entropy; we take the certainty-weighted direction because an uncertain
   pair's prototype mixes classes (its pixels are more often assigned to the
   wrong class) and would pull the source prototypes towards that mixture.
3. *Loss*: cross-domain intra-class alignment and inter-class separation in
   one contrastive (InfoNCE) form with cosine similarity, temperature and an
   additive margin on the positive pair, symmetrised over target->source and
   source->target. Classes absent from either domain in the batch are
   masked out of positives *and* negatives; they never act as zero
   prototypes.

``mmd_rbf`` is the reference's loss (``alignment.kind='mmd'``): an RBF-MMD
between the two sets of C class-mean vectors, zero rows included.

All functions are pure jnp on global arrays, so under ``jax.jit`` with a
sharded batch they compute the same value on 1 or N devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def class_prototypes(features: Array, labels: Array, num_classes: int,
                     min_pixels: int) -> tuple[Array, Array]:
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
  protos = jnp.where(present[:, None], sums / jnp.maximum(counts, 1)[:, None],
                     0.0)
  return protos, present


def mean_entropy(logits: Array) -> Array:
  """Mean normalised prediction entropy in [0, 1] (``H / log C``)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  h = -jnp.sum(jnp.exp(logp) * logp, -1)
  return jnp.mean(h) / jnp.log(logits.shape[-1])


def temporal_weights(entropies: Array, temperature: float,
                     adaptive: bool) -> Array:
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


def aggregate_pairs(protos: Array, present: Array, weights: Array,
                    renormalize: bool = True) -> tuple[Array, Array]:
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


def contrastive(source: Array, target: Array, present: Array, *,
                temperature: float, margin: float) -> Array:
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


def mmd_rbf(source: Array, target: Array, kernel_num: int = 5,
            kernel_mul: float = 2.0) -> Array:
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
  k = sum(jnp.exp(-d / (bw * kernel_mul ** q)) for q in range(kernel_num))
  c = source.shape[0]
  return jnp.mean(k[:c, :c] + k[c:, c:] - k[:c, c:] - k[c:, :c])
