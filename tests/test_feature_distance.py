"""The ImageNet feature distance (DAFormer's FD): the label downscaling and
the masked distance against a PyTorch restatement of the released
functions, its gradient, the frozen encoder in the train state and the
reference encoding of the multi-resolution model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dastc_jax.method import feature_distance as fd


def _torch_downscale(gt, factor, min_ratio, n_classes, ignore=255):
  """The released ``downscale_label_ratio``, restated ([B, H, W] in)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  out = torch.as_tensor(gt, dtype=torch.int64)[:, None].clone()
  out[out == ignore] = n_classes
  out = F.one_hot(out.squeeze(1), num_classes=n_classes + 1)
  out = out.permute(0, 3, 1, 2).float()
  out = F.avg_pool2d(out, kernel_size=factor)
  ratio, out = torch.max(out, dim=1, keepdim=True)
  out[out == n_classes] = ignore
  out[ratio < min_ratio] = ignore
  return out[:, 0].numpy()


def _torch_masked_dist(f1, f2, mask):
  import torch  # pylint: disable=g-import-not-at-top

  a = torch.as_tensor(np.moveaxis(f1, -1, 1))
  b = torch.as_tensor(np.moveaxis(f2, -1, 1))
  d = torch.norm(a - b, dim=1, p=2)
  return float(torch.mean(d[torch.as_tensor(mask)]))


def _labels(seed, shape=(2, 64, 96), classes=6, block=8, noise=0.2):
  rng = np.random.default_rng(seed)
  # Blocks of one class with some noise and ignored pixels, so that cells
  # fall on both sides of the ratio.
  b, h, w = shape
  coarse = rng.integers(0, classes, (b, -(-h // block), -(-w // block)))
  lab = np.repeat(np.repeat(coarse, block, axis=1), block, axis=2)
  lab = lab[:, :h, :w]
  flip = rng.random(shape) < noise
  lab = np.where(flip, rng.integers(0, classes, shape), lab)
  lab[rng.random(shape) < 0.05] = 255
  return lab.astype(np.uint8)


@pytest.mark.parametrize('factor', [8, 16, 32])
def test_downscale_label_ratio_matches_the_released_function(factor):
  # 100: a remainder the pooling drops; noise near the ratio's edge.
  lab = _labels(0, (2, 64, 100), block=factor, noise=0.25)
  got = np.asarray(fd.downscale_label_ratio(jnp.asarray(lab), factor, 0.75, 6))
  want = _torch_downscale(lab, factor, 0.75, 6)
  np.testing.assert_array_equal(got, want)
  assert (got != 255).any() and (got == 255).any()


def test_masked_distance_matches_the_released_one_and_its_gradient():
  rng = np.random.default_rng(1)
  lab = _labels(2, (2, 64, 96), block=16)
  f1 = rng.normal(size=(2, 4, 6, 5)).astype(np.float32)
  f2 = rng.normal(size=(2, 4, 6, 5)).astype(np.float32)
  classes = (1, 4)
  cells = _torch_downscale(lab, 16, 0.75, 6)
  mask = np.isin(cells, classes)
  assert 0 < mask.sum() < mask.size
  loss, share = fd.feature_distance(
      jnp.asarray(f1), jnp.asarray(f2), jnp.asarray(lab), classes, 0.75, 6
  )
  np.testing.assert_allclose(
      float(loss), _torch_masked_dist(f1, f2, mask), rtol=1e-5
  )
  assert float(share) == pytest.approx(mask.mean())
  g_student, g_ref = jax.grad(
      lambda a, b: fd.feature_distance(
          a, b, jnp.asarray(lab), classes, 0.75, 6
      )[0],
      argnums=(0, 1),
  )(jnp.asarray(f1), jnp.asarray(f2))
  moved = np.abs(np.asarray(g_student)).sum(-1) > 0
  np.testing.assert_array_equal(moved, mask)  # only the counted cells
  assert not np.asarray(g_ref).any()  # the reference is frozen


def test_empty_mask_and_equal_features_give_zero_and_finite_gradients():
  lab = np.full((1, 32, 32), 3, np.uint8)
  f = jnp.ones((1, 2, 2, 4))
  grad = jax.grad(
      lambda a: fd.feature_distance(a, f, jnp.asarray(lab), (5,), 0.75, 6)[0]
  )
  assert (
      float(fd.feature_distance(f, f, jnp.asarray(lab), (5,), 0.75, 6)[0]) == 0
  )
  assert not np.asarray(grad(f)).any()
  # Counted cells, student equal to the reference: 0, and no NaN from the
  # norm's gradient at 0.
  grad3 = jax.grad(
      lambda a: fd.feature_distance(a, f, jnp.asarray(lab), (3,), 0.75, 6)[0]
  )
  assert np.isfinite(np.asarray(grad3(f))).all()
  with pytest.raises(ValueError, match='whole cells'):
    fd.feature_distance(
        jnp.ones((1, 3, 4, 4)), jnp.ones((1, 3, 4, 4)), lab, (3,), 0.75, 6
    )


def test_hrda_state_holds_the_start_encoder_and_the_reference_encoding():
  """``configs/gta5_hrda.py:smoke``: the train state's frozen encoder is a
  copy of the backbone as initialised; the reference encoding is the
  context pass's last stage in evaluation mode."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs import gta5_hrda  # pylint: disable=g-import-not-at-top
  from dastc_jax.models import hrda  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import state as state_lib  # pylint: disable=g-import-not-at-top

  c = gta5_hrda.get_config('smoke')
  assert c.dastc.feature_distance.weight == 0.005
  assert 'truck' in c.dastc.feature_distance.classes
  sizes = {'batch': 2, 'source': (64, 64), 'target': (32, 48)}
  graphdef, state, _ = state_lib.create_train_state(c, sizes=sizes)
  frozen = state.imagenet_encoder
  jax.tree.map(
      np.testing.assert_array_equal, frozen['params'], state.params['backbone']
  )
  # Own buffers (the state is donated to the step leaf by leaf).
  a = jax.tree.leaves(frozen['params'])[0]
  b = jax.tree.leaves(state.params['backbone'])[0]
  assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
  model = nnx.merge(graphdef, state.params, state.batch_stats)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  ref = model.reference_encoding(x)
  ctx = hrda.resize_half_pixel(x, (32, 32))
  want = model.encode(ctx, False, None)['c4']
  np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-6)
  assert ref.shape[1:3] == (1, 1)  # 64 px per cell: it tiles the crop
  # Off: no copy.
  c.dastc.feature_distance.weight = 0.0
  _, state, _ = state_lib.create_train_state(c, sizes=sizes)
  assert state.imagenet_encoder is None
