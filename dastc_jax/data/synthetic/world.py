"""The built-in synthetic domain-shift world, written in the real layouts.

Source = VIPER layout (JPEG frames, raw-id PNG class maps including the ego
vehicle as ``car``), target = Cityscapes-Seq layout (``leftImg8bit_sequence``
frames t-2..t, ``gtFine`` labelIds on the annotated frame only), and exact
flows as ``*_int16_x10.npy`` with the original file names. For the image
domain the frames t are also written in the GTA5 layout (source) and the
Cityscapes ``leftImg8bit`` layout (target). It is prepared by
the same TFDS builders as the real datasets (into ``{world}/tfds``) and read
by the same pipeline.

Generation is deterministic from ``config.seed`` (every clip has its own
seed, so the result does not depend on the number of workers), atomic (built
in a temporary folder, then renamed) and cached: a folder whose
``world.json`` matches the parameters is reused.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from dastc_jax import errors
from dastc_jax.data.datasets import layouts
from dastc_jax.data.datasets import prepare
from dastc_jax.data import labels
from dastc_jax.data.synthetic import scene as scn
from dastc_jax.data.synthetic import style as sty
from dastc_jax.data.synthetic import winter

VERSION = 6  # bump when the rendering or the storage changes
TFDS_DIR = 'tfds'  # the prepared copy inside a world folder
STRIDE = 10  # VIPER samples every 10th frame.
ANNOTATED = 19  # Cityscapes annotates the 20th frame of each snippet.

# World class -> VIPER raw class name (poles are VIPER "infrastructure"; the
# ego vehicle is labelled car, as in VIPER, and removed by the loader).
_VIPER_NAME = {
    'pole': 'infrastructure',
    'light': 'trafficlight',
    'sign': 'trafficsign',
    'ego': 'car',
}
CITYSCAPES_ID = {
    'ego': 1,
    'road': 7,
    'sidewalk': 8,
    'building': 11,
    'fence': 13,
    'pole': 17,
    'light': 19,
    'sign': 20,
    'vegetation': 21,
    'tree': 21,
    'terrain': 22,
    'sky': 23,
    'person': 24,
    'car': 26,
    'truck': 27,
    'bus': 28,
    'motorcycle': 32,
    'bicycle': 33,
}
_TO_VIPER = np.array(
    [labels.VIPER_RAW[_VIPER_NAME.get(c, c)] for c in scn.CLASSES], np.uint8
)
_TO_CS = np.array([CITYSCAPES_ID[c] for c in scn.CLASSES], np.uint8)
# World class -> SYNTHIA raw class id (channel 0 of the 16-bit label), the
# inverse of labels.SYNTHIA_TO_TRAIN; the classes SYNTHIA12 lacks (terrain,
# the large vehicles, two-wheelers, the ego vehicle) are void (0).
SYNTHIA_ID = {
    'sky': 1,
    'building': 2,
    'road': 3,
    'sidewalk': 4,
    'fence': 5,
    'vegetation': 6,
    'tree': 6,
    'pole': 7,
    'car': 8,
    'sign': 9,
    'person': 10,
    'light': 15,
}
_TO_SYNTHIA = np.array([SYNTHIA_ID.get(c, 0) for c in scn.CLASSES], np.uint16)
_DOMAIN = {'viper': 1, 'cityscapes': 2, 'synthia_seq': 3}
_SPLIT = {'train': 1, 'val': 2}
# Target: 'default' (camera look: textures, cast, blur, noise), 'hard'
# (another city at dusk after rain: per-class materials and local
# illumination that a global histogram mapping cannot undo) or 'winter'
# (another kind of street, a suburb, in snow and fog; docs/synthetic_world.md).
# shift -> (street family, clip look sampler, frame style).
TARGETS = {
    'default': (scn.CITY, sty.sample_target_look, sty.target_style),
    'hard': (scn.CITY, sty.sample_hard_look, sty.hard_target_style),
    'winter': (scn.SUBURB, winter.sample_look, winter.winter_style),
}
SHIFTS = tuple(TARGETS)
CITIES = {'train': ('synthtown', 'synthburg'), 'val': ('synthville',)}


def world_params(config: Any) -> dict[str, Any]:
  """The parameters that define a world (and its cache key)."""
  keys = (
      'seed',
      'source_size',
      'target_size',
      'source_train_seqs',
      'source_val_seqs',
      'samples_per_seq',
      'target_train_clips',
      'target_val_clips',
  )
  params = {k: config[k] for k in keys}
  for k in ('source_size', 'target_size'):
    params[k] = [int(v) for v in params[k]]
  shift = config.shift
  if shift not in SHIFTS:
    raise errors.ConfigError(
        f'config.data.synthetic.shift={shift!r}; expected one ' f'of {SHIFTS}.'
    )
  if shift != 'default':  # the default world keeps its cache key
    params['shift'] = shift
  params['version'] = VERSION
  return params


def world_dir(cache_dir: str, params: dict[str, Any]) -> str:
  digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()
  return os.path.join(os.path.expanduser(cache_dir), f'world-{digest[:12]}')


def _save_flow(path: str, flow: np.ndarray) -> None:
  np.save(path, np.int16(np.clip(flow * 10.0, -32768, 32767)))


def _viper_sequence(job: tuple[str, dict[str, Any], str, int]) -> int:
  root, params, split, seq = job
  rng = np.random.default_rng(
      [params['seed'], _DOMAIN['viper'], _SPLIT[split], seq]
  )
  h, w = params['source_size']
  n = params['samples_per_seq']
  cam = scn.sample_camera(rng, h, w, z0=0.0)
  last = STRIDE * n
  scene = scn.sample_scene(
      rng, cam.z0, cam.position(last)[1] + scn.ZFAR, (0, last)
  )
  vroot = os.path.join(root, 'Viper')
  flow_dir = os.path.join(root, f'estimated_optical_flow_viper_{split}')
  for k in range(1, n + 1):
    t = STRIDE * k
    for frame, earlier in ((t, (t - 1,)), (t - 1, ())):
      r = scn.render(scene, cam, frame, earlier)
      img_path = layouts.viper_image(vroot, split, seq, frame)
      cls_path = layouts.viper_label(vroot, split, seq, frame)
      os.makedirs(os.path.dirname(img_path), exist_ok=True)
      os.makedirs(os.path.dirname(cls_path), exist_ok=True)
      styled = sty.source_style(r)
      Image.fromarray(styled).save(img_path, quality=95)
      Image.fromarray(_TO_VIPER[r.sem]).save(cls_path)
      if split == 'train' and frame == t:
        # The image-domain source: the same frames t in the GTA5 layout
        # (PNG frames, Cityscapes labelIds with the ego vehicle as id 1).
        # With params['gta5_size'] (the rehearsal: GTA5's 1052x1914) the
        # render is resized to it (bilinear frame, nearest labels).
        i = (seq - 1) * n + k
        gsize = params.get('gta5_size')
        for sub, arr, how in (
            ('images', styled, Image.BILINEAR),
            ('labels', _TO_CS[r.sem], Image.NEAREST),
        ):
          path = os.path.join(root, 'GTA5', sub, f'{i:05d}.png')
          os.makedirs(os.path.dirname(path), exist_ok=True)
          img = Image.fromarray(arr)
          if gsize:
            img = img.resize((gsize[1], gsize[0]), how)
          img.save(path)
      if earlier:
        _save_flow(layouts.viper_flow(flow_dir, seq, t), r.flows[t - 1])
  return n


def _synthia_seq_sequence(job: tuple[str, dict[str, Any], str, int]) -> int:
  """SYNTHIA-Seq layout: ``SynthiaSeq/SEQS-04-DAWN/{rgb,label}/{t:06d}.png``
  (16-bit RGB labels, class id in channel 0) for t = 0..N, and the flows
  t -> t-1 beside it. Needs OpenCV (16-bit PNG writing)."""
  import cv2  # pylint: disable=g-import-not-at-top

  root, params, _, seq = job
  rng = np.random.default_rng([params['seed'], _DOMAIN['synthia_seq'], seq])
  h, w = params['synthia_seq_size']
  n = params['synthia_seq_frames']
  cam = scn.sample_camera(rng, h, w, z0=0.0)
  scene = scn.sample_scene(rng, cam.z0, cam.position(n)[1] + scn.ZFAR, (0, n))
  base = os.path.join(root, 'SynthiaSeq')
  seq_dir = os.path.join(base, 'SEQS-04-DAWN')
  flow_dir = os.path.join(base, 'estimated_optical_flow_synthiaseq_train')
  for sub in ('rgb', 'label'):
    os.makedirs(os.path.join(seq_dir, sub), exist_ok=True)
  os.makedirs(flow_dir, exist_ok=True)
  for t in range(n + 1):
    r = scn.render(scene, cam, t, (t - 1,) if t else ())
    Image.fromarray(sty.source_style(r)).save(
        os.path.join(seq_dir, 'rgb', f'{t:06d}.png')
    )
    ids = _TO_SYNTHIA[r.sem]
    # OpenCV writes BGR: the class id goes to the last channel (R).
    label = np.stack([np.zeros_like(ids), np.zeros_like(ids), ids], -1)
    cv2.imwrite(os.path.join(seq_dir, 'label', f'{t:06d}.png'), label)
    if t:
      _save_flow(layouts.synthia_seq_flow(flow_dir, t), r.flows[t - 1])
  return n


def _cityscapes_clip(job: tuple[str, dict[str, Any], str, int]) -> int:
  root, params, split, index = job
  rng = np.random.default_rng(
      [params['seed'], _DOMAIN['cityscapes'], _SPLIT[split], index]
  )
  cities = CITIES[split]
  city, seq = cities[index % len(cities)], index // len(cities)
  h, w = params['target_size']
  t = ANNOTATED
  cam = scn.sample_camera(rng, h, w, z0=rng.uniform(0, 50))
  family, sample_look, style = TARGETS[params.get('shift', 'default')]
  scene = scn.sample_scene(
      rng, cam.z0, cam.position(t)[1] + scn.ZFAR, (t - 2, t), family
  )
  look = sample_look(rng)
  croot = os.path.join(root, 'Cityscapes')
  flow_dir = os.path.join(
      root, f'estimated_optical_flow_cityscapes_seq_{split}'
  )
  frames = (t, t - 1, t - 2) if split == 'train' else (t, t - 1)
  for frame in frames:
    earlier = tuple(s for s in frames if s < frame)
    if split == 'val' or frame == t - 2:
      earlier = earlier[:1] if frame == t else ()
    r = scn.render(scene, cam, frame, earlier)
    img_path = layouts.cs_image(croot, split, city, seq, frame)
    os.makedirs(os.path.dirname(img_path), exist_ok=True)
    noise_rng = np.random.default_rng(
        [params['seed'], 7, _SPLIT[split], index, frame]
    )
    styled = style(r, look, noise_rng)
    Image.fromarray(styled).save(img_path)
    if frame == t:
      gt_path = layouts.cs_label(croot, split, city, seq, frame)
      os.makedirs(os.path.dirname(gt_path), exist_ok=True)
      Image.fromarray(_TO_CS[r.sem]).save(gt_path)
      # The image-domain target: annotated frames in leftImg8bit/.
      still = os.path.join(
          croot, 'leftImg8bit', split, city, os.path.basename(img_path)
      )
      os.makedirs(os.path.dirname(still), exist_ok=True)
      Image.fromarray(styled).save(still)
    for s in earlier:
      _save_flow(layouts.cs_flow(flow_dir, city, seq, frame, s), r.flows[s])
  return 1


def generate(
    root: str,
    params: dict[str, Any],
    num_workers: int = 1,
    prepare_tfds: bool = True,
) -> None:
  """Writes a complete world into the (new) folder ``root``; with
  ``prepare_tfds=False`` only the dataset layouts and flows (for a caller
  that runs ``python -m dastc_jax.prepare`` on them itself). With
  ``params['synthia_seq_frames'] = N`` (and ``synthia_seq_size``) it also
  writes a SYNTHIA-Seq sequence of N + 1 frames, never prepared here."""
  for name in (
      'viper_train',
      'viper_val',
      'cityscapes_seq_train',
      'cityscapes_seq_val',
  ):
    os.makedirs(
        os.path.join(root, f'estimated_optical_flow_{name}'), exist_ok=True
    )
  jobs = (
      [
          (_viper_sequence, (root, params, 'train', s))
          for s in range(1, params['source_train_seqs'] + 1)
      ]
      + [
          (_viper_sequence, (root, params, 'val', s))
          for s in range(1, params['source_val_seqs'] + 1)
      ]
      + [
          (_cityscapes_clip, (root, params, 'train', i))
          for i in range(params['target_train_clips'])
      ]
      + [
          (_cityscapes_clip, (root, params, 'val', i))
          for i in range(params['target_val_clips'])
      ]
  )
  if params.get('synthia_seq_frames'):  # only where asked (the rehearsal)
    jobs.append((_synthia_seq_sequence, (root, params, 'train', 1)))
  if num_workers > 1:
    ctx = multiprocessing.get_context('spawn')
    with ctx.Pool(num_workers) as pool:
      results = [pool.apply_async(fn, (arg,)) for fn, arg in jobs]
      for r in results:
        r.get()
  else:
    for fn, arg in jobs:
      fn(arg)
  if not prepare_tfds:
    return
  # Prepared exactly like the real datasets (TFDS ArrayRecord builders).
  for dataset, folder in (
      ('viper', 'Viper'),
      ('cityscapes_seq', 'Cityscapes'),
      ('gta5', 'GTA5'),
      ('cityscapes', 'Cityscapes'),
  ):
    prepare.prepare(
        dataset,
        os.path.join(root, folder),
        os.path.join(root, TFDS_DIR),
        check_counts=False,
    )
  with open(os.path.join(root, 'world.json'), 'w') as f:
    json.dump(params, f, indent=2, sort_keys=True)


def existing_world(config: Any) -> str:
  """The folder of the world described by ``config``; it must have been
  generated (by a training run) already."""
  params = world_params(config)
  root = world_dir(config.cache_dir, params)
  marker = os.path.join(root, 'world.json')
  if not os.path.exists(marker):
    raise FileNotFoundError(
        f'The synthetic world {root} does not exist: a training run with '
        'this config generates it (evaluation does not).'
    )
  return root


def ensure_world(config: Any, num_workers: int = 1) -> str:
  """Returns the folder of the world described by ``config``, generating it.

  Args:
    config: the ``data.synthetic`` config section (``cache_dir`` plus the
      keys of ``world_params``).
    num_workers: generation processes.

  Returns:
    The world folder, holding ``Viper/``, ``Cityscapes/``, the flow folders
    and the prepared ``tfds/`` data folder.
  """
  params = world_params(config)
  root = world_dir(config.cache_dir, params)
  marker = os.path.join(root, 'world.json')
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == params:
        logging.info('Using the cached synthetic world at %s', root)
        return root
    raise RuntimeError(
        f'{root} holds a different world than its name says; '
        'delete it to regenerate.'
    )
  tmp = f'{root}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  logging.info('Generating the synthetic world into %s ...', root)
  generate(tmp, params, num_workers)
  try:
    os.rename(tmp, root)
  except OSError:
    # Another process finished first; keep its copy.
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(marker):
      raise
  logging.info('Synthetic world ready at %s', root)
  return root
