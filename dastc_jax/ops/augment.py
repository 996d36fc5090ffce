"""Strong photometric augmentation of target clips (TPS / DA-STC, §4.3).

Pure JAX, key in, arrays out. Every frame of one clip gets identical
parameters (the reference concatenates the two frames into one image for
this). Works on RGB in [0, 255] *before* the Caffe normalisation; the
reference's wrap-around of mean-subtracted values (docs/reference_code.md,
"Known defects") is
available as ``wrap_normalized_bug``.

Order (torchvision's ``RandomApply`` chain): Gaussian blur (p_blur) ->
colour jitter (p_jitter; brightness, contrast, saturation, hue in that fixed
order) -> random grayscale (p_gray).

The blur follows the input resolution: ``blur_sigma`` is given in pixels of
an image ``blur_reference_width`` wide and is scaled by ``W /
blur_reference_width`` for frames resized to ``W`` wide (:func:`blur_params`;
a random crop of such a frame keeps the frame's scale).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from dastc_jax.ops import image as image_ops

_GRAY = jnp.asarray([0.299, 0.587, 0.114])


def _gray(x: jax.Array) -> jax.Array:
  return jnp.sum(x * _GRAY, axis=-1, keepdims=True)


def _gaussian_blur(x: jax.Array, sigma: jax.Array, size: int) -> jax.Array:
  """Separable Gaussian blur with reflect padding. x: [T, H, W, 3]."""
  r = size // 2
  t = jnp.arange(-r, r + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (t / sigma) ** 2)
  k = k / jnp.sum(k)
  x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode='reflect')
  h, w = x.shape[1] - 2 * r, x.shape[2] - 2 * r
  x = sum(k[i] * x[:, i : i + h] for i in range(size))
  return sum(k[i] * x[:, :, i : i + w] for i in range(size))


def _rgb_to_hsv(x):
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = jnp.max(x, -1)
  minc = jnp.min(x, -1)
  v = maxc
  delta = maxc - minc
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1), 0.0)
  d = jnp.where(delta > 0, delta, 1.0)
  rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
  h = jnp.where(
      maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc)
  )
  h = jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)
  return h, s, v


def _hsv_to_rgb(h, s, v):
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = jnp.mod(i, 6).astype(jnp.int32)[..., None]
  choices = [
      jnp.stack(c, -1)
      for c in (
          (v, t, p),
          (q, v, p),
          (p, v, t),
          (p, q, v),
          (t, p, v),
          (v, p, q),
      )
  ]
  out = choices[0]
  for k in range(1, 6):
    out = jnp.where(i == k, choices[k], out)
  return out


def _jitter(x, key, cfg):
  """Colour jitter on [0, 1] RGB; statistics over the whole clip."""
  kb, kc, ks, kh = jax.random.split(key, 4)
  u = lambda k, a, lo=0.0: jax.random.uniform(
      k, (), minval=max(lo, 1 - a), maxval=1 + a
  )
  x = jnp.clip(x * u(kb, cfg.brightness), 0, 1)
  m = jnp.mean(_gray(x))
  x = jnp.clip((x - m) * u(kc, cfg.contrast) + m, 0, 1)
  g = _gray(x)
  x = jnp.clip((x - g) * u(ks, cfg.saturation) + g, 0, 1)
  if cfg.hue > 0:
    h, s, v = _rgb_to_hsv(x)
    dh = jax.random.uniform(kh, (), minval=-cfg.hue, maxval=cfg.hue)
    x = _hsv_to_rgb(jnp.mod(h + dh, 1.0), s, v)
  return x


def blur_params(
    cfg: ml_collections.ConfigDict,
    height: int,
    width: int,
    image_width: int | None = None,
) -> tuple[float, float, int]:
  """``(sigma_low, sigma_high, taps)`` of the blur for ``height x width``
  clips cut from frames ``image_width`` wide (default ``width``):
  ``blur_sigma`` scaled by ``image_width / blur_reference_width``; the
  kernel is ``blur_kernel`` taps, or with ``blur_kernel=0`` the
  ``2 * ceil(3 * sigma_high) + 1`` taps that hold the Gaussian to 3 sigma,
  never wider than the reflect padding allows (``2 * min(H, W) - 1``)."""
  scale = (image_width or width) / cfg.blur_reference_width
  lo, hi = cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale
  taps = cfg.blur_kernel or 2 * math.ceil(3 * hi) + 1
  return lo, hi, min(taps, 2 * min(height, width) - 1)


def augment_clip(
    key: jax.Array,
    clip: jax.Array,
    cfg: ml_collections.ConfigDict,
    image_width: int | None = None,
) -> jax.Array:
  """Augments one clip with one set of parameters.

  Args:
    key: PRNG key.
    clip: ``[T, H, W, 3]`` float RGB in [0, 1].
    cfg: ``dastc.strong_aug`` config.
    image_width: width of the resized frame the clip was cut from (the blur
      scale; default the clip's).

  Returns:
    ``[T, H, W, 3]`` in [0, 1].
  """
  k_blur, k_sigma, k_jit, k_jp, k_gray = jax.random.split(key, 5)
  lo, hi, taps = blur_params(cfg, clip.shape[1], clip.shape[2], image_width)
  sigma = jax.random.uniform(k_sigma, (), minval=lo, maxval=hi)
  x = jnp.where(
      jax.random.uniform(k_blur) < cfg.p_blur,
      _gaussian_blur(clip, sigma, taps),
      clip,
  )
  x = jnp.where(
      jax.random.uniform(k_jp) < cfg.p_jitter, _jitter(x, k_jit, cfg), x
  )
  gray = jnp.broadcast_to(_gray(x), x.shape)
  return jnp.where(jax.random.uniform(k_gray) < cfg.p_gray, gray, x)


def strong_augment(
    key: jax.Array,
    frames: jax.Array,
    cfg: ml_collections.ConfigDict,
    dtype=jnp.float32,
    image_width: int | None = None,
) -> jax.Array:
  """Augments a batch of clips and returns normalised network inputs.

  Args:
    key: PRNG key.
    frames: ``[B, T, H, W, 3]`` uint8 RGB.
    cfg: ``dastc.strong_aug`` config (``enabled`` False: normalise only).
    dtype: output dtype.
    image_width: width of the resized frames the clips were cut from (the
      blur scale; default the clips' own).

  Returns:
    ``[B, T, H, W, 3]`` normalised BGR (Caffe mean subtracted), or with
    ``cfg.wrap_normalized_bug`` the reference's [0, 1] wrapped values.
  """
  if cfg.wrap_normalized_bug:
    # ToPILImage(x * 255 -> uint8, wrapping) of the normalised BGR tensor,
    # augmented as if it were RGB, then ToTensor ([0, 1]).
    x = image_ops.normalize(frames)
    x = jnp.mod(jnp.trunc(x * 255.0), 256.0) / 255.0
  else:
    x = frames.astype(jnp.float32) / 255.0
  if cfg.enabled:
    keys = jax.random.split(key, frames.shape[0])
    x = jax.vmap(lambda k, c: augment_clip(k, c, cfg, image_width))(keys, x)
  if cfg.wrap_normalized_bug:
    return x.astype(dtype)
  return image_ops.normalize(x * 255.0, dtype)
