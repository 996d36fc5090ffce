"""RAFT's all-pairs correlation pyramid and its windowed lookup.

Pure functions on NHWC arrays. The lookup samples, for every pixel of frame
1, a (2r+1) x (2r+1) window of each pyramid level around the pixel's current
match in frame 2, bilinearly with zero outside the map (what torch's
``grid_sample(align_corners=True, padding_mode='zeros')`` does on pixel
coordinates). All points of one window share the same fractional offset, so
a window is read as one (2r+2) x (2r+2) block of integer positions (a slice
of the zero-padded level, cheaper on XLA:CPU than a gather of single
elements) and four weighted shifts of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pyramid(fmap1: jax.Array, fmap2: jax.Array, levels: int) -> list[jax.Array]:
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
  # Scaling the [B, hw, C] features, not the [B, hw, hw] products, saves a
  # pass over the largest array.
  corr = jnp.einsum(
      'bqc,bkc->bqk',
      (fmap1 / jnp.sqrt(jnp.float32(c))).reshape(b, h * w, c),
      fmap2.reshape(b, h * w, c),
  )
  corr = corr.reshape(b, h * w, h, w)
  out = [corr]
  for _ in range(levels - 1):
    hh, ww = corr.shape[2] // 2, corr.shape[3] // 2
    # Pairs of rows, then pairs of columns (on XLA:CPU faster than one
    # mean over a [.., hh, 2, ww, 2] view).
    rows = corr[:, :, : 2 * hh, : 2 * ww].reshape(b, h * w, hh, 2, 2 * ww)
    rows = rows.sum(axis=3)
    corr = rows.reshape(b, h * w, hh, ww, 2).sum(axis=-1) * 0.25
    out.append(corr)
  return out


def _margin(radius: int) -> int:
  """Zero rows/columns on each side of a padded level: any window that
  overlaps the map then lies inside the padded map."""
  return 2 * radius + 1


def pad_levels(levels: list[jax.Array], radius: int) -> list[jax.Array]:
  """Zero-pads every pyramid level for :func:`lookup` (once per pair; the
  levels are the same in every iteration).

  Args:
    levels: the output of :func:`pyramid`, [B, N, h_l, w_l] each.
    radius: window radius r.

  Returns:
    [B, N, h_l + 2m, w_l + 2m] each, m = 2r + 1.
  """
  m = _margin(radius)
  return [jnp.pad(corr, ((0, 0), (0, 0), (m, m), (m, m))) for corr in levels]


def _window(padded: jax.Array, centre: jax.Array, radius: int) -> jax.Array:
  """Bilinear (2r+1)^2 window of one level around ``centre``.

  Args:
    padded: [B, N, h_l + 2m, w_l + 2m] one level from :func:`pad_levels`
      (N = query pixels).
    centre: [B, N, 2] (x, y) in this level's pixel units.
    radius: r.

  Returns:
    [B, N, (2r+1)^2], ordered x offset major, y offset minor (RAFT's order).
  """
  m, side = _margin(radius), 2 * radius + 2
  hl, wl = padded.shape[2] - 2 * m, padded.shape[3] - 2 * m
  base = jnp.floor(centre)
  frac = centre - base  # [B, N, 2]
  base = base.astype(jnp.int32)
  x0 = base[..., 0] - radius  # [B, N] first column of the window
  y0 = base[..., 1] - radius
  # One (2r+2)^2 block per query, read as a slice of the padded map. A
  # window that misses the map is clamped into it here and zeroed below.
  sy = jnp.clip(y0 + m, 0, hl + 2 * m - side)
  sx = jnp.clip(x0 + m, 0, wl + 2 * m - side)
  block = lambda c, y, x: jax.lax.dynamic_slice(c, (y, x), (side, side))
  values = jax.vmap(jax.vmap(block))(padded, sy, sx)  # [B, N, side, side]
  offsets = jnp.arange(side, dtype=jnp.int32)
  ys = y0[..., None] + offsets  # [B, N, side]
  xs = x0[..., None] + offsets
  inside = ((ys >= 0) & (ys < hl))[..., :, None] & ((xs >= 0) & (xs < wl))[
      ..., None, :
  ]  # [B, N, y, x]
  values = jnp.where(inside, values, 0.0)
  fx = frac[..., 0, None, None]
  fy = frac[..., 1, None, None]
  window = (1 - fy) * (
      (1 - fx) * values[..., :-1, :-1] + fx * values[..., :-1, 1:]
  ) + fy * ((1 - fx) * values[..., 1:, :-1] + fx * values[..., 1:, 1:])
  # window[e, d]: y offset e, x offset d -> RAFT flattens (x, y).
  return jnp.swapaxes(window, -1, -2).reshape(window.shape[:2] + (-1,))


def lookup(
    padded_levels: list[jax.Array], coords: jax.Array, radius: int
) -> jax.Array:
  """Correlation features of every pixel at its current match ``coords``.

  Args:
    padded_levels: the pyramid after :func:`pad_levels` with this radius.
    coords: [B, h, w, 2] (x, y) positions in frame 2, in 1/8-resolution
      pixels.
    radius: window radius r.

  Returns:
    [B, h, w, levels * (2r+1)^2] features, level major.
  """
  b, h, w, _ = coords.shape
  centre = coords.reshape(b, h * w, 2)
  out = []
  for level, padded in enumerate(padded_levels):
    out.append(_window(padded, centre / 2**level, radius))
  return jnp.concatenate(out, axis=-1).reshape(b, h, w, -1)
