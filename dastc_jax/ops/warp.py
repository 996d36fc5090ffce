"""Optical-flow warping and align-corners resizing in pure JAX.

Flow convention (docs/reference_code.md, "Optical flow"): a flow lives on frame
t's grid and points
into frame t-1, ``I_t(p) ~= I_{t-1}(p + F(p))``, channel 0 = dx (columns),
channel 1 = dy (rows), in pixels of the grid it is stored on.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _linear_taps(n_in: int, n_out: int):
  """Source taps and weights of a 1-D align-corners linear resize."""
  if n_out == 1 or n_in == 1:
    src = np.zeros((n_out,), np.float64)
  else:
    src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
  i0 = np.clip(np.floor(src).astype(np.int32), 0, max(n_in - 2, 0))
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = (src - i0).astype(np.float32)
  return i0, i1, w1


def _resize_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
  n_in = x.shape[axis]
  if n_in == n_out:
    return x
  i0, i1, w1 = _linear_taps(n_in, n_out)
  shape = [1] * x.ndim
  shape[axis] = n_out
  w1 = jnp.asarray(w1.reshape(shape), dtype=x.dtype)
  a = jnp.take(x, i0, axis=axis)
  b = jnp.take(x, i1, axis=axis)
  return a + (b - a) * w1


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize with ``align_corners=True`` (PyTorch semantics).

  Args:
    x: ``[..., H, W, C]`` array.
    size: target ``(H', W')``.

  Returns:
    ``[..., H', W', C]`` array of the same dtype.
  """
  h_axis, w_axis = x.ndim - 3, x.ndim - 2
  x = _resize_axis(x, h_axis, int(size[0]))
  return _resize_axis(x, w_axis, int(size[1]))


def resize_flow(
    flow: jax.Array, size: Sequence[int], per_axis_scale: bool = False
) -> jax.Array:
  """Resizes a flow field and rescales its magnitudes (docs/reference_code.md,
  "Optical flow").

  The reference multiplies *both* components by the height ratio ``H'/H``;
  ``per_axis_scale=True`` scales dx by ``W'/W`` and dy by ``H'/H`` instead.
  The two agree whenever the aspect ratio is kept.

  Args:
    flow: ``[..., H, W, 2]`` flow in pixels of its grid.
    size: target ``(H', W')``.
    per_axis_scale: scale each component by its own axis ratio.

  Returns:
    ``[..., H', W', 2]`` flow in pixels of the new grid.
  """
  h, w = flow.shape[-3], flow.shape[-2]
  if (h, w) == tuple(size):
    return flow
  out = resize_bilinear(flow, size)
  sy = size[0] / h
  sx = size[1] / w if per_axis_scale else sy
  return out * jnp.asarray([sx, sy], dtype=flow.dtype)


def warp(x: jax.Array, flow: jax.Array) -> jax.Array:
  """Bilinear backward warp with clamped taps (NVIDIA Resample2d).

  ``out[b, y, x] = bilinear(x_in[b], (y + F_y, x + F_x))`` where each of the
  four integer taps is clamped into the image, while the weights use the
  unclamped fractional part. This equals ``grid_sample(..., padding_mode=
  'border', align_corners=True)`` and ``map_coordinates(order=1,
  mode='nearest')``.

  Args:
    x: ``[B, H, W, C]`` values on the source (key-frame) grid.
    flow: ``[B, H, W, 2]`` flow on the output grid, pointing into ``x``.

  Returns:
    ``[B, H, W, C]`` warped values.
  """
  b, h, w, c = x.shape
  if flow.shape != (b, h, w, 2):
    raise ValueError(
        f'warp: flow shape {flow.shape} does not match the '
        f'values {x.shape}; expected {(b, h, w, 2)}.'
    )
  flow = flow.astype(jnp.float32)
  gy, gx = jnp.meshgrid(
      jnp.arange(h, dtype=jnp.float32),
      jnp.arange(w, dtype=jnp.float32),
      indexing='ij',
  )
  px = gx[None] + flow[..., 0]  # [B, H, W]
  py = gy[None] + flow[..., 1]
  x0 = jnp.floor(px)
  y0 = jnp.floor(py)
  ax = (px - x0)[..., None].astype(x.dtype)
  ay = (py - y0)[..., None].astype(x.dtype)
  x0i = x0.astype(jnp.int32)
  y0i = y0.astype(jnp.int32)
  xl = jnp.clip(x0i, 0, w - 1)
  xr = jnp.clip(x0i + 1, 0, w - 1)
  yt = jnp.clip(y0i, 0, h - 1)
  yb = jnp.clip(y0i + 1, 0, h - 1)
  flat = x.reshape(b, h * w, c)

  def tap(yy, xx):
    idx = (yy * w + xx).reshape(b, h * w, 1)
    return jnp.take_along_axis(flat, idx, axis=1).reshape(b, h, w, c)

  top = tap(yt, xl) * (1 - ax) + tap(yt, xr) * ax
  bottom = tap(yb, xl) * (1 - ax) + tap(yb, xr) * ax
  return top * (1 - ay) + bottom * ay


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest resize of ``[B, H, W, ...]`` maps (PyTorch ``nearest``: source
  index ``floor(i * in / out)``), e.g. labels to the score grid."""
  h, w = x.shape[1], x.shape[2]
  rows = np.minimum(np.floor(np.arange(size[0]) * h / size[0]), h - 1)
  cols = np.minimum(np.floor(np.arange(size[1]) * w / size[1]), w - 1)
  x = jnp.take(x, rows.astype(np.int32), axis=1)
  return jnp.take(x, cols.astype(np.int32), axis=2)
