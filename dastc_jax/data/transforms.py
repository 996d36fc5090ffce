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

  def label(self, path: str, frame_hw: tuple[int, int]) -> np.ndarray:
    """One VIPER class map as train ids (checked, ego vehicle removed)."""
    raw = io.read_label(path)
    if raw.shape != tuple(frame_hw):
      raise io.DataError(f'Label {path} is {raw.shape}; expected the size of '
                         f'its frame {tuple(frame_hw)}.')
    io.check_ids(raw, VIPER_VALID, path)
    if self.remove_ego:
      raw = io.remove_ego_vehicle(raw, labels.VIPER_CAR)
    return labels.VIPER_TO_TRAIN[raw]

  def map(self, rec: dict[str, Any]) -> dict[str, Any]:
    frames = io.stack_frames(rec['frames'])
    labs = [self.label(p, f.shape[:2]) for p, f in zip(rec['labels'],
                                                        frames)]
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


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Per-channel CDF matching of ``image`` to ``reference`` (uint8 RGB).

  The same mapping as ``skimage.exposure.match_histograms(channel_axis=-1)``:
  each value goes to the reference value at the same quantile.
  """
  out = np.empty(image.shape, np.float64)
  for c in range(image.shape[-1]):
    src = image[..., c].ravel()
    values, inverse, counts = np.unique(src, return_inverse=True,
                                        return_counts=True)
    ref_values, ref_counts = np.unique(reference[..., c].ravel(),
                                       return_counts=True)
    q = np.cumsum(counts) / src.size
    ref_q = np.cumsum(ref_counts) / reference[..., c].size
    out[..., c] = np.interp(q, ref_q, ref_values)[inverse].reshape(
        image.shape[:-1])
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class HistogramMatch(grain.transforms.Map):
  """Matches the source clip's frames to the target frame t (method §4.1)."""

  def map(self, pair: dict[str, Any]) -> dict[str, Any]:
    src = dict(pair['source'])
    ref = pair['target']['frames'][0]
    src['frames'] = np.stack([match_histograms(f, ref)
                              for f in src['frames']])
    return {**pair, 'source': src}


@dataclasses.dataclass
class SampleFusionPatches(grain.transforms.RandomMap):
  """Crop window W and long-tail source patches for the fusion (§4.4).

  Adds to a source example: ``crop`` ``[2]`` int32 (top, left) of the
  target-size window W in the source frame, ``rare_frames``
  ``[K, h, w, 3]`` uint8 and ``rare_labels`` ``[K, h, w]`` (frames of other
  source samples containing class ``rare_classes[k]``, cropped to W) and
  ``rare_classes`` ``[K]`` int32. A patch is redrawn (up to ``tries`` times)
  until its class has more than ``min_pixels`` pixels inside W.
  """
  records: Any = None
  rare_index: Any = None
  decode: Any = None
  num_classes_per_clip: int = 3
  crop_size: tuple[int, int] = (0, 0)
  image_size: Any = None
  min_pixels: int = 5
  tries: int = 10

  def random_map(self, ex: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    ex = dict(ex)
    h, w = self.crop_size
    sh, sw = ex['frames'].shape[1:3]
    if sh < h or sw < w:
      raise ValueError(f'Source frames {sh}x{sw} are smaller than the fusion '
                       f'crop {h}x{w} (the target image size).')
    r0, c0 = int(rng.integers(0, sh - h + 1)), int(rng.integers(0,
                                                                sw - w + 1))
    ex['crop'] = np.array([r0, c0], np.int32)
    available = [k for k, v in sorted(self.rare_index.items()) if v]
    k_n = self.num_classes_per_clip
    chosen = sorted(rng.choice(available, size=min(k_n, len(available)),
                               replace=False).tolist()) if available else []
    frames = np.zeros((k_n, h, w, 3), np.uint8)
    labs = np.full((k_n, h, w), labels.IGNORE, np.uint8)
    classes = np.full((k_n,), -1, np.int32)
    for slot, k in enumerate(chosen):
      for _ in range(self.tries):
        rec = self.records[int(rng.choice(self.rare_index[k]))]
        frame = io.read_rgb(rec['frames'][0])
        lab = self.decode.label(rec['labels'][0], frame.shape[:2])
        if self.image_size:
          frame = _resize_rgb(frame, self.image_size)
          lab = _resize_ids(lab, self.image_size)
        frame, lab = frame[r0:r0 + h, c0:c0 + w], lab[r0:r0 + h, c0:c0 + w]
        if np.count_nonzero(lab == k) > self.min_pixels:
          frames[slot], labs[slot], classes[slot] = frame, lab, k
          break
    ex['rare_frames'], ex['rare_labels'] = frames, labs
    ex['rare_classes'] = classes
    return ex
