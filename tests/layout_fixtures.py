"""Tiny fixture trees in the exact VIPER and Cityscapes-Seq layouts."""

import os

import numpy as np
from PIL import Image

from dastc_jax.data.datasets import layouts


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
    img = np.stack(
        [
            yy * 200 // h + f,
            xx * 200 // w,
            np.full((h, w), rng.integers(0, 255)),
        ],
        -1,
    ).astype(np.uint8)
    raw = rng.choice(np.array([2, 3, 4, 7, 8, 9, 20, 25], np.uint8), (h, w))
    # An ego-vehicle car component at the bottom centre and another car.
    raw[h - 4 :, w // 2 - 4 : w // 2 + 4] = 24
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
    os.makedirs(
        os.path.dirname(layouts.viper_label(root, 'train', 1, f)), exist_ok=True
    )
    lab.save(layouts.viper_label(root, 'train', 1, f))
  flows = {}
  for t in (10, 20):
    flows[t] = np.round(rng.normal(size=(h // 2, w // 2, 2)) * 30) / 10
    _flow(layouts.viper_flow(flow_dir, 1, t), flows[t])
  return frames, raws, flows


def write_cityscapes(root, flow_dirs, rng, h=16, w=32):
  """train: aachen seq 0 (frames 17-19); val: frankfurt seq 3 (18-19)."""
  out = {}
  for split, city, seq, frames in (
      ('train', 'aachen', 0, (17, 18, 19)),
      ('val', 'frankfurt', 3, (18, 19)),
  ):
    for f in frames:
      img = rng.integers(0, 255, (h, w, 3), np.uint8)
      out[(split, f)] = img
      _save(layouts.cs_image(root, split, city, seq, f), img)
    gt = rng.choice(
        np.array([0, 1, 7, 8, 11, 17, 21, 23, 24, 25, 26, 33], np.uint8), (h, w)
    )
    out[(split, 'gt')] = gt
    _save(layouts.cs_label(root, split, city, seq, 19), gt)
    pairs = ((19, 18), (19, 17), (18, 17)) if split == 'train' else ((19, 18),)
    for t, s in pairs:
      fl = np.round(rng.normal(size=(h, w, 2)) * 20) / 10
      out[(split, t, s)] = fl
      _flow(layouts.cs_flow(flow_dirs[split], city, seq, t, s), fl)
  return out


def png16(path, array):
  """Writes ``[H, W, 3]`` uint16 as a 16-bit RGB PNG (plain zlib + struct,
  independent of the OpenCV reader under test)."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  h, w, _ = array.shape
  big = array.astype('>u2')
  raw = b''.join(b'\x00' + big[i].tobytes() for i in range(h))

  def chunk(kind, data):
    return (
        struct.pack('>I', len(data))
        + kind
        + data
        + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(
        b'\x89PNG\r\n\x1a\n'
        + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0))
        + chunk(b'IDAT', zlib.compress(raw))
        + chunk(b'IEND', b'')
    )


def write_synthia_seq(root, flow_dir, rng, frames=(0, 1, 2)):
  """SEQS-04-DAWN in the reference's flattened layout at 760x1280.

  Frame 1's flow is on the uncropped 760x1280 grid at half resolution (it
  must be cut like the frame), frame 2's on the 640x1280 crop.
  """
  out = {}
  h, w = 760, 1280
  for t in frames:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (np.arange(w) % 251)[None]
    img[..., 1] = (np.arange(h) % 241)[:, None]
    img[..., 2] = t * 40
    raw = rng.choice(
        np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15], np.uint16),
        (h // 40, w // 40),
    )
    raw = np.kron(raw, np.ones((40, 40), np.uint16))
    lab = np.stack([raw, np.full_like(raw, 300), np.full_like(raw, 7)], -1)
    _save(os.path.join(root, 'rgb', f'{t:06d}.png'), img)
    png16(os.path.join(root, 'label', f'{t:06d}.png'), lab)
    out[t] = (img, raw)
  for t in frames[1:]:
    grid = (380, 640) if t == 1 else (320, 640)
    fl = np.round(rng.normal(size=grid + (2,)) * 20) / 10
    out[('flow', t)] = fl
    _flow(os.path.join(flow_dir, f'{t:06d}_int16_x10.npy'), fl)
  return out


def write_gta5(root, rng, n=3, h=20, w=36):
  out = {}
  for i in range(1, n + 1):
    img = rng.integers(0, 255, (h, w, 3), np.uint8)
    lab = rng.choice(
        np.array([0, 7, 8, 11, 12, 17, 24, 25, 26, 31, 33], np.uint8), (h, w)
    )
    _save(os.path.join(root, 'images', f'{i:05d}.png'), img)
    # GTA5 labels are palette PNGs holding labelIds.
    os.makedirs(os.path.join(root, 'labels'), exist_ok=True)
    Image.fromarray(lab).convert('P').save(
        os.path.join(root, 'labels', f'{i:05d}.png')
    )
    out[i] = (img, lab)
  return out


def write_synthia_rand(root, rng, n=2, h=19, w=32):
  out = {}
  for i in range(n):
    img = rng.integers(0, 255, (h, w, 3), np.uint8)
    raw = rng.choice(np.arange(23, dtype=np.uint16), (h, w))
    _save(os.path.join(root, 'RGB', f'{i:07d}.png'), img)
    png16(
        os.path.join(root, 'GT', 'LABELS', f'{i:07d}.png'),
        np.stack([raw, raw * 0 + 9, raw * 0 + 1000], -1),
    )
    out[i] = (img, raw)
  return out


def write_cityscapes_images(root, rng, h=16, w=32):
  """leftImg8bit + gtFine: train aachen_000000_000019, val 2 images."""
  out = {}
  for split, names in (
      ('train', (('aachen', 0, 19),)),
      ('val', (('lindau', 0, 19), ('munster', 2, 19))),
  ):
    for city, seq, f in names:
      img = rng.integers(0, 255, (h, w, 3), np.uint8)
      gt = rng.choice(
          np.array([0, 7, 8, 12, 17, 21, 24, 25, 28, 33], np.uint8), (h, w)
      )
      stem = f'{city}_{seq:06d}_{f:06d}'
      _save(
          os.path.join(
              root, 'leftImg8bit', split, city, f'{stem}_leftImg8bit.png'
          ),
          img,
      )
      _save(layouts.cs_label(root, split, city, seq, f), gt)
      out[stem] = (img, gt)
  return out
