"""Appearance of the synthetic world's two domains.

The *source* style looks like a game engine: flat, saturated colours, crisp
edges, no noise. The *target* style looks like a camera: a different palette,
procedural textures fixed to the surfaces (so they move with the flow), a
colour cast, exposure changes, vignetting, lens blur and sensor noise. Both
styles see the same geometry and labels.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from dastc_jax.data.synthetic import scene as scn

# Per-class colour choices (one is picked per surface instance).
_SOURCE = {
    'sky': [(110, 170, 235)],
    'road': [(92, 92, 100)],
    'sidewalk': [(178, 172, 160)],
    'building': [
        (150, 90, 70),
        (196, 184, 160),
        (122, 122, 134),
        (204, 150, 108),
    ],
    'fence': [(165, 140, 105)],
    'pole': [(118, 118, 118)],
    'light': [(35, 35, 35)],
    'sign': [(215, 40, 40), (40, 80, 200), (230, 200, 40)],
    'vegetation': [(60, 140, 50), (45, 120, 60), (80, 150, 40)],
    'tree': [(52, 128, 44), (70, 146, 52)],
    'terrain': [(150, 192, 90)],
    'person': [
        (200, 60, 60),
        (60, 60, 180),
        (230, 230, 230),
        (50, 50, 50),
        (220, 170, 40),
    ],
    'car': [
        (200, 30, 30),
        (30, 60, 170),
        (235, 235, 235),
        (30, 30, 30),
        (170, 170, 175),
    ],
    'truck': [(205, 205, 212)],
    'bus': [(225, 172, 40)],
    'motorcycle': [(30, 30, 30)],
    'bicycle': [(40, 90, 160)],
    'ego': [(30, 30, 36)],
}
_TARGET = {
    'sky': [(146, 176, 214)],
    'road': [(118, 112, 104)],
    'sidewalk': [(152, 148, 140)],
    'building': [
        (110, 100, 95),
        (158, 150, 136),
        (86, 90, 102),
        (142, 116, 96),
    ],
    'fence': [(110, 112, 100)],
    'pole': [(90, 92, 96)],
    'light': [(60, 64, 58)],
    'sign': [(170, 70, 60), (70, 90, 150), (190, 170, 80)],
    'vegetation': [(84, 104, 44), (70, 92, 52), (100, 110, 50)],
    'tree': [(76, 98, 48), (92, 106, 46)],
    'terrain': [(122, 148, 78)],
    'person': [
        (90, 60, 60),
        (60, 66, 96),
        (170, 166, 160),
        (40, 40, 44),
        (130, 110, 70),
    ],
    'car': [
        (120, 40, 40),
        (50, 64, 110),
        (190, 190, 186),
        (36, 38, 40),
        (130, 132, 134),
    ],
    'truck': [(176, 176, 182)],
    'bus': [(170, 150, 70)],
    'motorcycle': [(50, 50, 56)],
    'bicycle': [(70, 80, 110)],
    'ego': [(46, 46, 50)],
}
# Texture scale (metres) and strength in the target domain.
_TEXTURE = {
    'road': (0.35, 0.35),
    'sidewalk': (0.25, 0.3),
    'terrain': (0.3, 0.45),
    'vegetation': (0.15, 0.6),
    'tree': (0.12, 0.6),
    'building': (0.8, 0.3),
    'sky': (6.0, 0.12),
}


def _hash(ix, iy, seed):
  h = (
      ix.astype(np.uint64) * np.uint64(374761393)
      + iy.astype(np.uint64) * np.uint64(668265263)
      + seed.astype(np.uint64) * np.uint64(2246822519)
  )
  h = (h ^ (h >> np.uint64(13))) * np.uint64(1274126177)
  h = h ^ (h >> np.uint64(16))
  return (h & np.uint64(0xFFFF)).astype(np.float64) / 65535.0


def value_noise(
    x: np.ndarray,
    y: np.ndarray,
    seed: np.ndarray,
    scale: float,
    octaves: int = 3,
) -> np.ndarray:
  """Smooth lattice noise in [-1, 1] at surface coordinates (x, y)."""
  out = np.zeros_like(x)
  amp, total = 1.0, 0.0
  seed = np.broadcast_to(np.asarray(seed, np.int64), x.shape)
  for o in range(octaves):
    xs = x / scale * 2**o + 1e5
    ys = y / scale * 2**o + 1e5
    ix, iy = np.floor(xs), np.floor(ys)
    fx, fy = xs - ix, ys - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    s = seed + o
    v00, v10 = _hash(ix, iy, s), _hash(ix + 1, iy, s)
    v01, v11 = _hash(ix, iy + 1, s), _hash(ix + 1, iy + 1, s)
    v = (v00 * (1 - fx) + v10 * fx) * (1 - fy) + (
        v01 * (1 - fx) + v11 * fx
    ) * fy
    out += amp * (2 * v - 1)
    total += amp
    amp *= 0.5
  return out / total


def _base_colors(r: scn.Render, palette) -> np.ndarray:
  rgb = np.zeros(r.sem.shape + (3,), np.float64)
  for name, cid in scn.CID.items():
    m = r.sem == cid
    if not m.any():
      continue
    choices = np.asarray(palette[name], np.float64)
    idx = np.mod(r.seed[m], len(choices))
    rgb[m] = choices[idx]
  return rgb


def _patterns(r: scn.Render, rgb: np.ndarray, window_rgb, mark_rgb) -> None:
  """Windows on buildings, lane marks, and the skin of people's heads."""
  b = (r.sem == scn.CID['building']) & (r.shade > 0.5)
  rgb[b] = window_rgb
  road = r.sem == scn.CID['road']
  rgb[road & (r.shade > 0.9)] = mark_rgb
  curb = road & (np.abs(r.shade - 0.6) < 0.01)
  rgb[curb] = rgb[curb] * 1.15
  head = (r.sem == scn.CID['person']) & (r.shade < 0.14)
  rgb[head] = (205, 160, 130)


def source_style(r: scn.Render) -> np.ndarray:
  """Flat game-like colours. Returns ``[H, W, 3]`` uint8."""
  rgb = _base_colors(r, _SOURCE)
  _patterns(r, rgb, (60, 72, 95), (235, 235, 235))
  sky = r.sem == scn.CID['sky']
  h = r.sem.shape[0]
  grad = (np.arange(h, dtype=np.float64) / h)[:, None, None]
  rgb = np.where(sky[..., None], rgb + grad * np.array([70, 45, 15]), rgb)
  # Mild vertical shading on upright objects.
  upright = (
      (r.sem != scn.CID['sky'])
      & (r.sem != scn.CID['road'])
      & (r.sem != scn.CID['sidewalk'])
      & (r.sem != scn.CID['terrain'])
  )
  shade = np.where(
      upright & (r.sem != scn.CID['building']), 1.0 - 0.15 * r.shade, 1.0
  )
  return np.clip(rgb * shade[..., None], 0, 255).astype(np.uint8)


def sample_target_look(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Colour cast, gain and gamma shared by all frames of one clip."""
  return {
      'cast': np.array(
          [1.0 + rng.uniform(0.0, 0.06), 1.0, 1.0 - rng.uniform(0.0, 0.06)]
      ),
      'gain': rng.uniform(0.85, 1.08),
      'gamma': rng.uniform(0.9, 1.1),
  }


def target_style(
    r: scn.Render, look: dict[str, np.ndarray], rng: np.random.Generator
) -> np.ndarray:
  """Camera-like textures, cast, exposure, blur and noise (uint8 RGB).

  Args:
    r: the rendered frame.
    look: clip-level colour parameters from ``sample_target_look``.
    rng: per-frame generator for the sensor noise.

  Returns:
    ``[H, W, 3]`` uint8 RGB.
  """
  rgb = _base_colors(r, _TARGET)
  _patterns(r, rgb, (150, 168, 186), (196, 196, 178))
  tex = np.zeros(r.sem.shape)
  for name, (scale, strength) in _TEXTURE.items():
    m = r.sem == scn.CID[name]
    if m.any():
      n = value_noise(r.surf[..., 0][m], r.surf[..., 1][m], r.seed[m], scale)
      tex[m] = strength * n
  generic = ~np.isin(r.sem, [scn.CID[k] for k in _TEXTURE])
  if generic.any():
    tex[generic] = 0.12 * value_noise(
        r.surf[..., 0][generic], r.surf[..., 1][generic], r.seed[generic], 0.2
    )
  rgb = rgb * (1.0 + tex[..., None])
  # Shadows from buildings on the ground: broad bands in world Z.
  ground = np.isin(
      r.sem, [scn.CID['road'], scn.CID['sidewalk'], scn.CID['terrain']]
  )
  band = value_noise(
      r.surf[..., 1] * 0.2,
      r.surf[..., 0] * 0.05,
      np.full(r.sem.shape, 5),
      1.0,
      octaves=1,
  )
  rgb = np.where(ground[..., None] & (band[..., None] > 0.25), rgb * 0.6, rgb)
  # Colour cast and exposure of this clip.
  rgb = (
      255.0
      * np.clip(rgb / 255.0 * look['cast'] * look['gain'], 0, 1)
      ** look['gamma']
  )
  # Vignetting.
  h, w = r.sem.shape
  yy, xx = np.mgrid[0:h, 0:w]
  d2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
  rgb *= (1.0 - 0.15 * d2)[..., None]
  rgb = scipy.ndimage.gaussian_filter(rgb, sigma=(0.6, 0.6, 0))
  rgb += rng.normal(0.0, 4.0, rgb.shape)
  return np.clip(rgb, 0, 255).astype(np.uint8)


# The `hard` target: another city at dusk after rain. Materials differ per
# class (autumn foliage, dark brick, wet asphalt, another car fleet), so no
# single colour mapping of the whole frame turns them into the source's.
_TARGET_HARD = {
    **_TARGET,
    'road': [(64, 66, 74)],  # wet asphalt
    'sidewalk': [(128, 118, 104)],
    'building': [(96, 60, 48), (120, 104, 92), (70, 74, 86), (136, 92, 70)],
    'fence': [(78, 86, 70)],
    'vegetation': [(150, 96, 40), (128, 70, 34), (166, 120, 52)],  # autumn
    'tree': [(140, 84, 36), (118, 62, 30)],
    'terrain': [(112, 96, 60)],
    'sky': [(150, 120, 150)],  # dusk
    'car': [
        (60, 120, 110),
        (140, 130, 60),
        (170, 176, 180),
        (24, 26, 30),
        (110, 40, 90),
    ],
    'truck': [(120, 140, 160)],
    'bus': [(60, 120, 170)],
}
_TEXTURE_HARD = {
    k: (scale, 1.5 * strength) for k, (scale, strength) in _TEXTURE.items()
}


def sample_hard_look(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Clip-level parameters of the ``hard`` target: a strong colour cast, low
  exposure, the side the low sun comes from, and street-light positions."""
  look = sample_target_look(rng)
  look['cast'] = np.array(
      [1.0 + rng.uniform(0.05, 0.2), 1.0, 1.0 - rng.uniform(0.1, 0.25)]
  )
  look['gain'] = rng.uniform(0.6, 0.85)
  look['sun_side'] = rng.choice([-1.0, 1.0])
  look['lamps'] = rng.uniform(0.0, 1.0, (4,))
  return look


def illumination(r: scn.Render, look: dict[str, np.ndarray]) -> np.ndarray:
  """``[H, W]`` light field of the ``hard`` target: a low sun from one side
  (a horizontal gradient of a factor ~3), long shadows from the buildings on
  the ground (bands in world Z), and street-light pools on the ground,
  attached to the surfaces so they move with the flow."""
  h, w = r.sem.shape
  xx = np.arange(w, dtype=np.float64)[None, :] / w
  side = xx if look['sun_side'] > 0 else 1.0 - xx
  light = np.broadcast_to(0.55 + 1.0 * side, (h, w)).copy()
  ground = np.isin(
      r.sem, [scn.CID['road'], scn.CID['sidewalk'], scn.CID['terrain']]
  )
  band = value_noise(
      r.surf[..., 1] * 0.25,
      r.surf[..., 0] * 0.05,
      np.full(r.sem.shape, 11),
      1.0,
      octaves=2,
  )
  light = np.where(ground & (band > 0.0), light * 0.45, light)
  # Street lights: warm pools every ~12 m along the road.
  pool = np.zeros((h, w))
  for i, phase in enumerate(look['lamps']):
    zc = (r.surf[..., 1] / 12.0 + phase + 0.25 * i) % 1.0 - 0.5
    xc = (r.surf[..., 0] / 6.0 + 0.5 * i) % 1.0 - 0.5
    pool += np.exp(-(zc**2 + xc**2) / 0.02)
  light = light + np.where(ground, 0.9 * pool, 0.0)
  return light


def hard_target_style(
    r: scn.Render, look: dict[str, np.ndarray], rng: np.random.Generator
) -> np.ndarray:
  """The ``hard`` target (uint8 RGB): per-class materials of another city,
  stronger textures, a spatially varying low-sun and street-light
  illumination, a strong cast, wet-road reflections of the sky, horizontal
  motion blur and low-light sensor noise."""
  rgb = _base_colors(r, _TARGET_HARD)
  _patterns(r, rgb, (220, 190, 120), (150, 150, 140))  # lit windows
  tex = np.zeros(r.sem.shape)
  for name, (scale, strength) in _TEXTURE_HARD.items():
    m = r.sem == scn.CID[name]
    if m.any():
      n = value_noise(
          r.surf[..., 0][m], r.surf[..., 1][m], r.seed[m] + 3, scale
      )
      tex[m] = strength * n
  rgb = rgb * np.clip(1.0 + tex[..., None], 0.2, None)
  rgb = rgb * illumination(r, look)[..., None]
  # Wet road: a blurred mirror image of the sky's colour, patchy.
  road = r.sem == scn.CID['road']
  puddle = (
      value_noise(
          r.surf[..., 0],
          r.surf[..., 1],
          np.full(r.sem.shape, 17),
          0.8,
          octaves=2,
      )
      > 0.2
  )
  rgb = np.where(
      (road & puddle)[..., None],
      0.5 * rgb + 0.5 * np.array(_TARGET_HARD['sky'][0]),
      rgb,
  )
  rgb = (
      255.0
      * np.clip(rgb / 255.0 * look['cast'] * look['gain'], 0, 1)
      ** look['gamma']
  )
  rgb = scipy.ndimage.gaussian_filter(rgb, sigma=(0.8, 1.6, 0))
  rgb += rng.normal(0.0, 9.0, rgb.shape)
  return np.clip(rgb, 0, 255).astype(np.uint8)
