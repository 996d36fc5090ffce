"""Image normalisation for the Caffe-style DeepLab input
(docs/reference_code.md, "Layouts and preprocessing")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Caffe ImageNet mean in BGR order; no std division (range ~[-123, 151]).
BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)


def normalize(rgb: jax.Array, dtype=jnp.float32) -> jax.Array:
  """RGB in [0, 255] (uint8 or float) -> BGR minus the Caffe mean.

  Args:
    rgb: ``[..., 3]`` RGB values in [0, 255].
    dtype: output dtype.

  Returns:
    ``[..., 3]`` BGR, mean subtracted.
  """
  bgr = rgb[..., ::-1].astype(jnp.float32)
  return (bgr - jnp.asarray(BGR_MEAN, jnp.float32)).astype(dtype)
