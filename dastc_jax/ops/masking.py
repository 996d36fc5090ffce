"""Block masks of masked image consistency (MIC).

A mask is drawn on a coarse grid of ``block``-pixel cells (``round(H /
block) x round(W / block)``, as the released MIC code rounds): a cell is kept
when a uniform draw exceeds ``ratio``, so about ``1 - ratio`` of the image
stays visible. The grid is resized to the image with nearest-neighbour
sampling; masked pixels of a normalised image become 0, the mean colour.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dastc_jax.ops import warp as warp_ops


def block_mask(
    key: jax.Array, shape: Sequence[int], block: int, ratio: float
) -> jax.Array:
  """A ``[B, H, W]`` float32 mask of 0/1 blocks (1: visible).

  Args:
    key: PRNG key.
    shape: ``(B, H, W)``.
    block: cell size in pixels (64 in MIC).
    ratio: the share of cells masked out, in expectation (0.7 in MIC).
  """
  b, h, w = (int(v) for v in shape)
  grid = (max(round(h / block), 1), max(round(w / block), 1))
  keep = jax.random.uniform(key, (b, *grid)) > ratio
  return warp_ops.resize_nearest(keep.astype(jnp.float32), (h, w))


def mask_clip(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Masks every frame of normalised clips ``[B, T, H, W, 3]`` with one
  ``[B, H, W]`` mask per clip."""
  return x * mask[:, None, :, :, None].astype(x.dtype)
