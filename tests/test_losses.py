"""Cross-entropy with ignore labels on hand-computed cases."""

import jax.numpy as jnp
import numpy as np

from dastc_jax.method import losses


def test_cross_entropy_hand_values_and_ignore():
  # Two pixels with p(class 1) = 3/4 and one pixel with p(class 0) = 1/2.
  logits = jnp.asarray(
      [[[[0.0, np.log(3.0)], [0.0, np.log(3.0)], [0.0, 0.0], [5.0, -5.0]]]]
  )  # [1, 1, 4, 2]
  labels = jnp.asarray([[[1, 1, 0, 255]]])
  expected = (2 * -np.log(0.75) - np.log(0.5)) / 3
  np.testing.assert_allclose(
      float(losses.cross_entropy(logits, labels)), expected, rtol=1e-6
  )


def test_cross_entropy_without_valid_pixels_is_zero():
  logits = jnp.ones((2, 3, 3, 4))
  labels = jnp.full((2, 3, 3), 255)
  assert float(losses.cross_entropy(logits, labels)) == 0.0


def test_upsampled_cross_entropy_uses_label_resolution():
  # Constant logits favouring class 2: upsampling keeps them constant.
  logits = jnp.zeros((1, 3, 5, 3)).at[..., 2].set(np.log(2.0))
  labels = jnp.full((1, 12, 20), 2).at[0, :6].set(0)
  p2, p0 = 2 / 4, 1 / 4
  expected = 0.5 * -np.log(p2) + 0.5 * -np.log(p0)
  np.testing.assert_allclose(
      float(losses.upsampled_cross_entropy(logits, labels)), expected, rtol=1e-5
  )


def test_weighted_cross_entropy_weights_examples_not_the_mean():
  """Per-example weights scale each clip's pixel losses; the mean still
  divides by the valid pixels (DAFormer's weighted pseudo-label loss)."""
  logits = jnp.log(jnp.array([[[[0.8, 0.2]]], [[[0.4, 0.6]]]]))  # [2,1,1,2]
  labels = jnp.array([[[0]], [[1]]])
  nll = -np.log([0.8, 0.6])
  got = losses.cross_entropy(logits, labels, weights=jnp.array([0.5, 0.0]))
  np.testing.assert_allclose(float(got), 0.5 * nll[0] / 2, rtol=1e-6)
  full = losses.cross_entropy(logits, labels, weights=jnp.ones(2))
  np.testing.assert_allclose(
      float(full), float(losses.cross_entropy(logits, labels)), rtol=1e-6
  )


def test_pseudo_label_quality_is_the_confident_share_per_clip():
  from dastc_jax.method import pseudo_labels  # pylint: disable=g-import-not-at-top

  conf = jnp.array([[[0.99, 0.5], [0.97, 0.968]], [[0.1, 0.2], [0.3, 0.4]]])
  q = pseudo_labels.quality({'conf_lo': conf}, 0.968)
  np.testing.assert_allclose(np.asarray(q), [0.75, 0.0])
