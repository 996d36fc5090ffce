"""Warp and resize ops against scipy and analytic flows."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from dastc_jax.data import transforms
from dastc_jax.ops import warp as warp_ops


def _scipy_warp(img, flow):
  h, w = flow.shape[:2]
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  coords = [yy + flow[..., 1], xx + flow[..., 0]]
  return np.stack(
      [
          scipy.ndimage.map_coordinates(
              img[..., c].astype(np.float64), coords, order=1, mode='nearest'
          )
          for c in range(img.shape[-1])
      ],
      -1,
  )


def test_warp_matches_scipy_map_coordinates_including_borders():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(2, 13, 17, 3)).astype(np.float32)
  # Flows up to +-8 px push many taps outside the image (clamped).
  flow = rng.uniform(-8, 8, size=(2, 13, 17, 2)).astype(np.float32)
  out = np.asarray(warp_ops.warp(jnp.asarray(img), jnp.asarray(flow)))
  for b in range(2):
    ref = _scipy_warp(img[b], flow[b])
    np.testing.assert_allclose(out[b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dx,dy', [(3, 0), (0, -2), (-4, 5)])
def test_integer_translation_is_exact_away_from_borders(dx, dy):
  rng = np.random.default_rng(1)
  img = rng.integers(0, 255, size=(1, 20, 24, 2)).astype(np.float32)
  flow = np.zeros((1, 20, 24, 2), np.float32)
  flow[..., 0], flow[..., 1] = dx, dy
  out = np.asarray(warp_ops.warp(jnp.asarray(img), jnp.asarray(flow)))
  # out[y, x] = img[y + dy, x + dx] wherever that pixel exists.
  ys = slice(max(0, -dy), 20 - max(0, dy))
  xs = slice(max(0, -dx), 24 - max(0, dx))
  shifted = img[0, ys.start + dy : ys.stop + dy, xs.start + dx : xs.stop + dx]
  np.testing.assert_array_equal(out[0, ys, xs], shifted)
  # Outside, taps are clamped to the border (Resample2d semantics).
  if dx > 0:
    np.testing.assert_array_equal(
        out[0, ys, -1], img[0, ys.start + dy : ys.stop + dy, -1]
    )


def test_warp_rejects_mismatched_flow():
  with pytest.raises(ValueError, match='flow shape'):
    warp_ops.warp(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5, 2)))


def test_resize_bilinear_align_corners_on_a_linear_ramp():
  h, w, nh, nw = 5, 7, 13, 9
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  ramp = (2.0 * yy - 3.0 * xx)[None, ..., None]
  out = np.asarray(warp_ops.resize_bilinear(jnp.asarray(ramp), (nh, nw)))
  # align_corners: output pixel i samples input i * (in-1) / (out-1).
  sy = np.arange(nh) * (h - 1) / (nh - 1)
  sx = np.arange(nw) * (w - 1) / (nw - 1)
  expected = 2.0 * sy[:, None] - 3.0 * sx[None, :]
  np.testing.assert_allclose(out[0, ..., 0], expected, atol=1e-4)
  # Corners are preserved exactly.
  assert out[0, 0, 0, 0] == ramp[0, 0, 0, 0]
  assert out[0, -1, -1, 0] == ramp[0, -1, -1, 0]


def test_resize_flow_scales_magnitudes_by_the_height_ratio():
  flow = np.zeros((1, 64, 128, 2), np.float32)
  flow[..., 0], flow[..., 1] = 4.0, -2.0
  out = np.asarray(warp_ops.resize_flow(jnp.asarray(flow), (9, 17)))
  # Reference rule: both components times H'/H (docs/reference_code.md, "Optical
  # flow").
  np.testing.assert_allclose(out[..., 0], 4.0 * 9 / 64, rtol=1e-6)
  np.testing.assert_allclose(out[..., 1], -2.0 * 9 / 64, rtol=1e-6)
  per_axis = np.asarray(
      warp_ops.resize_flow(jnp.asarray(flow), (9, 17), per_axis_scale=True)
  )
  np.testing.assert_allclose(per_axis[..., 0], 4.0 * 17 / 128, rtol=1e-6)
  np.testing.assert_allclose(per_axis[..., 1], -2.0 * 9 / 64, rtol=1e-6)


def test_host_flow_resize_matches_device_resize():
  rng = np.random.default_rng(2)
  flow = rng.normal(size=(30, 50, 2)).astype(np.float32) * 5
  host = transforms.resize_flow_np(flow, (72, 128))
  dev = np.asarray(warp_ops.resize_flow(jnp.asarray(flow[None]), (72, 128)))
  np.testing.assert_allclose(host, dev[0], rtol=1e-5, atol=1e-5)
