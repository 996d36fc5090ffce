"""Tiny fixture trees in the exact VIPER and Cityscapes-Seq layouts."""

import os

import numpy as np
from PIL import Image

from dastc_jax.data import layouts


def _save(path, array, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kw)


def _flow(path, flow):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path, np.int16(flow * 10))


def write_viper(root, flow_dir, rng, h=24, w=32):
  """seq 001 with frames 9, 10, 19, 20, 30 (29 missing); returns arrays."""
  frames, raws = {}, {}
  for f in (9, 10, 19, 20, 30):
    # Smooth content so that the JPEG round trip stays close.
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy * 200 // h + f, xx * 200 // w,
                    np.full((h, w), rng.integers(0, 255))], -1).astype(
                        np.uint8)
    raw = rng.choice(np.array([2, 3, 4, 7, 8, 9, 20, 25], np.uint8), (h, w))
    # An ego-vehicle car component at the bottom centre and another car.
    raw[h - 4:, w // 2 - 4:w // 2 + 4] = 24
    raw[:3, :3] = 24
    raw[h - 5, :] = 3  # separates the ego component from anything above
    # A car pixel touching the ego vehicle only diagonally: part of it under
    # 8-connectivity (cv2.connectedComponents' default in the reference).
    raw[h - 5, w // 2 + 4] = 24
    frames[f], raws[f] = img, raw
    _save(layouts.viper_image(root, 'train', 1, f), img, quality=95)
    lab = Image.fromarray(raw)
    if f % 20 == 0:  # some class maps are palette images, as in VIPER
      lab = lab.convert('P')
    os.makedirs(os.path.dirname(layouts.viper_label(root, 'train', 1, f)),
                exist_ok=True)
    lab.save(layouts.viper_label(root, 'train', 1, f))
  flows = {}
  for t in (10, 20):
    flows[t] = np.round(rng.normal(size=(h // 2, w // 2, 2)) * 30) / 10
    _flow(layouts.viper_flow(flow_dir, 1, t), flows[t])
  return frames, raws, flows


def write_cityscapes(root, flow_dirs, rng, h=16, w=32):
  """train: aachen seq 0 (frames 17-19); val: frankfurt seq 3 (18-19)."""
  out = {}
  for split, city, seq, frames in (('train', 'aachen', 0, (17, 18, 19)),
                                   ('val', 'frankfurt', 3, (18, 19))):
    for f in frames:
      img = rng.integers(0, 255, (h, w, 3), np.uint8)
      out[(split, f)] = img
      _save(layouts.cs_image(root, split, city, seq, f), img)
    gt = rng.choice(np.array([0, 1, 7, 8, 11, 17, 21, 23, 24, 25, 26, 33],
                             np.uint8), (h, w))
    out[(split, 'gt')] = gt
    _save(layouts.cs_label(root, split, city, seq, 19), gt)
    pairs = ((19, 18), (19, 17), (18, 17)) if split == 'train' else ((19,
                                                                      18),)
    for t, s in pairs:
      fl = np.round(rng.normal(size=(h, w, 2)) * 20) / 10
      out[(split, t, s)] = fl
      _flow(layouts.cs_flow(flow_dirs[split], city, seq, t, s), fl)
  return out
