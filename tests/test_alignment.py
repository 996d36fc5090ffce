"""Category-aware spatio-temporal alignment."""

import jax
from jax.sharding import AxisType
import jax.numpy as jnp
import numpy as np

from dastc_jax.method import alignment


def _protos(seed, c=5, d=8):
  return jax.random.normal(jax.random.key(seed), (c, d))


def test_class_prototypes_are_masked_means():
  feats = jnp.asarray([[[[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]]]])  # [1,1,3,2]
  labels = jnp.asarray([[[0, 0, 2]]])
  protos, present = alignment.class_prototypes(feats, labels, 3, 1)
  np.testing.assert_allclose(np.asarray(protos), [[2, 0], [0, 0], [0, 5]])
  np.testing.assert_array_equal(np.asarray(present), [True, False, True])
  _, present = alignment.class_prototypes(feats, labels, 3, 2)
  np.testing.assert_array_equal(np.asarray(present), [True, False, False])


def test_contrastive_is_low_when_aligned_and_separated():
  present = jnp.ones((5,), bool)
  eye = jnp.eye(5, 8)
  aligned = alignment.contrastive(
      eye, eye, present, temperature=0.1, margin=0.2
  )
  swapped = alignment.contrastive(
      eye, eye[::-1], present, temperature=0.1, margin=0.2
  )
  collapsed = alignment.contrastive(
      eye, jnp.ones((5, 8)), present, temperature=0.1, margin=0.2
  )
  assert float(aligned) < 0.01 < float(collapsed) < float(swapped)


def test_gradient_pulls_same_class_prototypes_together():
  src, tgt = _protos(0), _protos(1)
  present = jnp.ones((5,), bool)
  loss = lambda t: alignment.contrastive(
      src, t, present, temperature=0.1, margin=0.2
  )
  cos = (
      lambda a, b: np.sum(a * b, -1)
      / np.linalg.norm(a, axis=-1)
      / np.linalg.norm(b, axis=-1)
  )
  before = cos(np.asarray(src), np.asarray(tgt))
  moved = tgt - 0.5 * jax.grad(loss)(tgt)
  after = cos(np.asarray(src), np.asarray(moved))
  assert float(loss(moved)) < float(loss(tgt))
  assert np.mean(after) > np.mean(before)


def test_an_absent_class_changes_nothing():
  src, tgt = _protos(2), _protos(3)
  present = jnp.asarray([True, True, False, True, True])
  base = alignment.contrastive(src, tgt, present, temperature=0.1, margin=0.2)
  src2 = src.at[2].set(100.0)  # whatever an absent class holds
  tgt2 = tgt.at[2].set(-7.0)
  again = alignment.contrastive(
      src2, tgt2, present, temperature=0.1, margin=0.2
  )
  np.testing.assert_allclose(float(again), float(base), rtol=1e-6)
  grad = jax.grad(
      lambda t: alignment.contrastive(
          src, t, present, temperature=0.1, margin=0.2
      )
  )(tgt)
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(np.asarray(grad[2]), 0.0)
  none = alignment.contrastive(
      src, tgt, jnp.zeros((5,), bool), temperature=0.1, margin=0.2
  )
  assert float(none) == 0.0


def test_cosine_pull_keeps_pulling_where_the_contrastive_loss_saturates():
  """Classes already far apart, each at cosine 0.8 to its source mean: the
  contrastive loss is nearly 0 and its gradient a tenth of the pull's (at
  equal weights), the pull still has the 0.2 gap to close and its step
  raises every class's cosine."""
  c, d = 4, 8
  src = jnp.eye(c, d)
  side = jnp.eye(c, d, k=c)  # orthogonal to every source row
  tgt = 0.8 * src + 0.6 * side  # unit rows, cos(t_k, s_k) = 0.8
  present = jnp.ones((c,), bool)
  con = lambda t: alignment.contrastive(
      src, t, present, temperature=0.1, margin=0.2
  )
  pull = lambda t: alignment.cosine_pull(src, t, present)
  assert float(con(tgt)) < 0.01
  assert float(jnp.abs(jax.grad(con)(tgt)).max()) < 0.1 * float(
      jnp.abs(jax.grad(pull)(tgt)).max()
  )
  np.testing.assert_allclose(
      float(alignment.cosine_pull(src, tgt, present)), 0.2, rtol=1e-6
  )
  moved = tgt - 0.5 * jax.grad(pull)(tgt)
  cos = np.sum(np.asarray(moved) * np.asarray(src), -1) / np.linalg.norm(
      np.asarray(moved), axis=-1
  )
  assert np.all(cos > 0.84)  # from 0.8
  # Absent classes neither count nor get a gradient; none present: 0.
  some = jnp.asarray([True, False, True, True])
  np.testing.assert_allclose(
      float(alignment.cosine_pull(src, tgt, some)), 0.2, rtol=1e-6
  )
  grad = jax.grad(lambda t: alignment.cosine_pull(src, t, some))(tgt)
  np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)
  assert float(alignment.cosine_pull(src, tgt, jnp.zeros((c,), bool))) == 0.0


def test_temporal_weights_favour_the_more_certain_pair():
  w = alignment.temporal_weights(jnp.asarray([0.2, 0.6]), 0.1, True)
  assert float(w[0]) > float(w[1]) and abs(float(w.sum()) - 1) < 1e-6
  u = alignment.temporal_weights(jnp.asarray([0.2, 0.6]), 0.1, False)
  np.testing.assert_allclose(np.asarray(u), [0.5, 0.5])
  logits = jnp.zeros((1, 2, 2, 4))
  np.testing.assert_allclose(
      float(alignment.mean_entropy(logits)), 1.0, rtol=1e-6
  )
  protos = jnp.stack([jnp.ones((3, 2)), 3 * jnp.ones((3, 2))])
  present = jnp.asarray([[True, True, False], [True, False, False]])
  out, pres = alignment.aggregate_pairs(
      protos, present, jnp.asarray([0.75, 0.25])
  )
  np.testing.assert_allclose(np.asarray(out[0]), 1.5)  # 0.75 * 1 + 0.25 * 3
  np.testing.assert_allclose(np.asarray(out[1]), 1.0)  # only pair 0 has it
  np.testing.assert_array_equal(np.asarray(pres), [True, True, False])
  # The reference's plain weighted sum with zero rows (uniform weights).
  ref, _ = alignment.aggregate_pairs(
      protos * present[..., None],
      present,
      jnp.asarray([0.5, 0.5]),
      renormalize=False,
  )
  np.testing.assert_allclose(np.asarray(ref[0]), 2.0)  # 0.5 * 1 + 0.5 * 3
  np.testing.assert_allclose(np.asarray(ref[1]), 0.5)  # half of pair 0's
  np.testing.assert_allclose(np.asarray(ref[2]), 0.0)


def test_zero_prototype_rows_have_finite_gradients():
  src, tgt = _protos(3), _protos(4)
  tgt = tgt.at[2].set(0.0)  # a class absent from the target: a zero row
  present = jnp.asarray([True, True, False, True, True])
  loss = lambda s, t: alignment.contrastive(
      s, t, present, temperature=0.1, margin=0.2
  )
  gs, gt = jax.grad(loss, argnums=(0, 1))(src, tgt)
  assert np.all(np.isfinite(np.asarray(gs)))
  assert np.all(np.isfinite(np.asarray(gt)))
  np.testing.assert_array_equal(np.asarray(gt[2]), 0.0)
  assert float(jnp.abs(gt[0]).sum()) > 1e-4


def test_mmd_matches_the_reference_formula():
  src, tgt = _protos(4, c=3, d=4), _protos(5, c=3, d=4)
  z = np.concatenate([np.asarray(src), np.asarray(tgt)], 0).astype(np.float64)
  d = ((z[:, None] - z[None]) ** 2).sum(-1)
  bw = d.sum() / (36 - 6) / 2**2
  k = sum(np.exp(-d / (bw * 2**q)) for q in range(5))
  ref = np.mean(k[:3, :3] + k[3:, 3:] - k[:3, 3:] - k[3:, :3])
  np.testing.assert_allclose(float(alignment.mmd_rbf(src, tgt)), ref, rtol=1e-5)
  assert float(alignment.mmd_rbf(src, src)) < 1e-6


def test_alignment_is_the_same_on_1_and_4_devices():
  k = jax.random.split(jax.random.key(7), 2)
  feats = jax.random.normal(k[0], (4, 6, 7, 8))
  labels = jax.random.randint(k[1], (4, 6, 7), 0, 5)

  def loss(f, lab):
    ps, p1 = alignment.class_prototypes(f, lab, 5, 3)
    pt, p2 = alignment.class_prototypes(f[::-1] * 0.5, lab[::-1], 5, 3)
    return alignment.contrastive(ps, pt, p1 & p2, temperature=0.1, margin=0.2)

  values = []
  for n in (1, 4):
    mesh = jax.make_mesh(
        (n,), ('data',), axis_types=(AxisType.Auto,), devices=jax.devices()[:n]
    )
    sh = jax.NamedSharding(mesh, jax.P('data'))
    values.append(
        float(
            jax.jit(loss)(jax.device_put(feats, sh), jax.device_put(labels, sh))
        )
    )
  # Sharded sums reduce in a different order: float32 rounding only.
  np.testing.assert_allclose(values[1], values[0], rtol=1e-5)
  assert values[0] > 0.01


def _view(feat, label, rel):
  return {
      'feat': jnp.asarray(feat, jnp.float32),
      'label': jnp.asarray(label),
      'reliability': jnp.asarray(rel, jnp.float32),
  }


def test_a_class_seen_only_in_frame_t1_gets_a_prototype():
  """Frame t has class 0 only; frame t-1 also has class 1, which therefore
  gets frame t-1's mean feature as its prototype."""
  feat_t = np.zeros((1, 2, 2, 3))
  feat_t1 = np.zeros((1, 2, 2, 3))
  feat_t1[0, 1] = [0.0, 4.0, 0.0]  # class 1 in t-1's bottom row
  views = [
      _view(feat_t + 1.0, [[[0, 0], [0, 0]]], np.ones((1, 2, 2))),
      _view(feat_t1, [[[0, 0], [1, 1]]], np.ones((1, 2, 2))),
  ]
  protos, present, w = alignment.spatio_temporal_prototypes(
      views, 3, 1, 0.1, True
  )
  np.testing.assert_array_equal(np.asarray(present), [True, True, False])
  np.testing.assert_allclose(np.asarray(protos[1]), [0.0, 4.0, 0.0])
  np.testing.assert_allclose(np.asarray(w[:, 1]), [0.0, 1.0])
  np.testing.assert_allclose(np.asarray(w[:, 2]), [0.0, 0.0])
  # Class 0 is in both frames: equal reliability, equal weights.
  np.testing.assert_allclose(np.asarray(w[:, 0]), [0.5, 0.5])
  np.testing.assert_allclose(np.asarray(protos[0]), [0.5, 0.5, 0.5])


def test_weights_move_towards_the_more_reliable_frame_per_class():
  """Per class: class 0 is more reliable in frame t, class 1 in t-1."""
  label = [[[0, 1]]]
  views = [
      _view([[[[1.0], [1.0]]]], label, [[[0.9, 0.5]]]),
      _view([[[[3.0], [3.0]]]], label, [[[0.6, 0.8]]]),
  ]
  protos, _, w = alignment.spatio_temporal_prototypes(views, 2, 1, 0.1, True)
  w = np.asarray(w)
  assert w[0, 0] > 0.9 and w[1, 1] > 0.9  # softmax(r / 0.1)
  np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
      w[:, 0], jax.nn.softmax(jnp.asarray([9.0, 6.0])), rtol=1e-5
  )
  assert float(protos[0, 0]) < 1.2 and float(protos[1, 0]) > 2.8
  _, _, u = alignment.spatio_temporal_prototypes(views, 2, 1, 0.1, False)
  np.testing.assert_allclose(np.asarray(u), 0.5)
  # Gradients reach the features, never the reliability.
  g = jax.grad(
      lambda r: jnp.sum(
          alignment.spatio_temporal_prototypes(
              [dict(views[0], reliability=r), views[1]], 2, 1, 0.1, True
          )[0]
      )
  )(views[0]['reliability'])
  np.testing.assert_array_equal(np.asarray(g), 0.0)
