"""The ``winter`` target: a suburb on an overcast winter day in fog.

Appearance is derived from how such a picture forms, in linear light:

* **Materials** (albedo in [0, 1]) of a winter suburb: snow (0.85) lies on
  the surfaces that face up (terrain, trampled sidewalks, slush on the road,
  patches on hedges, the upper branches of trees, car and bus roofs);
  deciduous trees are leafless, so their canopy is mostly the fog seen
  between twigs; hedges are dark evergreens; cars carry road-salt grime.
* **Light**: an overcast sky is a uniform dome. A surface facing up
  receives all of it; a vertical one half of the sky plus half of the light
  reflected by the ground: ``0.5 * (1 + ground albedo)``, which snow makes
  bright.
* **Fog** (Koschmieder's law): ``I = J * t + A * (1 - t)``, transmission
  ``t = exp(-3.912 * depth / visibility)`` with a meteorological visibility
  of 60-220 m per clip and a grey airlight ``A``; the sky is ``A``. The
  veil grows with depth, not with colour, so no global mapping of the
  frame's histogram removes it.
* **Camera**: auto-exposure meters the frame's mean luminance to a key
  value (a snowy frame comes out grey), a blue-ish residual white balance,
  the sRGB curve, mild lens blur and sensor noise.

Everything is attached to the surfaces (``Render.surf``, ``seed``,
``shade``) so it moves with the flow. Nothing here was chosen by training
on this world; it was written and committed before its first training run.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from dastc_jax.data.synthetic import scene as scn
from dastc_jax.data.synthetic import style as sty

SNOW = (0.82, 0.85, 0.90)  # fresh snow, slightly blue in diffuse light
SLUSH = (0.36, 0.36, 0.37)
# Linear albedos of the winter suburb's materials (one picked per surface).
ALBEDO = {
    'road': [(0.07, 0.07, 0.075)],  # wet asphalt
    'sidewalk': [(0.30, 0.29, 0.28)],  # concrete slabs under slush
    'terrain': [SNOW],
    'building': [
        (0.55, 0.50, 0.42),
        (0.33, 0.18, 0.13),
        (0.60, 0.60, 0.58),
        (0.28, 0.33, 0.40),
    ],  # painted render, brick, timber
    'fence': [(0.22, 0.17, 0.12), (0.55, 0.55, 0.52)],  # stained, painted
    'pole': [(0.40, 0.40, 0.42)],  # galvanised steel
    'light': [(0.08, 0.08, 0.08)],
    'sign': [(0.55, 0.08, 0.08), (0.08, 0.18, 0.50), (0.65, 0.55, 0.08)],
    'vegetation': [(0.04, 0.10, 0.05), (0.05, 0.12, 0.06)],  # evergreens
    'tree': [(0.16, 0.13, 0.11), (0.20, 0.17, 0.14)],  # bare bark
    'person': [
        (0.04, 0.04, 0.05),
        (0.30, 0.05, 0.05),
        (0.08, 0.12, 0.25),
        (0.45, 0.40, 0.30),
        (0.15, 0.15, 0.16),
    ],  # winter coats
    'car': [
        (0.45, 0.05, 0.05),
        (0.05, 0.10, 0.30),
        (0.70, 0.70, 0.70),
        (0.03, 0.03, 0.03),
        (0.40, 0.40, 0.42),
    ],
    'truck': [(0.80, 0.42, 0.05), (0.75, 0.75, 0.74)],  # gritter, van
    'bus': [(0.12, 0.32, 0.18)],
    'motorcycle': [(0.05, 0.05, 0.06)],
    'bicycle': [(0.10, 0.10, 0.12)],
    'ego': [(0.04, 0.04, 0.05)],
    'sky': [(1.0, 1.0, 1.0)],  # replaced by the airlight
}
_HORIZONTAL = ('road', 'sidewalk', 'terrain')
_VEHICLES = ('car', 'truck', 'bus')


def sample_look(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Clip-level weather and camera: visibility, airlight, snow cover,
  exposure key, white balance and noise."""
  return {
      'visibility': rng.uniform(60.0, 220.0),  # metres
      'airlight': rng.uniform(0.75, 0.92) * np.array([0.97, 0.99, 1.0]),
      'cover': rng.uniform(0.6, 0.95),  # share of snow on trampled ground
      'key': rng.uniform(0.16, 0.26),  # metered mean linear luminance
      'balance': np.array(
          [1.0 - rng.uniform(0.0, 0.06), 1.0, 1.0 + rng.uniform(0.02, 0.08)]
      ),
      'noise': rng.uniform(3.0, 7.0),
  }


def _albedo(r: scn.Render, look: dict[str, np.ndarray]) -> np.ndarray:
  """``[H, W, 3]`` linear albedo with snow, slush, twigs and grime."""
  a = np.zeros(r.sem.shape + (3,))
  for name, cid in scn.CID.items():
    m = r.sem == cid
    if m.any():
      choices = np.asarray(ALBEDO[name])
      a[m] = choices[np.mod(r.seed[m], len(choices))]
  su, sv = r.surf[..., 0], r.surf[..., 1]

  def noise(seed, scale, octaves=3):
    return sty.value_noise(su, sv, r.seed + seed, scale, octaves)

  sem = r.sem
  is_ = lambda name: sem == scn.CID[name]
  snow = np.asarray(SNOW)
  # Road: slush in patches; the lane marks show only where it is clear.
  road = is_('road')
  slush = road & (noise(31, 1.5) > 0.3)
  a[road & (r.shade > 0.9) & ~slush] = (0.55, 0.55, 0.52)
  a[slush] = SLUSH
  # Sidewalks: trampled snow, bare where people walked.
  walk = is_('sidewalk')
  a[walk & (noise(37, 0.6) < 2 * look['cover'] - 1)] = snow
  a[is_('terrain')] *= (1.0 + 0.04 * noise(41, 0.3))[is_('terrain')][:, None]
  # Hedges: snow caught on the foliage in patches.
  hedge = is_('vegetation')
  a[hedge & (noise(43, 0.3) > 0.15)] = snow
  # Trees: bare twigs over the fog behind (alpha 0 marks "see-through"),
  # snow on the upper branches.
  tree = is_('tree')
  twig = noise(47, 0.08) > 0.05
  a[tree & ~twig] = -1.0  # filled with the airlight after the fog
  a[tree & twig & (r.shade < 0.3)] = snow
  # Vehicles: snow on the roof, salt grime low on the body.
  veh = np.isin(sem, [scn.CID[v] for v in _VEHICLES])
  a[veh & (r.shade < 0.12)] = snow
  low = veh & (r.shade > 0.72)
  a[low] = 0.5 * a[low] + 0.5 * np.asarray(SLUSH)
  # Buildings: dark window glass; faces: skin.
  a[is_('building') & (r.shade > 0.5)] = (0.05, 0.06, 0.07)
  a[is_('person') & (r.shade < 0.14)] = (0.45, 0.32, 0.25)
  return a


def winter_style(
    r: scn.Render, look: dict[str, np.ndarray], rng: np.random.Generator
) -> np.ndarray:
  """Renders the ``winter`` target frame (uint8 RGB).

  Args:
    r: the rendered frame (needs ``depth``).
    look: clip-level parameters from ``sample_look``.
    rng: per-frame generator for the sensor noise.

  Returns:
    ``[H, W, 3]`` uint8 RGB.
  """
  albedo = _albedo(r, look)
  see_through = albedo[..., 0] < 0
  albedo = np.where(see_through[..., None], 0.0, albedo)
  # Overcast dome: up-facing surfaces get 1, vertical ones half the sky
  # plus half of the light the (mostly snowy) ground reflects.
  ground_albedo = look['cover'] * SNOW[1] + (1 - look['cover']) * SLUSH[1]
  horizontal = np.isin(r.sem, [scn.CID[n] for n in _HORIZONTAL])
  irradiance = np.where(horizontal, 1.0, 0.5 * (1.0 + ground_albedo))
  radiance = albedo * irradiance[..., None]
  # Koschmieder fog; the sky (depth inf) and the gaps between twigs show
  # the airlight.
  t = np.exp(-3.912 * r.depth / look['visibility'])
  t = np.where(see_through, 0.0, t)[..., None]
  img = radiance * t + look['airlight'] * (1.0 - t)
  # Camera: metered exposure, residual white balance, sRGB, blur, noise.
  lum = img @ np.array([0.2126, 0.7152, 0.0722])
  img = img * (look['key'] / max(lum.mean(), 1e-6)) * look['balance']
  img = np.clip(img, 0.0, 1.0)
  srgb = (
      np.where(img <= 0.0031308, 12.92 * img, 1.055 * img ** (1 / 2.4) - 0.055)
      * 255.0
  )
  srgb = scipy.ndimage.gaussian_filter(srgb, sigma=(0.7, 0.7, 0))
  srgb += rng.normal(0.0, look['noise'], srgb.shape)
  return np.clip(srgb, 0, 255).astype(np.uint8)
