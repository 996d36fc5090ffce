"""grain transforms: prepared records -> examples, resize, crop, flip.

Examples (numpy; native resolution before ``Resize``) have these keys:

* source (VIPER, SYNTHIA-Seq; GTA5 and SYNTHIA-RAND with T = 1):
  ``frames`` ``[T, H, W, 3]`` uint8 (t, t-1), ``labels`` ``[T, H, W]``
  uint8 train ids, ``flow`` ``[Hf, Wf, 2]`` float32 (t->t-1; video only);
* target train (Cityscapes-Seq): ``frames`` ``[3, H, W, 3]`` (t, t-1, t-2),
  ``flow`` (t->t-1), ``flow_t_t2`` (t->t-2), ``flow_t1_t2`` (t-1->t-2),
  ``label`` ``[H, W]`` (annotated frame t; the oracle and monitoring);
* target val: ``frames`` ``[2, H, W, 3]``, ``flow``, ``label``; Cityscapes
  images: ``frames`` ``[1, H, W, 3]``, ``label``.

Every geometric transform acts identically on all frames, labels and flows
of a clip: a flip negates the flows' dx, a resize scales their magnitudes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from dastc_jax.data.datasets import builders
from dastc_jax.data import labels

FLOW_KEYS = ('flow', 'flow_t_t2', 'flow_t1_t2')


@dataclasses.dataclass
class FromPrepared(grain.transforms.Map):
  """Turns a prepared TFDS record into an example (see the module doc).

  Attributes:
    frame_keys: the record's frame keys, t first.
    flow_keys: the record's flow keys.
    source: source records carry ``label_t`` (``label_t1``); targets
      ``label``.
    class_set: the benchmark's class set.
    raw_label_ids: labels are Cityscapes labelIds, mapped with
      ``class_set``'s table; otherwise they are train ids already.
    with_label: decode a target's label.
  """

  frame_keys: tuple[str, ...] = ('frame_t',)
  flow_keys: tuple[str, ...] = ()
  source: bool = True
  class_set: str = 'viper15'
  raw_label_ids: bool = False
  with_label: bool = True

  def _ids(self, label: np.ndarray) -> np.ndarray:
    label = label[..., 0]
    if self.raw_label_ids:
      return labels.CITYSCAPES_MAPS[self.class_set][label]
    return label

  def first_frame(self, rec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Frame t and its train-id label of a source record."""
    return rec['frame_t'], self._ids(rec['label_t'])

  def map(self, rec: dict[str, Any]) -> dict[str, Any]:
    rid = rec['id']
    out = {
        'id': rid.decode() if isinstance(rid, bytes) else str(rid),
        'frames': np.stack([rec[k] for k in self.frame_keys]),
    }
    for key in self.flow_keys:
      out[key] = builders.decode_flow(rec[key])
    if self.source:
      out['labels'] = np.stack(
          [
              self._ids(rec[k])
              for k in ('label_t', 'label_t1')[: len(self.frame_keys)]
          ]
      )
    elif self.with_label:
      out['label'] = self._ids(rec['label'])
    if 'bad_records' in rec:  # config.data.on_error='skip'
      out['bad_records'] = np.int32(rec['bad_records'])
    return out


def resize_flow_np(
    flow: np.ndarray, size: Sequence[int], per_axis_scale: bool = False
) -> np.ndarray:
  """Host twin of ``ops.warp.resize_flow`` (align-corners bilinear + scale)."""
  h, w = flow.shape[:2]
  if (h, w) == tuple(size):
    return flow

  def taps(n_in, n_out):
    src = (
        np.arange(n_out) * (n_in - 1) / (n_out - 1)
        if n_out > 1 and n_in > 1
        else np.zeros((n_out,))
    )
    i0 = np.clip(np.floor(src).astype(np.int64), 0, max(n_in - 2, 0))
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

  r0, r1, wr = taps(h, size[0])
  c0, c1, wc = taps(w, size[1])
  rows = flow[r0] + (flow[r1] - flow[r0]) * wr[:, None, None]
  out = rows[:, c0] + (rows[:, c1] - rows[:, c0]) * wc[None, :, None]
  sy = size[0] / h
  sx = size[1] / w if per_axis_scale else sy
  return (out * np.array([sx, sy], np.float32)).astype(np.float32)


def resize_rgb(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bicubic resize of a uint8 RGB image to ``size`` (H, W)."""
  if img.shape[:2] == tuple(size):
    return img
  return np.asarray(
      Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC)
  )


def resize_ids(lab: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Nearest-neighbour resize of a uint8 id map to ``size`` (H, W)."""
  if lab.shape == tuple(size):
    return lab
  return np.asarray(
      Image.fromarray(lab).resize((size[1], size[0]), Image.NEAREST)
  )


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
    ex['frames'] = np.stack([resize_rgb(f, size) for f in ex['frames']])
    for key in FLOW_KEYS:
      if key in ex:
        ex[key] = resize_flow_np(ex[key], size, self.per_axis_flow_scale)
    lsize = size if self.label_size == 'image' else self.label_size
    if lsize is not None:
      if 'labels' in ex:
        ex['labels'] = np.stack(
            [resize_ids(lab, lsize) for lab in ex['labels']]
        )
      if 'label' in ex:
        ex['label'] = resize_ids(ex['label'], lsize)
    return ex


def hflip(ex: dict[str, Any]) -> dict[str, Any]:
  """Flips a clip horizontally: frames, labels and flows (dx negated)."""
  ex = dict(ex)
  ex['frames'] = np.ascontiguousarray(ex['frames'][:, :, ::-1])
  if 'labels' in ex:
    ex['labels'] = np.ascontiguousarray(ex['labels'][:, :, ::-1])
  if 'label' in ex:
    ex['label'] = np.ascontiguousarray(ex['label'][:, ::-1])
  if 'pl_valid' in ex:
    ex['pl_valid'] = np.ascontiguousarray(ex['pl_valid'][:, ::-1])
  for key in FLOW_KEYS:
    if key in ex:
      f = ex[key][:, ::-1].copy()
      f[..., 0] = -f[..., 0]
      ex[key] = f
  return ex


@dataclasses.dataclass
class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability ``p``, identical on the whole clip.

  ``negate_dx=False`` reproduces the reference bug (docs/reference_code.md,
  "Known defects").
  """

  p: float = 0.5
  negate_dx: bool = True

  def random_map(
      self, ex: dict[str, Any], rng: np.random.Generator
  ) -> dict[str, Any]:
    if rng.random() >= self.p:
      return ex
    out = hflip(ex)
    if not self.negate_dx:
      for key in FLOW_KEYS:
        if key in out:
          out[key][..., 0] = -out[key][..., 0]
    return out


@dataclasses.dataclass
class RandomScaleCrop(grain.transforms.RandomMap):
  """Random rescale then random crop, identical on the whole clip.

  Frames are resized bicubic, labels nearest and flows with their
  magnitudes scaled; the crop window is the same for every frame, label and
  flow (flows are on the frame grid after ``Resize``).

  Attributes:
    scale: ``(low, high)`` of the uniform scale factor.
    crop_size: ``(H, W)`` window; None keeps the whole (scaled) image.
    per_axis_flow_scale: see ``resize_flow_np``.
    pseudo_margins: ``(top, bottom, left, right)`` borders of the scaled
      image whose pseudo-labels are not trusted; when any is positive the
      example gets ``pl_valid`` ``[H, W]`` uint8 (0 inside a margin) of the
      crop window.
    cat_max_ratio: below 1, a crop window in which one class covers this
      share or more of frame t's labelled pixels (or which has a single
      class) is redrawn, up to ``tries`` times (mmseg's ``RandomCrop``).
    rcs_min_pixels: with an ``rcs_class`` in the example (rare-class
      sampling) and this >= 0, the whole draw (scale and crop) is repeated,
      up to ``tries`` times, until frame t's crop has more than this many
      pixels of that class; the last draw is kept either way.
    tries: redraws of the two rules above.
  """

  scale: tuple[float, float] = (1.0, 1.0)
  crop_size: tuple[int, int] | None = None
  per_axis_flow_scale: bool = False
  pseudo_margins: tuple[int, int, int, int] = (0, 0, 0, 0)
  cat_max_ratio: float = 1.0
  rcs_min_pixels: float = -1.0
  tries: int = 10

  def random_map(
      self, ex: dict[str, Any], rng: np.random.Generator
  ) -> dict[str, Any]:
    ex = dict(ex)
    rcs_class = ex.pop('rcs_class', None)
    out = self._draw(ex, rng)
    if rcs_class is not None and self.rcs_min_pixels >= 0:
      for _ in range(self.tries):
        if np.count_nonzero(out['labels'][0] == rcs_class) > (
            self.rcs_min_pixels
        ):
          break
        out = self._draw(ex, rng)
    return out

  def _window(
      self, h: int, w: int, rng: np.random.Generator
  ) -> tuple[int, int]:
    ch, cw = self.crop_size
    return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))

  def _draw(
      self, ex: dict[str, Any], rng: np.random.Generator
  ) -> dict[str, Any]:
    """One scale and crop of ``ex``."""
    h, w = ex['frames'].shape[1:3]
    s = float(rng.uniform(*self.scale))
    if s != 1.0:
      ex = Resize(
          image_size=(round(h * s), round(w * s)),
          per_axis_flow_scale=self.per_axis_flow_scale,
      ).map(ex)
    h, w = ex['frames'].shape[1:3]
    if any(self.pseudo_margins):
      top, bottom, left, right = self.pseudo_margins
      valid = np.zeros((h, w), np.uint8)
      valid[top : max(h - bottom, top), left : max(w - right, left)] = 1
      ex = {**ex, 'pl_valid': valid}
    if self.crop_size is None:
      return ex
    ch, cw = self.crop_size
    if ch > h or cw > w:
      raise ValueError(
          f'Crop {ch}x{cw} is larger than the (scaled) image '
          f'{h}x{w}; lower crop_size or raise the minimum '
          'scale.'
      )
    r0, c0 = self._window(h, w, rng)
    if self.cat_max_ratio < 1.0 and 'labels' in ex:
      for _ in range(self.tries):
        if _no_dominant_class(
            ex['labels'][0, r0 : r0 + ch, c0 : c0 + cw], self.cat_max_ratio
        ):
          break
        r0, c0 = self._window(h, w, rng)
    ex = dict(ex)
    ex['frames'] = np.ascontiguousarray(
        ex['frames'][:, r0 : r0 + ch, c0 : c0 + cw]
    )
    for key in FLOW_KEYS:
      if key in ex:
        ex[key] = np.ascontiguousarray(ex[key][r0 : r0 + ch, c0 : c0 + cw])
    if 'labels' in ex:
      ex['labels'] = np.ascontiguousarray(
          ex['labels'][:, r0 : r0 + ch, c0 : c0 + cw]
      )
    if 'label' in ex:
      ex['label'] = np.ascontiguousarray(
          ex['label'][r0 : r0 + ch, c0 : c0 + cw]
      )
    if 'pl_valid' in ex:
      ex['pl_valid'] = np.ascontiguousarray(
          ex['pl_valid'][r0 : r0 + ch, c0 : c0 + cw]
      )
    return ex


def _no_dominant_class(label: np.ndarray, max_ratio: float) -> bool:
  """More than one labelled class, none with ``max_ratio`` of the labelled
  pixels or more (255 does not count)."""
  counts = np.bincount(label.ravel(), minlength=256)[:255]
  counts = counts[counts > 0]
  return counts.size > 1 and counts.max() / counts.sum() < max_ratio


@dataclasses.dataclass
class DropKeys(grain.transforms.Map):
  """Removes keys that must not reach the device (e.g. string ids)."""

  keys: tuple[str, ...] = ('id',)

  def map(self, ex: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ex.items() if k not in self.keys}


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Per-channel CDF matching of ``image`` to ``reference`` (uint8 RGB).

  The same mapping as ``skimage.exposure.match_histograms(channel_axis=-1)``:
  each value goes to the reference value at the same quantile. Computed on
  256-bin histograms and applied as a lookup table (uint8 input).
  """
  out = np.empty(image.shape, np.uint8)
  for c in range(image.shape[-1]):
    counts = np.bincount(image[..., c].ravel(), minlength=256)
    ref_counts = np.bincount(reference[..., c].ravel(), minlength=256)
    values = np.flatnonzero(counts)
    ref_values = np.flatnonzero(ref_counts)
    q = np.cumsum(counts[values]) / image[..., c].size
    ref_q = np.cumsum(ref_counts[ref_values]) / reference[..., c].size
    lut = np.zeros((256,), np.uint8)
    lut[values] = np.clip(np.round(np.interp(q, ref_q, ref_values)), 0, 255)
    out[..., c] = lut[image[..., c]]
  return out


@dataclasses.dataclass
class HistogramMatch(grain.transforms.Map):
  """Matches the source clip's frames to the target frame t (method §4.1)."""

  def map(self, pair: dict[str, Any]) -> dict[str, Any]:
    src = dict(pair['source'])
    ref = pair['target']['frames'][0]
    src['frames'] = np.stack([match_histograms(f, ref) for f in src['frames']])
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

  source: Any = None
  rare_index: Any = None
  decode: Any = None
  num_classes_per_clip: int = 3
  crop_size: tuple[int, int] = (0, 0)
  image_size: Any = None
  min_pixels: int = 5
  tries: int = 10

  def random_map(
      self, ex: dict[str, Any], rng: np.random.Generator
  ) -> dict[str, Any]:
    ex = dict(ex)
    h, w = self.crop_size
    sh, sw = ex['frames'].shape[1:3]
    if sh < h or sw < w:
      raise ValueError(
          f'Source frames {sh}x{sw} are smaller than the fusion '
          f'crop {h}x{w} (the target image size).'
      )
    r0, c0 = int(rng.integers(0, sh - h + 1)), int(rng.integers(0, sw - w + 1))
    ex['crop'] = np.array([r0, c0], np.int32)
    available = [k for k, v in sorted(self.rare_index.items()) if v]
    k_n = self.num_classes_per_clip
    chosen = (
        sorted(
            rng.choice(
                available, size=min(k_n, len(available)), replace=False
            ).tolist()
        )
        if available
        else []
    )
    frames = np.zeros((k_n, h, w, 3), np.uint8)
    labs = np.full((k_n, h, w), labels.IGNORE, np.uint8)
    classes = np.full((k_n,), -1, np.int32)
    for slot, k in enumerate(chosen):
      for _ in range(self.tries):
        frame, lab = self.decode.first_frame(
            self.source[int(rng.choice(self.rare_index[k]))]
        )
        if self.image_size:
          frame = resize_rgb(frame, self.image_size)
          lab = resize_ids(lab, self.image_size)
        frame, lab = (
            frame[r0 : r0 + h, c0 : c0 + w],
            lab[r0 : r0 + h, c0 : c0 + w],
        )
        if np.count_nonzero(lab == k) > self.min_pixels:
          frames[slot], labs[slot], classes[slot] = frame, lab, k
          break
    ex['rare_frames'], ex['rare_labels'] = frames, labs
    ex['rare_classes'] = classes
    return ex
