"""grain transforms: decode index records, resize, flip (numpy only).

Decoded examples (native resolution) have these keys:

* source (VIPER layout): ``frames`` ``[2, H, W, 3]`` uint8 (t, t-1),
  ``labels`` ``[2, H, W]`` uint8 train ids, ``flow`` ``[Hf, Wf, 2]`` float32
  (t->t-1);
* target train (Cityscapes-Seq): ``frames`` ``[3, H, W, 3]`` (t, t-1, t-2),
  ``flow`` (t->t-1), ``flow_t_t2`` (t->t-2), ``flow_t1_t2`` (t-1->t-2);
* target val: ``frames`` ``[2, H, W, 3]``, ``flow``, ``label`` ``[H, W]``.

A TFDS builder (datasets issue) yields the same keys, so everything after
the decode step is shared.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from dastc_jax.data import io
from dastc_jax.data import labels

FLOW_KEYS = ('flow', 'flow_t_t2', 'flow_t1_t2')


@dataclasses.dataclass
class DecodeViper(grain.transforms.Map):
  """Reads a VIPER record: frames, raw labels -> train ids, flow."""
  remove_ego: bool = True

  def map(self, rec: dict[str, Any]) -> dict[str, Any]:
    frames = io.stack_frames(rec['frames'])
    labs = []
    for p, frame in zip(rec['labels'], frames):
      raw = io.read_label(p)
      if raw.shape != frame.shape[:2]:
        raise io.DataError(f'Label {p} is {raw.shape}; expected the size of '
                           f'its frame {frame.shape[:2]}.')
      io.check_ids(raw, VIPER_VALID, p)
      if self.remove_ego:
        raw = io.remove_ego_vehicle(raw, labels.VIPER_CAR)
      labs.append(labels.VIPER_TO_TRAIN[raw])
    flow = io.read_flow(rec['flow'])
    io.check_flow_grid(flow, frames.shape[1:3], rec['flow'])
    return {'id': rec['id'], 'frames': frames, 'labels': np.stack(labs),
            'flow': flow}


VIPER_VALID = np.zeros((256,), bool)
VIPER_VALID[:32] = True  # VIPER raw ids 0..31.
CITYSCAPES_VALID = np.zeros((256,), bool)
CITYSCAPES_VALID[:34] = True  # Cityscapes labelIds 0..33.


@dataclasses.dataclass
class DecodeCityscapesSeq(grain.transforms.Map):
  """Reads a Cityscapes-Seq record; maps labelIds with ``class_set``."""
  class_set: str = 'viper15'
  with_label: bool = True

  def map(self, rec: dict[str, Any]) -> dict[str, Any]:
    frames = io.stack_frames(rec['frames'])
    out = {'id': rec['id'], 'frames': frames}
    for key, path in rec['flows'].items():
      out[key] = io.read_flow(path)
      io.check_flow_grid(out[key], frames.shape[1:3], path)
    if self.with_label:
      raw = io.read_label(rec['label'])
      io.check_ids(raw, CITYSCAPES_VALID, rec['label'])
      out['label'] = labels.CITYSCAPES_MAPS[self.class_set][raw]
    return out


def resize_flow_np(flow: np.ndarray, size: Sequence[int],
                   per_axis_scale: bool = False) -> np.ndarray:
  """Host twin of ``ops.warp.resize_flow`` (align-corners bilinear + scale)."""
  h, w = flow.shape[:2]
  if (h, w) == tuple(size):
    return flow

  def taps(n_in, n_out):
    src = (np.arange(n_out) * (n_in - 1) / (n_out - 1) if n_out > 1 and
           n_in > 1 else np.zeros((n_out,)))
    i0 = np.clip(np.floor(src).astype(np.int64), 0, max(n_in - 2, 0))
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

  r0, r1, wr = taps(h, size[0])
  c0, c1, wc = taps(w, size[1])
  rows = flow[r0] + (flow[r1] - flow[r0]) * wr[:, None, None]
  out = rows[:, c0] + (rows[:, c1] - rows[:, c0]) * wc[None, :, None]
  sy = size[0] / h
  sx = size[1] / w if per_axis_scale else sy
  return (out * np.array([sx, sy], np.float32)).astype(np.float32)


def _resize_rgb(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
  if img.shape[:2] == tuple(size):
    return img
  return np.asarray(Image.fromarray(img).resize((size[1], size[0]),
                                                Image.BICUBIC))


def _resize_ids(lab: np.ndarray, size: Sequence[int]) -> np.ndarray:
  if lab.shape == tuple(size):
    return lab
  return np.asarray(Image.fromarray(lab).resize((size[1], size[0]),
                                                Image.NEAREST))


@dataclasses.dataclass
class Resize(grain.transforms.Map):
  """Resizes frames (bicubic), labels (nearest) and flows (with scaling).

  Attributes:
    image_size: ``(H, W)`` of frames and flows; None keeps the native size.
    label_size: ``(H, W)`` of labels; None keeps the native size, 'image'
      follows ``image_size``.
    per_axis_flow_scale: see ``resize_flow_np``.
  """
  image_size: tuple[int, int] | None = None
  label_size: Any = 'image'
  per_axis_flow_scale: bool = False

  def map(self, ex: dict[str, Any]) -> dict[str, Any]:
    ex = dict(ex)
    size = tuple(self.image_size or ex['frames'].shape[1:3])
    ex['frames'] = np.stack([_resize_rgb(f, size) for f in ex['frames']])
    for key in FLOW_KEYS:
      if key in ex:
        ex[key] = resize_flow_np(ex[key], size, self.per_axis_flow_scale)
    lsize = size if self.label_size == 'image' else self.label_size
    if lsize is not None:
      if 'labels' in ex:
        ex['labels'] = np.stack([_resize_ids(l, lsize) for l in ex['labels']])
      if 'label' in ex:
        ex['label'] = _resize_ids(ex['label'], lsize)
    return ex


def hflip(ex: dict[str, Any]) -> dict[str, Any]:
  """Flips a clip horizontally: frames, labels and flows (dx negated)."""
  ex = dict(ex)
  ex['frames'] = np.ascontiguousarray(ex['frames'][:, :, ::-1])
  if 'labels' in ex:
    ex['labels'] = np.ascontiguousarray(ex['labels'][:, :, ::-1])
  if 'label' in ex:
    ex['label'] = np.ascontiguousarray(ex['label'][:, ::-1])
  for key in FLOW_KEYS:
    if key in ex:
      f = ex[key][:, ::-1].copy()
      f[..., 0] = -f[..., 0]
      ex[key] = f
  return ex


@dataclasses.dataclass
class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability ``p``, identical on the whole clip.

  ``negate_dx=False`` reproduces the reference bug (method.md §10.6).
  """
  p: float = 0.5
  negate_dx: bool = True

  def random_map(self, ex: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.p:
      return ex
    out = hflip(ex)
    if not self.negate_dx:
      for key in FLOW_KEYS:
        if key in out:
          out[key][..., 0] = -out[key][..., 0]
    return out


@dataclasses.dataclass
class DropKeys(grain.transforms.Map):
  """Removes keys that must not reach the device (e.g. string ids)."""
  keys: tuple[str, ...] = ('id',)

  def map(self, ex: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ex.items() if k not in self.keys}
