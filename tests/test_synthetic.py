"""The synthetic world: exact flows, real layouts, determinism, caching."""

import dataclasses
import glob
import hashlib
import json
import os

import numpy as np
import pytest
import scipy.ndimage

from configs import common
from dastc_jax.data import transforms
from dastc_jax.data.synthetic import scene as scn
from dastc_jax.data.synthetic import style as sty
from dastc_jax.data.synthetic import world as synthetic


def _render_pair(seed, t=30, static=False):
  rng = np.random.default_rng(seed)
  cam = scn.sample_camera(rng, 96, 160, z0=0.0)
  scene = scn.sample_scene(rng, 0.0, cam.position(t)[1] + scn.ZFAR, (0, t))
  if static:  # ground and walls only: nothing can occlude anything
    scene = dataclasses.replace(scene, billboards=[], fences=([], []))
  return (
      cam,
      scn.render(scene, cam, t, (t - 1, t - 2)),
      {s: scn.render(scene, cam, s, ()) for s in (t - 1, t - 2)},
  )


def _interior_match(cur, other, flow):
  """Same-surface agreement at p + F(p), away from boundaries and borders."""
  h, w = flow.shape[:2]
  yy, xx = np.mgrid[0:h, 0:w]
  qy, qx = yy + flow[..., 1], xx + flow[..., 0]
  inside = (qy >= 1) & (qy <= h - 2) & (qx >= 1) & (qx <= w - 2)
  qyi = np.clip(np.round(qy).astype(int), 0, h - 1)
  qxi = np.clip(np.round(qx).astype(int), 0, w - 1)

  def uniform(m):  # the 3x3 neighbourhood is one surface
    return scipy.ndimage.maximum_filter(m, 3) == scipy.ndimage.minimum_filter(
        m, 3
    )

  interior = (
      inside
      & uniform(cur.seed * 100 + cur.sem)
      & uniform(other.seed * 100 + other.sem)[qyi, qxi]
  )
  agree = (other.seed[qyi, qxi] == cur.seed) & (other.sem[qyi, qxi] == cur.sem)
  return interior, agree, (qy, qx)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_flow_is_exact_on_an_occlusion_free_street(seed):
  cam, cur, prev = _render_pair(seed, static=True)
  for s in (29, 28):
    flow = cur.flows[s]
    assert np.abs(flow).max() > 1.0  # the camera does move
    interior, agree, (qy, qx) = _interior_match(cur, prev[s], flow)
    assert interior.mean() > 0.75
    assert agree[interior].all()
    # Sub-pixel: the ground's world depth Z read at p + F(p) in frame s is
    # Z at p in frame t to < 0.5% (a 0.5 px flow error moves it ~2%).
    ground = interior & np.isin(
        cur.sem, [scn.CID['road'], scn.CID['sidewalk'], scn.CID['terrain']]
    )
    ground &= (
        np.mgrid[0 : flow.shape[0], 0 : flow.shape[1]][0] > cam.horizon + 10
    )
    z_prev = scipy.ndimage.map_coordinates(
        prev[s].surf[..., 1], [qy, qx], order=1
    )
    depth = cur.surf[..., 1] - cam.position(30)[1]
    rel = np.abs(z_prev - cur.surf[..., 1])[ground] / depth[ground]
    assert ground.sum() > 1000 and rel.max() < 0.005


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_flow_with_moving_objects_only_misses_true_occlusions(seed):
  _, cur, prev = _render_pair(seed)
  interior, agree, _ = _interior_match(cur, prev[29], cur.flows[29])
  # Moving cars and people disocclude a little background between frames.
  assert agree[interior].mean() > 0.99


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_scale_crop_flip_of_a_clip_matches_the_world_rendered_larger(seed):
  """The training crop (rescale x1.5, crop, flip) of a 96x160 render and its
  exact flow equals, at the same window, the same scene rendered at 144x240
  with its own exact flow: labels and flows are cut at one place and the
  flow's magnitudes are scaled (not scaling them is 8x further off)."""
  rng = np.random.default_rng(seed)
  t, s = 30, 1.5
  cam = scn.sample_camera(rng, 96, 160, z0=0.0)
  scene = scn.sample_scene(rng, 0.0, cam.position(t)[1] + scn.ZFAR, (0, t))
  scene = dataclasses.replace(scene, billboards=[], fences=([], []))
  small = scn.render(scene, cam, t, (t - 1,))
  big_cam = dataclasses.replace(
      cam, height=144, width=240, focal=cam.focal * s, horizon=cam.horizon * s
  )
  big = scn.render(scene, big_cam, t, (t - 1,))
  clip = {
      'frames': np.zeros((1, 96, 160, 3), np.uint8),
      'labels': small.sem[None].astype(np.uint8),
      'flow': small.flows[t - 1].astype(np.float32),
  }
  out = transforms.RandomScaleCrop(scale=(s, s), crop_size=(64, 96))
  out = out.random_map(clip, np.random.default_rng(seed))
  out = transforms.RandomFlip(p=1.0).random_map(out, np.random.default_rng(0))
  # The reference: the large render flipped (dx negated), at the window
  # where the transformed labels agree best with its classes.
  ref_sem = big.sem[:, ::-1]
  ref_flow = big.flows[t - 1][:, ::-1] * np.array([-1.0, 1.0])
  agree = {
      (r, c): (ref_sem[r : r + 64, c : c + 96] == out['labels'][0]).mean()
      for r in range(144 - 64 + 1)
      for c in range(240 - 96 + 1)
  }
  (r0, c0), best = max(agree.items(), key=lambda kv: kv[1])
  assert best > 0.97
  ref = ref_flow[r0 : r0 + 64, c0 : c0 + 96]
  err = np.linalg.norm(out['flow'] - ref, axis=-1)
  unscaled = np.linalg.norm(out['flow'] / s - ref, axis=-1)
  # What is left is the align-corners resampling of flows (the reference's
  # convention) against the renderer's pixel centres: about 1/4 px of
  # position at the window's far edge, times the flow's gradient.
  assert np.median(err) < 0.15
  assert np.percentile(err, 90) < 0.03 * np.abs(ref).max()
  assert np.percentile(unscaled, 90) > 8 * np.percentile(err, 90)


def test_target_style_differs_from_source_for_the_same_scene():
  _, cur, _ = _render_pair(4)
  src = sty.source_style(cur).astype(np.float64)
  tgt = sty.target_style(
      cur,
      sty.sample_target_look(np.random.default_rng(0)),
      np.random.default_rng(1),
  ).astype(np.float64)
  assert np.abs(src - tgt).mean() > 20


def _digest(root):
  h = hashlib.sha256()
  for p in sorted(glob.glob(os.path.join(root, '**', '*'), recursive=True)):
    if os.path.isfile(p):
      h.update(os.path.relpath(p, root).encode())
      with open(p, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def test_world_layout_and_determinism(tiny_world, tmp_path):
  root = tiny_world
  cfg = common.synthetic_world('tiny')
  params = synthetic.world_params(cfg)
  with open(os.path.join(root, 'world.json')) as f:
    assert json.load(f) == params
  v = os.path.join(root, 'Viper', 'train')
  assert os.path.exists(os.path.join(v, 'img', '001', '001_00010.jpg'))
  assert os.path.exists(os.path.join(v, 'img', '001', '001_00009.jpg'))
  assert os.path.exists(os.path.join(v, 'cls', '001', '001_00010.png'))
  assert os.path.exists(
      os.path.join(
          root,
          'estimated_optical_flow_viper_train',
          '001_0001000009_int16_x10.npy',
      )
  )
  cs = os.path.join(root, 'Cityscapes')
  seq = glob.glob(
      os.path.join(cs, 'leftImg8bit_sequence', 'train', '*', '*.png')
  )
  gt = glob.glob(os.path.join(cs, 'gtFine', 'train', '*', '*.png'))
  assert len(seq) == 3 * params['target_train_clips']
  # labelIds only on the annotated (20th) frame of each snippet.
  assert len(gt) == params['target_train_clips']
  assert all(p.endswith('_000019_gtFine_labelIds.png') for p in gt)
  flows = glob.glob(
      os.path.join(root, 'estimated_optical_flow_cityscapes_seq_train', '*.npy')
  )
  assert len(flows) == 3 * params['target_train_clips']
  f = np.load(flows[0])
  assert f.dtype == np.int16 and f.shape == tuple(params['target_size']) + (2,)
  # Same seed -> the same bytes.
  again = str(tmp_path / 'again')
  synthetic.generate(again, params)
  assert _digest(again) == _digest(root)


def test_world_cache_is_reused_and_checked(world_cache, tiny_world):
  cfg = common.synthetic_world('tiny')
  cfg.cache_dir = world_cache
  assert synthetic.ensure_world(cfg) == tiny_world
  cfg2 = common.synthetic_world('tiny')
  cfg2.cache_dir = world_cache
  cfg2.seed = 5
  other = synthetic.world_dir(world_cache, synthetic.world_params(cfg2))
  assert other != tiny_world
  os.makedirs(other)
  with open(os.path.join(other, 'world.json'), 'w') as f:
    json.dump({'not': 'this world'}, f)
  with pytest.raises(RuntimeError, match='different world'):
    synthetic.ensure_world(cfg2)


def test_hard_shift_is_a_separate_world_that_histograms_cannot_undo():
  """The ``hard`` target has its own cache key (the default world keeps
  its key), and after matching a target frame's histograms to the source
  frame of the same scene, its per-class mean colours stay further from
  the source's than the default target's do (local and per-class shift)."""
  from dastc_jax.data.synthetic import scene as scn  # pylint: disable=g-import-not-at-top
  from dastc_jax.data.synthetic import style as sty  # pylint: disable=g-import-not-at-top
  from dastc_jax.data import transforms  # pylint: disable=g-import-not-at-top

  cfg = common.synthetic_world('tiny')
  assert 'shift' not in synthetic.world_params(cfg)
  cfg.shift = 'hard'
  assert synthetic.world_params(cfg)['shift'] == 'hard'
  cfg.shift = 'night'
  with pytest.raises(ValueError, match='config.data.synthetic.shift'):
    synthetic.world_params(cfg)
  errors = {'default': [], 'hard': []}
  styles = {
      'default': (sty.sample_target_look, sty.target_style),
      'hard': (sty.sample_hard_look, sty.hard_target_style),
  }
  for seed in range(3):
    rng = np.random.default_rng(seed)
    cam = scn.sample_camera(rng, 64, 128, z0=10)
    scene = scn.sample_scene(
        rng, cam.z0, cam.position(19)[1] + scn.ZFAR, (17, 19)
    )
    r = scn.render(scene, cam, 19, ())
    src = sty.source_style(r)
    for name, (look, style) in styles.items():
      tgt = style(r, look(rng), np.random.default_rng(seed))
      matched = transforms.match_histograms(tgt, src).astype(np.float64)
      errors[name].append(
          np.mean(
              [
                  np.linalg.norm(
                      matched[r.sem == c].mean(0)
                      - src[r.sem == c].astype(np.float64).mean(0)
                  )
                  for c in np.unique(r.sem)
                  if np.sum(r.sem == c) >= 20
              ]
          )
      )
  # Measured: default 36.8-47.2, hard 67.2-75.4 (RGB units, 4 scenes).
  assert np.mean(errors['hard']) > 1.4 * np.mean(errors['default'])


def _scene_pair_renders(seed, family, size=(128, 256)):
  rng = np.random.default_rng(seed)
  cam = scn.sample_camera(rng, *size, z0=10)
  scene = scn.sample_scene(
      rng, cam.z0, cam.position(19)[1] + scn.ZFAR, (17, 19), family
  )
  return rng, scn.render(scene, cam, 19, ())


def test_winter_world_is_another_street_family_and_weather():
  """``shift='winter'``: its own cache key; its suburb has another object
  mix than the city (fewer buildings and people, more trees and terrain);
  after histogram matching its per-class colours stay far from the
  source's (the fog and snow are per depth and per class)."""
  from dastc_jax.data.synthetic import winter  # pylint: disable=g-import-not-at-top
  from dastc_jax.data import transforms  # pylint: disable=g-import-not-at-top

  cfg = common.synthetic_world('tiny')
  cfg.shift = 'winter'
  assert synthetic.world_params(cfg)['shift'] == 'winter'
  counts = {name: np.zeros(len(scn.CLASSES)) for name in scn.FAMILIES}
  errors = {'default': [], 'winter': []}
  for seed in range(4):
    for name, family in scn.FAMILIES.items():
      _, r = _scene_pair_renders(seed, family)
      counts[name] += np.bincount(r.sem.ravel(), minlength=len(scn.CLASSES))
    rng, r = _scene_pair_renders(seed, scn.SUBURB, (64, 128))
    src = sty.source_style(r)
    looks = {
        'default': sty.target_style(
            r, sty.sample_target_look(rng), np.random.default_rng(seed)
        ),
        'winter': winter.winter_style(
            r, winter.sample_look(rng), np.random.default_rng(seed)
        ),
    }
    for name, tgt in looks.items():
      matched = transforms.match_histograms(tgt, src).astype(np.float64)
      errors[name].append(
          np.mean(
              [
                  np.linalg.norm(
                      matched[r.sem == c].mean(0)
                      - src[r.sem == c].astype(np.float64).mean(0)
                  )
                  for c in np.unique(r.sem)
                  if np.sum(r.sem == c) >= 20
              ]
          )
      )
  share = {k: v / v.sum() for k, v in counts.items()}
  cid = scn.CID
  # Measured (4 scenes, 128x256): building 18.1% -> 4.0%, person 1.1% ->
  # 0.3%, tree 16.1% -> 26.9%, terrain 1.0% -> 5.1%.
  assert share['suburb'][cid['building']] < 0.5 * share['city'][cid['building']]
  assert share['suburb'][cid['person']] < 0.5 * share['city'][cid['person']]
  assert share['suburb'][cid['tree']] > 1.3 * share['city'][cid['tree']]
  assert share['suburb'][cid['terrain']] > 2 * share['city'][cid['terrain']]
  # Measured: default 32.4-40.8, winter 73.9-87.0 (RGB units, 4 scenes).
  assert np.mean(errors['winter']) > 1.4 * np.mean(errors['default'])


def test_winter_fog_veils_with_depth():
  """Koschmieder's law: far road is closer to the sky's (airlight) colour
  than near road, and a clear day (visibility 1e9 m) has no such veil."""
  from dastc_jax.data.synthetic import winter  # pylint: disable=g-import-not-at-top

  rng, r = _scene_pair_renders(3, scn.SUBURB)
  look = winter.sample_look(rng)
  look['noise'] = 0.0
  gaps = {}
  for visibility in (80.0, 1e9):
    look['visibility'] = visibility
    img = winter.winter_style(r, look, rng).astype(np.float64)
    sky = img[r.sem == scn.CID['sky']].mean(0)
    road = r.sem == scn.CID['road']
    dist = np.linalg.norm(img - sky, axis=-1)
    gaps[visibility] = (
        dist[road & (r.depth < 12)].mean(),
        dist[road & (r.depth > 50)].mean(),
    )
  near, far = gaps[80.0]
  assert far < 0.6 * near
  clear_near, clear_far = gaps[1e9]
  assert clear_far > 0.8 * clear_near
