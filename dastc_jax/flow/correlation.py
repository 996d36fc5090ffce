"""RAFT's all-pairs correlation pyramid and its windowed lookup.

Pure functions on NHWC arrays. The lookup samples, for every pixel of frame
1, a (2r+1) x (2r+1) window of each pyramid level around the pixel's current
match in frame 2, bilinearly with zero outside the map (what torch's
``grid_sample(align_corners=True, padding_mode='zeros')`` does on pixel
coordinates). All points of one window share the same fractional offset, so
a window is read as one (2r+2) x (2r+2) gather of integer positions and
four weighted shifts of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pyramid(fmap1: jax.Array, fmap2: jax.Array,
            levels: int) -> list[jax.Array]:
  """Correlation volumes of every pixel pair, pooled ``levels - 1`` times.

  Args:
    fmap1: [B, h, w, C] features of frame 1.
    fmap2: [B, h, w, C] features of frame 2.
    levels: pyramid depth (RAFT: 4).

  Returns:
    ``levels`` arrays [B, h*w, h_l, w_l]: for each pixel of frame 1 its dot
    products with frame 2 (divided by sqrt(C)), average-pooled 2x2 per level
    (odd sizes drop the last row/column, as ``avg_pool2d`` does).
  """
  b, h, w, c = fmap1.shape
  corr = jnp.einsum('bqc,bkc->bqk', fmap1.reshape(b, h * w, c),
                    fmap2.reshape(b, h * w, c))
  corr = (corr / jnp.sqrt(jnp.float32(c))).reshape(b, h * w, h, w)
  out = [corr]
  for _ in range(levels - 1):
    hh, ww = corr.shape[2] // 2, corr.shape[3] // 2
    corr = corr[:, :, :2 * hh, :2 * ww].reshape(b, h * w, hh, 2, ww, 2)
    corr = corr.mean(axis=(3, 5))
    out.append(corr)
  return out


def _window(corr: jax.Array, centre: jax.Array, radius: int) -> jax.Array:
  """Bilinear (2r+1)^2 window of one level around ``centre``.

  Args:
    corr: [B, N, h_l, w_l] one pyramid level (N = query pixels).
    centre: [B, N, 2] (x, y) in this level's pixel units.
    radius: r.

  Returns:
    [B, N, (2r+1)^2], ordered x offset major, y offset minor (RAFT's order).
  """
  b, n, hl, wl = corr.shape
  base = jnp.floor(centre)
  frac = centre - base  # [B, N, 2]
  base = base.astype(jnp.int32)
  offsets = jnp.arange(-radius, radius + 2, dtype=jnp.int32)  # 2r+2
  xs = base[..., 0:1] + offsets  # [B, N, 2r+2]
  ys = base[..., 1:2] + offsets
  inside = (((ys >= 0) & (ys < hl))[..., :, None] &
            ((xs >= 0) & (xs < wl))[..., None, :])  # [B, N, y, x]
  index = (jnp.clip(ys, 0, hl - 1)[..., :, None] * wl +
           jnp.clip(xs, 0, wl - 1)[..., None, :])
  side = 2 * radius + 2
  values = jnp.take_along_axis(corr.reshape(b, n, hl * wl),
                               index.reshape(b, n, side * side), axis=-1)
  values = jnp.where(inside, values.reshape(b, n, side, side), 0.0)
  fx = frac[..., 0, None, None]
  fy = frac[..., 1, None, None]
  window = ((1 - fy) * ((1 - fx) * values[..., :-1, :-1] +
                        fx * values[..., :-1, 1:]) +
            fy * ((1 - fx) * values[..., 1:, :-1] + fx * values[..., 1:, 1:]))
  # window[e, d]: y offset e, x offset d -> RAFT flattens (x, y).
  return jnp.swapaxes(window, -1, -2).reshape(b, n, -1)


def lookup(levels: list[jax.Array], coords: jax.Array,
           radius: int) -> jax.Array:
  """Correlation features of every pixel at its current match ``coords``.

  Args:
    levels: the output of :func:`pyramid`.
    coords: [B, h, w, 2] (x, y) positions in frame 2, in 1/8-resolution
      pixels.
    radius: window radius r.

  Returns:
    [B, h, w, levels * (2r+1)^2] features, level major.
  """
  b, h, w, _ = coords.shape
  centre = coords.reshape(b, h * w, 2)
  out = []
  for level, corr in enumerate(levels):
    out.append(_window(corr, centre / 2**level, radius))
  return jnp.concatenate(out, axis=-1).reshape(b, h, w, -1)
