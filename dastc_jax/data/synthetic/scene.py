"""Procedural driving scenes with exact optical flow (the synthetic world).

A pinhole camera drives forward along a straight street. The scene is made
of analytic surfaces, so the 3-D point seen at every pixel of frame t is
known and the flow t->s is its reprojection into frame s
(docs/reference_code.md, "Optical flow"):

* the ground plane ``Y = 0`` (road with lane marks, sidewalks, terrain);
* two side walls ``X = const`` split into segments along Z (buildings,
  hedges, gaps), and low fence planes in front of them;
* upright billboards facing the camera (cars, trucks, buses, people,
  bicycles, motorcycles, trees, poles with lights and signs), each moving
  with its own constant velocity;
* the sky at infinity and the ego-vehicle hood, both with zero flow under
  pure camera translation.

Appearance is a function of the *surface* coordinates, so textures move
exactly with the flow. Domain styles only change appearance, never geometry
or labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# World classes; the writer maps them to VIPER raw ids / Cityscapes labelIds.
CLASSES = (
    'sky',
    'road',
    'sidewalk',
    'building',
    'fence',
    'pole',
    'light',
    'sign',
    'vegetation',
    'tree',
    'terrain',
    'person',
    'car',
    'truck',
    'bus',
    'motorcycle',
    'bicycle',
    'ego',
)
CID = {name: i for i, name in enumerate(CLASSES)}

ZFAR = 160.0  # metres; nothing is drawn beyond.
ZNEAR = 1.0


@dataclasses.dataclass
class Camera:
  """Pinhole camera moving along +Z with a lateral sway."""

  height: int
  width: int
  focal: float
  horizon: float  # image row of the horizon
  cam_height: float  # metres above the ground
  z0: float
  speed: float  # metres per frame
  x_offset: float
  sway_amp: float
  sway_freq: float
  sway_phase: float

  def position(self, t: float) -> tuple[float, float]:
    """Camera (x, z) at frame t."""
    x = self.x_offset + self.sway_amp * np.sin(
        self.sway_freq * t + self.sway_phase
    )
    return x, self.z0 + self.speed * t

  def project(self, x, y, z, t):
    """World points -> image coordinates (col, row) at frame t."""
    cx, cz = self.position(t)
    zr = np.maximum(z - cz, 1e-3)
    col = self.width / 2 + self.focal * (x - cx) / zr
    row = self.horizon + self.focal * (self.cam_height - y) / zr
    return col, row


@dataclasses.dataclass
class WallSegment:
  z0: float
  z1: float
  cls: str
  height: float
  seed: int


@dataclasses.dataclass
class Billboard:
  """An upright rectangle facing the camera, moving with constant speed."""

  cls: str
  x: float  # centre at t = 0
  z: float
  vx: float
  vz: float
  width: float
  y_base: float
  y_top: float
  shape: str
  seed: int

  def at(self, t):
    return self.x + self.vx * t, self.z + self.vz * t


@dataclasses.dataclass
class Scene:
  road_half: float
  sidewalk: tuple[float, float]  # left, right widths
  walls: tuple[float, float]  # |X| of the left/right wall planes
  wall_segments: tuple[list[WallSegment], list[WallSegment]]
  fences: tuple[list[WallSegment], list[WallSegment]]
  billboards: list[Billboard]


@dataclasses.dataclass(frozen=True)
class Family:
  """What a kind of street is made of: widths, wall and object mixes.

  Spacings are mean metres of road per object (Poisson counts).
  """

  road_half: tuple[float, float]
  sidewalk: tuple[float, float]
  setback: tuple[float, float]  # wall plane behind the fence line
  wall_kinds: tuple[str, ...]
  wall_probs: tuple[float, ...]
  wall_length: tuple[float, float]
  wall_height: tuple[float, float]
  fence_prob: float
  vehicle_spacing: float
  vehicle_probs: tuple[float, float, float, float]  # car truck bus motorbike
  parked_spacing: float
  bicycle_spacing: float
  person_spacing: float
  tree_spacing: float
  pole_spacing: float


# A city street: continuous facades, wide sidewalks, busy.
CITY = Family(
    road_half=(3.5, 6.5),
    sidewalk=(1.8, 3.5),
    setback=(0.5, 6.0),
    wall_kinds=('building', 'vegetation', 'gap'),
    wall_probs=(0.7, 0.18, 0.12),
    wall_length=(8.0, 30.0),
    wall_height=(6.0, 22.0),
    fence_prob=0.25,
    vehicle_spacing=14.0,
    vehicle_probs=(0.78, 0.08, 0.08, 0.06),
    parked_spacing=25.0,
    bicycle_spacing=90.0,
    person_spacing=9.0,
    tree_spacing=12.0,
    pole_spacing=30.0,
)
# A suburban road: two narrow lanes, narrow sidewalks, detached low
# houses behind front gardens, hedges and gaps, garden fences, many street
# trees, few people, delivery and service trucks, hardly any motorbikes.
SUBURB = Family(
    road_half=(3.0, 4.5),
    sidewalk=(0.8, 1.6),
    setback=(4.0, 15.0),
    wall_kinds=('building', 'vegetation', 'gap'),
    wall_probs=(0.4, 0.35, 0.25),
    wall_length=(10.0, 25.0),
    wall_height=(4.0, 9.0),
    fence_prob=0.5,
    vehicle_spacing=24.0,
    vehicle_probs=(0.74, 0.18, 0.05, 0.03),
    parked_spacing=45.0,
    bicycle_spacing=300.0,
    person_spacing=40.0,
    tree_spacing=7.0,
    pole_spacing=22.0,
)
FAMILIES = {'city': CITY, 'suburb': SUBURB}


def _segments(rng, z0, z1, kinds, probs, length, height):
  segs, z = [], z0
  while z < z1:
    ln = rng.uniform(*length)
    kind = rng.choice(kinds, p=probs)
    segs.append(
        WallSegment(
            z,
            z + ln,
            str(kind),
            rng.uniform(*height),
            int(rng.integers(1 << 30)),
        )
    )
    z += ln
  return segs


def sample_scene(
    rng: np.random.Generator,
    z0: float,
    z1: float,
    t_range: tuple[float, float],
    family: Family = CITY,
) -> Scene:
  """Samples a street covering ``[z0, z1]`` metres along the road.

  Args:
    rng: numpy generator.
    z0: first visible depth (world Z).
    z1: last visible depth.
    t_range: frames over which moving objects must stay plausible.
    family: the kind of street (``CITY`` or ``SUBURB``).

  Returns:
    The scene.
  """
  fam = family
  road_half = rng.uniform(*fam.road_half)
  sidewalk = (rng.uniform(*fam.sidewalk), rng.uniform(*fam.sidewalk))
  fence_x = (road_half + sidewalk[0], road_half + sidewalk[1])
  walls = (
      fence_x[0] + rng.uniform(*fam.setback),
      fence_x[1] + rng.uniform(*fam.setback),
  )
  wall_segments = tuple(
      _segments(
          rng,
          z0,
          z1,
          list(fam.wall_kinds),
          list(fam.wall_probs),
          fam.wall_length,
          fam.wall_height,
      )
      for _ in range(2)
  )
  fences = tuple(
      [
          s
          for s in _segments(
              rng,
              z0,
              z1,
              ['fence', 'gap'],
              [fam.fence_prob, 1.0 - fam.fence_prob],
              (6.0, 20.0),
              (0.9, 1.4),
          )
          if s.cls == 'fence'
      ]
      for _ in range(2)
  )
  bb = []
  span = z1 - z0
  t_mid = 0.5 * (t_range[0] + t_range[1])

  def add(cls, x, z, vx, vz, w, yb, yt, shape):
    # Place so that the object is at depth z at the middle of t_range.
    bb.append(
        Billboard(
            cls,
            x - vx * t_mid,
            z - vz * t_mid,
            vx,
            vz,
            w,
            yb,
            yt,
            shape,
            int(rng.integers(1 << 30)),
        )
    )

  lane = road_half / 2
  for _ in range(rng.poisson(span / fam.vehicle_spacing)):  # in lanes
    kind = rng.choice(
        ['car', 'truck', 'bus', 'motorcycle'], p=list(fam.vehicle_probs)
    )
    side = rng.choice([-1.0, 1.0])
    speed = rng.uniform(0.3, 1.2) * (1.0 if side > 0 else -1.0)
    x = side * lane + rng.uniform(-0.4, 0.4)
    z = rng.uniform(z0 + 5, z1)
    if kind == 'car':
      add(
          'car',
          x,
          z,
          0.0,
          speed,
          rng.uniform(1.7, 2.0),
          0.0,
          rng.uniform(1.4, 1.7),
          'car',
      )
    elif kind == 'truck':
      add(
          'truck',
          x,
          z,
          0.0,
          speed,
          rng.uniform(2.3, 2.6),
          0.0,
          rng.uniform(3.0, 3.8),
          'truck',
      )
    elif kind == 'bus':
      add(
          'bus',
          x,
          z,
          0.0,
          speed,
          rng.uniform(2.4, 2.6),
          0.0,
          rng.uniform(3.0, 3.4),
          'bus',
      )
    else:
      add('motorcycle', x, z, 0.0, speed, 0.8, 0.0, 1.3, 'twowheel')
  for side_i, side in enumerate((-1.0, 1.0)):  # parked cars, bicycles
    for _ in range(rng.poisson(span / fam.parked_spacing)):
      x = side * (road_half - 1.1)
      add(
          'car',
          x,
          rng.uniform(z0 + 5, z1),
          0.0,
          0.0,
          rng.uniform(1.7, 2.0),
          0.0,
          rng.uniform(1.4, 1.7),
          'car',
      )
    for _ in range(rng.poisson(span / fam.bicycle_spacing)):
      x = side * (road_half + 0.5)
      add(
          'bicycle',
          x,
          rng.uniform(z0 + 5, z1),
          0.0,
          0.0,
          0.7,
          0.0,
          1.1,
          'twowheel',
      )
    sw = sidewalk[side_i]
    for _ in range(rng.poisson(span / fam.person_spacing)):  # pedestrians
      x = side * (road_half + rng.uniform(0.4, sw - 0.3))
      add(
          'person',
          x,
          rng.uniform(z0 + 3, z1),
          rng.uniform(-0.02, 0.02),
          rng.uniform(-0.1, 0.1),
          rng.uniform(0.5, 0.7),
          0.0,
          rng.uniform(1.6, 1.9),
          'person',
      )
    for _ in range(
        rng.poisson(span / fam.tree_spacing)
    ):  # trees at the sidewalk edge
      x = side * (road_half + sw - 0.6)
      w = rng.uniform(2.0, 4.0)
      add(
          'tree',
          x,
          rng.uniform(z0 + 5, z1),
          0.0,
          0.0,
          w,
          0.0,
          rng.uniform(4.0, 7.0),
          'tree',
      )
    for _ in range(
        rng.poisson(span / fam.pole_spacing)
    ):  # poles with lights or signs
      x = side * (road_half + 0.4)
      z = rng.uniform(z0 + 5, z1)
      top = rng.uniform(3.0, 4.5)
      add('pole', x, z, 0.0, 0.0, 0.16, 0.0, top, 'rect')
      if rng.random() < 0.5:
        add('light', x, z - 0.05, 0.0, 0.0, 0.4, top - 1.1, top + 0.1, 'rect')
      else:
        add(
            'sign',
            x,
            z - 0.05,
            0.0,
            0.0,
            0.75,
            top - 0.8,
            top,
            str(rng.choice(['disk', 'tri', 'rect'])),
        )
  return Scene(road_half, sidewalk, walls, wall_segments, fences, bb)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Silhouette of a billboard in its local coordinates u, v in [0, 1]."""
  if shape == 'rect':
    return np.ones_like(u, bool)
  if shape == 'disk':
    return (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25
  if shape == 'tri':
    return v > 2 * np.abs(u - 0.5)
  if shape == 'car':
    body = v > 0.45
    cabin = (v > 0.05) & (np.abs(u - 0.5) < 0.30 + 0.15 * (v - 0.05) / 0.4)
    return (
        (body & (v < 0.92))
        | cabin
        | ((v >= 0.92) & ((np.abs(u - 0.2) < 0.1) | (np.abs(u - 0.8) < 0.1)))
    )
  if shape == 'truck':
    return (v < 0.93) | (np.abs(u - 0.2) < 0.09) | (np.abs(u - 0.8) < 0.09)
  if shape == 'bus':
    return (v < 0.95) | (np.abs(u - 0.15) < 0.08) | (np.abs(u - 0.85) < 0.08)
  if shape == 'person':
    head = (u - 0.5) ** 2 / 0.04 + (v - 0.08) ** 2 / 0.007 < 1
    torso = (np.abs(u - 0.5) < 0.32) & (v > 0.14) & (v < 0.55)
    legs = (v >= 0.55) & ((np.abs(u - 0.36) < 0.1) | (np.abs(u - 0.64) < 0.1))
    return head | torso | legs
  if shape == 'twowheel':
    r1 = np.hypot((u - 0.22) / 0.22, (v - 0.72) / 0.28)
    r2 = np.hypot((u - 0.78) / 0.22, (v - 0.72) / 0.28)
    wheels = ((r1 < 1) & (r1 > 0.55)) | ((r2 < 1) & (r2 > 0.55))
    frame = (v > 0.35) & (v < 0.75) & (np.abs(u - 0.5) < 0.3)
    bars = (v > 0.1) & (v < 0.4) & (np.abs(u - 0.62) < 0.05)
    return wheels | frame | bars
  if shape == 'tree':
    canopy = (u - 0.5) ** 2 / 0.25 + (v - 0.38) ** 2 / 0.14 < 1
    trunk = (np.abs(u - 0.5) < 0.06) & (v >= 0.38)
    return canopy | trunk
  raise ValueError(shape)


@dataclasses.dataclass
class Render:
  """One rendered frame: world-class ids, surface coordinates, flows."""

  sem: np.ndarray  # [H, W] int world class ids
  surf: np.ndarray  # [H, W, 2] surface coordinates (metres) for texturing
  seed: np.ndarray  # [H, W] per-surface seed (instance) for appearance
  shade: np.ndarray  # [H, W] extra per-surface pattern in [0, 1]
  depth: np.ndarray  # [H, W] metres along the view axis (sky: inf)
  flows: dict[int, np.ndarray]  # s -> [H, W, 2] flow t->s


class _Canvas:
  """Accumulates painted layers and their flows to each earlier frame."""

  def __init__(self, cam: Camera, t: int, earlier: tuple[int, ...]):
    h, w = cam.height, cam.width
    self.cam, self.t, self.earlier = cam, t, earlier
    self.rows, self.cols = np.mgrid[0:h, 0:w].astype(np.float64) + 0.0
    self.sem = np.full((h, w), CID['sky'], np.int32)
    self.surf = np.stack([self.cols / w * 40.0, self.rows / h * 20.0], -1)
    self.seed = np.zeros((h, w), np.int64)
    self.shade = np.zeros((h, w), np.float64)
    self.depth = np.full((h, w), np.inf)
    self.flows = {s: np.zeros((h, w, 2), np.float64) for s in earlier}

  def paint(self, sl, mask, sem, surf_a, surf_b, seed, shade, depth, world_fn):
    """Paints ``mask`` inside the window ``sl``.

    ``world_fn(s, mask)`` returns the image coordinates at frame s of the
    painted points (already restricted to ``mask``).
    """
    if not mask.any():
      return
    region_sem = self.sem[sl]
    region_sem[mask] = sem if np.isscalar(sem) else sem[mask]
    self.surf[sl][mask] = np.stack([surf_a[mask], surf_b[mask]], -1)
    self.seed[sl][mask] = seed if np.isscalar(seed) else seed[mask]
    self.shade[sl][mask] = shade if np.isscalar(shade) else shade[mask]
    self.depth[sl][mask] = depth if np.isscalar(depth) else depth[mask]
    for s in self.earlier:
      col, row = world_fn(s, mask)
      fl = self.flows[s][sl]
      fl[mask, 0] = col - self.cols[sl][mask]
      fl[mask, 1] = row - self.rows[sl][mask]


def render(
    scene: Scene, cam: Camera, t: int, earlier: tuple[int, ...]
) -> Render:
  """Renders frame t and its exact flows to each frame in ``earlier``.

  Args:
    scene: the street.
    cam: the camera.
    t: frame index.
    earlier: frames s for which the flow t->s is computed.

  Returns:
    The rendered frame.
  """
  cv = _Canvas(cam, t, earlier)
  h, w, f = cam.height, cam.width, cam.focal
  cx_img, hor, hc = w / 2, cam.horizon, cam.cam_height
  camx, camz = cam.position(t)
  rows, cols = cv.rows, cv.cols

  # Ground plane.
  g = rows > hor + 0.5
  zr = np.where(g, f * hc / np.maximum(rows - hor, 1e-6), 2 * ZFAR)
  g &= zr < ZFAR
  X = camx + (cols - cx_img) * zr / f
  Z = camz + zr
  ax = np.abs(X)
  left = X < 0
  sw = np.where(left, scene.sidewalk[0], scene.sidewalk[1])
  sem = np.where(
      ax < scene.road_half,
      CID['road'],
      np.where(ax < scene.road_half + sw, CID['sidewalk'], CID['terrain']),
  )
  lane_mark = (np.abs(X) < 0.12) & (np.mod(Z, 9.0) < 4.0)
  curb = np.abs(ax - scene.road_half) < 0.15
  shade = np.where(lane_mark, 1.0, np.where(curb, 0.6, 0.0))
  full = (slice(None), slice(None))
  Xg, Zg = X, Z
  cv.paint(
      full,
      g,
      sem,
      Xg,
      Zg,
      11,
      shade,
      zr,
      lambda s, m: cam.project(Xg[m], 0.0, Zg[m], s),
  )

  # Side walls (buildings, hedges) and fences, far planes first.
  for side, planes in (
      (0, (scene.walls[0], scene.wall_segments[0], scene.walls[0] - 0.01)),
      (1, (scene.walls[1], scene.wall_segments[1], scene.walls[1] - 0.01)),
  ):
    sgn = -1.0 if side == 0 else 1.0
    fence_x = scene.road_half + scene.sidewalk[side]
    for xw, segs, is_fence in (
        (planes[0], planes[1], False),
        (fence_x, scene.fences[side], True),
    ):
      xw_world = sgn * xw
      dx = cols - cx_img
      with np.errstate(divide='ignore', invalid='ignore'):
        zr = f * (xw_world - camx) / dx
      valid = (zr > ZNEAR) & (zr < ZFAR) & np.isfinite(zr)
      Zw = camz + np.where(valid, zr, 0.0)
      Yw = hc - (rows - hor) * np.where(valid, zr, 0.0) / f
      height = np.zeros((h, w))
      seg_cls = np.full((h, w), -1, np.int32)
      seg_seed = np.zeros((h, w), np.int64)
      for seg in segs:
        if seg.cls == 'gap':
          continue
        m = valid & (Zw >= seg.z0) & (Zw < seg.z1)
        height[m] = seg.height
        seg_cls[m] = CID[seg.cls]
        seg_seed[m] = seg.seed
      m = valid & (seg_cls >= 0) & (Yw >= 0) & (Yw <= height)
      if is_fence:
        bars = (
            (np.mod(Zw, 0.3) < 0.1)
            | (Yw > height - 0.12)
            | (np.abs(Yw - 0.5 * height) < 0.05)
        )
        m &= bars
        pattern = np.zeros((h, w))
      else:
        # Windows on buildings (appearance only).
        pattern = (
            (np.mod(Zw, 3.0) > 1.0)
            & (np.mod(Yw, 3.2) > 1.2)
            & (Yw > 2.5)
            & (seg_cls == CID['building'])
        ).astype(np.float64)
      Zc, Yc = Zw, Yw
      cv.paint(
          full,
          m,
          seg_cls,
          Zw,
          Yw,
          seg_seed,
          pattern,
          zr,
          lambda s, mm, xw_world=xw_world, Zc=Zc, Yc=Yc: cam.project(
              xw_world, Yc[mm], Zc[mm], s
          ),
      )

  # Billboards, far to near.
  items = []
  for b in scene.billboards:
    bx, bz = b.at(t)
    if ZNEAR < bz - camz < ZFAR:
      items.append((bz - camz, b, bx, bz))
  items.sort(key=lambda it: -it[0])
  for zr, b, bx, bz in items:
    x0 = cx_img + f * (bx - b.width / 2 - camx) / zr
    x1 = cx_img + f * (bx + b.width / 2 - camx) / zr
    y0 = hor + f * (hc - b.y_top) / zr
    y1 = hor + f * (hc - b.y_base) / zr
    c0, c1 = int(max(np.floor(x0), 0)), int(min(np.ceil(x1), w))
    r0, r1 = int(max(np.floor(y0), 0)), int(min(np.ceil(y1), h))
    if c1 <= c0 or r1 <= r0:
      continue
    sl = (slice(r0, r1), slice(c0, c1))
    u = (cols[sl] + 0.5 - x0) / (x1 - x0)
    v = (rows[sl] + 0.5 - y0) / (y1 - y0)
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    m = inside & _shape_mask(b.shape, u, v)
    # Local surface coordinates in metres for texturing.
    su = u * b.width
    sv = (1 - v) * (b.y_top - b.y_base) + b.y_base
    shade = np.clip(v, 0.0, 1.0)

    def world_fn(s, mm, b=b, su=su, sv=sv):
      px, pz = b.at(s)
      return cam.project(px - b.width / 2 + su[mm], sv[mm], pz, s)

    cv.paint(sl, m, CID[b.cls], su, sv, b.seed, shade, zr, world_fn)

  # Ego-vehicle hood at the bottom centre: moves with the camera.
  hood = ((cols + 0.5 - cx_img) / (0.42 * w)) ** 2 + (
      (rows + 0.5 - 1.06 * h) / (0.15 * h)
  ) ** 2 < 1
  cv.paint(
      full,
      hood,
      CID['ego'],
      cols / w,
      rows / h,
      7,
      0.0,
      1.0,
      lambda s, m: (cols[m], rows[m]),
  )
  return Render(
      cv.sem,
      cv.surf,
      cv.seed,
      cv.shade,
      cv.depth,
      {s: cv.flows[s].astype(np.float32) for s in earlier},
  )


def sample_camera(
    rng: np.random.Generator, height: int, width: int, z0: float
) -> Camera:
  """Samples a camera with driving-like speed and sway."""
  return Camera(
      height=height,
      width=width,
      focal=width * rng.uniform(0.85, 1.0),
      horizon=height * rng.uniform(0.38, 0.48),
      cam_height=rng.uniform(1.4, 1.8),
      z0=z0,
      speed=rng.uniform(0.5, 1.1),
      x_offset=rng.uniform(-1.5, 1.5),
      sway_amp=rng.uniform(0.0, 0.3),
      sway_freq=rng.uniform(0.02, 0.1),
      sway_phase=rng.uniform(0, 2 * np.pi),
  )
