"""TFDS builders of the real datasets, written as ArrayRecord without TF.

Each builder reads one dataset from ``manual_dir`` in its original layout
(``layouts``), checks every file and yields one example per sample:

* frames as file paths or PNG bytes (``tfds.features.Image``; TFDS stores
  the encoded bytes, so no TensorFlow is needed);
* labels re-encoded as single-channel PNGs, already mapped to train ids for
  VIPER and SYNTHIA, raw ``labelIds`` for the Cityscapes-family sets (so one
  prepared copy serves every benchmark's label map);
* flows as the zlib-compressed ``int16(10 F)`` ``.npy`` bytes of the file.

Examples are written in index order (``disable_shuffling``), so record ``i``
of a split is sample ``i`` of the sorted list; grain shuffles at read time.
The expensive per-sample work (full decodes, label maps) is cached per
sample, so an interrupted preparation resumes where it stopped
(``prepare``).
"""

from __future__ import annotations

import dataclasses
import io as io_lib
import os
from typing import Any, Callable, Iterator
import zlib

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from etils import epath

from dastc_jax.data.datasets import layouts
from dastc_jax.data import io
from dastc_jax.data import labels

Example = dict[str, Any]

VIPER_VALID = np.zeros((256,), bool)
VIPER_VALID[:32] = True  # VIPER raw ids 0..31.
CITYSCAPES_VALID = np.zeros((256,), bool)
CITYSCAPES_VALID[:34] = True  # Cityscapes labelIds 0..33.
SYNTHIA_VALID = np.zeros((65536,), bool)
SYNTHIA_VALID[:23] = True  # SYNTHIA raw ids 0..22.

# Frames are resized to SYNTHIA_SIZE, then the bottom 120 rows are cut
# (docs/reference_code.md, "Layouts and preprocessing").
SYNTHIA_SIZE = (760, 1280)
SYNTHIA_CROP_ROWS = 640


# ------------------------------------------------------------ encoding
def encode_flow(
    path: str,
    frame_hw: tuple[int, int],
    crop_rows: int | None = None,
    out_size: tuple[int, int] | None = None,
) -> bytes:
  """Checks a flow file and returns its zlib-compressed ``.npy`` bytes.

  Args:
    path: an ``int16(10 F)`` ``[H, W, 2]`` ``.npy`` file.
    frame_hw: ``(H, W)`` of the frame it belongs to (after any crop); the
      flow must be on that grid or a rescaled copy of it.
    crop_rows: SYNTHIA: the frame's rows kept out of ``SYNTHIA_SIZE[0]``; a
      flow on the uncropped grid is cropped alike.
    out_size: store it resized to this grid (magnitudes scaled), as the
      pipeline would resize it when reading.
  """
  if not os.path.exists(path):
    raise io.DataError(f'Missing flow file: {path}. {io.FLOW_HELP}')
  arr = io.read_flow(path)  # checks shape and dtype
  if crop_rows is not None:
    full = SYNTHIA_SIZE[0] / SYNTHIA_SIZE[1]
    if abs(arr.shape[0] / arr.shape[1] - full) < 0.01 * full:
      arr = arr[: round(arr.shape[0] * crop_rows / SYNTHIA_SIZE[0])]
  io.check_flow_grid(arr, frame_hw, path)
  if out_size is not None:
    from dastc_jax.data import transforms  # pylint: disable=g-import-not-at-top  (imports this module)

    arr = transforms.resize_flow_np(arr, out_size)
  buf = io_lib.BytesIO()
  np.save(buf, np.round(arr * 10).astype(np.int16), allow_pickle=False)
  return zlib.compress(buf.getvalue(), 1)


def decode_flow(data: bytes) -> np.ndarray:
  """Inverse of ``encode_flow``: ``[H, W, 2]`` float32 pixels."""
  arr = np.load(io_lib.BytesIO(zlib.decompress(data)), allow_pickle=False)
  return arr.astype(np.float32) / 10.0


def _label_png(raw: np.ndarray, lut: np.ndarray | None) -> bytes:
  ids = raw if lut is None else lut[raw]
  return io.encode_png(ids.astype(np.uint8))


def _checked_label(
    path: str,
    frame_hw: tuple[int, int],
    valid: np.ndarray,
    read: Callable[[str], np.ndarray] = io.read_label,
) -> np.ndarray:
  raw = read(path)
  if raw.shape != tuple(frame_hw):
    raise io.DataError(
        f'Label {path} is {raw.shape[0]}x{raw.shape[1]}; '
        f'expected the size of its frame {frame_hw[0]}x'
        f'{frame_hw[1]}.'
    )
  io.check_ids(raw, valid, path)
  return raw


def _same_size(paths: list[str]) -> tuple[int, int]:
  sizes = [io.check_image(p) for p in paths]
  for p, s in zip(paths[1:], sizes[1:]):
    if s != sizes[0]:
      raise io.DataError(
          f'Frame {p} is {s[0]}x{s[1]} but {paths[0]} is '
          f'{sizes[0][0]}x{sizes[0][1]}; the frames of a clip '
          'must have one size.'
      )
  return sizes[0]


def _histogram(ids: np.ndarray) -> np.ndarray:
  return np.bincount(ids.ravel(), minlength=256)[:256].astype(np.int32)


# Each encoder returns (features, cached, histogram of frame t's label).
# ``cached`` holds the bytes computed from decoded files (kept per sample by
# ``prepare``); paths and flows are cheap and are redone on a resume.
def encode_viper(rec: dict[str, Any], remove_ego: bool = True):
  """VIPER: JPEG frames, class maps -> VIPER15 train ids, ego car removed."""
  hw = _same_size(rec['frames'])
  pngs, hist = [], None
  for path in rec['labels']:
    raw = _checked_label(path, hw, VIPER_VALID)
    if remove_ego:
      raw = io.remove_ego_vehicle(raw, labels.VIPER_CAR)
    ids = labels.VIPER_TO_TRAIN[raw]
    hist = _histogram(ids) if hist is None else hist
    pngs.append(io.encode_png(ids))
  return {'label_t': pngs[0], 'label_t1': pngs[1]}, hist


def _synthia_frame(path: str) -> np.ndarray:
  img = io.read_rgb(path)
  if img.shape[:2] != SYNTHIA_SIZE:
    img = np.asarray(
        Image.fromarray(img).resize(SYNTHIA_SIZE[::-1], Image.BICUBIC)
    )
  return img[:SYNTHIA_CROP_ROWS]


def encode_synthia_seq(rec: dict[str, Any]):
  """SYNTHIA-Seq: 1280x760 frames cut to 640x1280, 16-bit labels (channel
  0) -> SYNTHIA12 train ids."""
  hw0 = _same_size(rec['frames'])
  frames = [_synthia_frame(p) for p in rec['frames']]
  out, hist = {}, None
  for key, img in zip(('frame_t', 'frame_t1'), frames):
    out[key] = io.encode_png(img)
  for key, path in zip(('label_t', 'label_t1'), rec['labels']):
    raw = _checked_label(path, hw0, SYNTHIA_VALID, io.read_label16_channel0)
    if raw.shape != SYNTHIA_SIZE:
      raw = np.asarray(
          Image.fromarray(raw.astype(np.uint8)).resize(
              SYNTHIA_SIZE[::-1], Image.NEAREST
          )
      )
    ids = labels.SYNTHIA_TO_TRAIN[raw[:SYNTHIA_CROP_ROWS]]
    hist = _histogram(ids) if hist is None else hist
    out[key] = io.encode_png(ids)
  return out, hist


def encode_cityscapes_label(path: str, hw: tuple[int, int]):
  raw = _checked_label(path, hw, CITYSCAPES_VALID)
  return io.encode_png(raw), _histogram(raw)


def encode_gta5(rec: dict[str, Any]):
  """GTA5: PNG frames with Cityscapes labelIds (kept raw)."""
  hw = _same_size(rec['frames'])
  png, hist = encode_cityscapes_label(rec['labels'][0], hw)
  return {'label_t': png}, hist


def encode_synthia_rand(rec: dict[str, Any]):
  """SYNTHIA-RAND-CITYSCAPES: 16-bit labels -> SYNTHIA16 train ids."""
  hw = _same_size(rec['frames'])
  raw = _checked_label(
      rec['labels'][0], hw, SYNTHIA_VALID, io.read_label16_channel0
  )
  ids = labels.SYNTHIA_RAND_TO_TRAIN[raw]
  return {'label_t': io.encode_png(ids)}, _histogram(ids)


def encode_cityscapes(rec: dict[str, Any]):
  """Cityscapes / Cityscapes-Seq: frames, raw gtFine labelIds."""
  hw = _same_size(rec['frames'])
  png, hist = encode_cityscapes_label(rec['label'], hw)
  return {'label': png}, hist


# --------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True)
class Spec:
  """One preparable dataset.

  Attributes:
    name: the ``--dataset`` name.
    tfds_name: the registered TFDS builder name (prefixed so it never
      collides with TFDS's own catalogue, which has a ``cityscapes``).
    splits: the splits it can prepare.
    label_space: ``cityscapes_ids`` (raw labelIds, mapped per class set at
      read time) or the class set of the stored train ids.
    frames: the frame keys of an example (t first).
    flows: ``{key: (t, s)}`` flows of an example.
    source: a labelled source (``label_t`` ...) rather than a target
      (``label``).
    flow_dirs: default flow folder per split, relative to manual_dir's
      parent (the reference's ``data/`` tree).
    frame_format: ``jpeg`` or ``png``.
    manual_dir: where the reference ``data/`` tree keeps it (for messages).
  """

  name: str
  tfds_name: str
  splits: tuple[str, ...]
  label_space: str
  frames: tuple[str, ...]
  flows: dict[str, tuple[int, int]]
  source: bool
  flow_dirs: dict[str, str]
  frame_format: str = 'png'
  manual_dir: str = ''

  @property
  def clip_length(self) -> int:
    return len(self.frames)


SPECS = {
    s.name: s
    for s in (
        Spec(
            'viper',
            'dastc_viper',
            ('train', 'val'),
            'viper15',
            ('frame_t', 'frame_t1'),
            {'flow': (0, 1)},
            True,
            {
                'train': 'estimated_optical_flow_viper_train',
                'val': 'estimated_optical_flow_viper_val',
            },
            'jpeg',
            'data/Viper',
        ),
        Spec(
            'synthia_seq',
            'dastc_synthia_seq',
            ('train',),
            'synthia12',
            ('frame_t', 'frame_t1'),
            {'flow': (0, 1)},
            True,
            {'train': 'estimated_optical_flow_synthiaseq_train'},
            'png',
            'data/SynthiaSeq/SEQS-04-DAWN',
        ),
        Spec(
            'cityscapes_seq',
            'dastc_cityscapes_seq',
            ('train', 'val'),
            'cityscapes_ids',
            ('frame_t', 'frame_t1', 'frame_t2'),
            {'flow': (0, 1), 'flow_t_t2': (0, 2), 'flow_t1_t2': (1, 2)},
            False,
            {
                'train': 'estimated_optical_flow_cityscapes_seq_train',
                'val': 'estimated_optical_flow_cityscapes_seq_val',
            },
            'png',
            'data/Cityscapes',
        ),
        Spec(
            'gta5',
            'dastc_gta5',
            ('train',),
            'cityscapes_ids',
            ('frame_t',),
            {},
            True,
            {},
            'png',
            'data/GTA5',
        ),
        Spec(
            'synthia_rand',
            'dastc_synthia_rand',
            ('train',),
            'synthia16',
            ('frame_t',),
            {},
            True,
            {},
            'png',
            'data/RAND_CITYSCAPES',
        ),
        Spec(
            'cityscapes',
            'dastc_cityscapes',
            ('train', 'val'),
            'cityscapes_ids',
            ('frame_t',),
            {},
            False,
            {},
            'png',
            'data/Cityscapes',
        ),
    )
}

# Cityscapes-Seq val clips hold frames t, t-1 and the flow t->t-1 only.
CS_VAL_FRAMES = ('frame_t', 'frame_t1')
CS_VAL_FLOWS = {'flow': (0, 1)}


def split_keys(
    spec: Spec, split: str
) -> tuple[tuple[str, ...], dict[str, tuple[int, int]]]:
  """The frame and flow keys of ``spec``'s examples in ``split``."""
  if spec.name == 'cityscapes_seq' and split == 'val':
    return CS_VAL_FRAMES, CS_VAL_FLOWS
  return spec.frames, spec.flows


def tfds_name(spec: Spec, split: str) -> str:
  """``name[/config]`` for ``tfds.data_source``."""
  if spec.name == 'cityscapes_seq':
    return f'{spec.tfds_name}/{split}'
  return spec.tfds_name


def get_spec(name: str) -> Spec:
  if name not in SPECS:
    raise ValueError(
        f'Unknown dataset {name!r}; expected one of ' f'{sorted(SPECS)}.'
    )
  return SPECS[name]


def index(
    spec: Spec,
    root: str,
    split: str,
    flow_dir: str | None,
    require_flows: bool = True,
) -> list[dict[str, Any]]:
  """The sorted sample records of one split, derived from the layout."""
  if spec.name == 'viper':
    return layouts.viper_index(
        root, flow_dir, split, require_flows=require_flows
    )
  if spec.name == 'synthia_seq':
    return layouts.synthia_seq_index(root, flow_dir, require_flows)
  if spec.name == 'cityscapes_seq':
    return layouts.cityscapes_seq_index(
        root, flow_dir, split, split, require_flows
    )
  if spec.name == 'gta5':
    return layouts.gta5_index(root)
  if spec.name == 'synthia_rand':
    return layouts.synthia_rand_index(root)
  return layouts.cityscapes_index(root, split)


def encode(spec: Spec, rec: dict[str, Any]) -> tuple[Example, np.ndarray]:
  """The decoded-and-checked part of an example and its label histogram."""
  fn = {
      'viper': encode_viper,
      'synthia_seq': encode_synthia_seq,
      'cityscapes_seq': encode_cityscapes,
      'gta5': encode_gta5,
      'synthia_rand': encode_synthia_rand,
      'cityscapes': encode_cityscapes,
  }[spec.name]
  return fn(rec)


def check_stored_size(
    spec: Spec, rec: dict[str, Any], size: tuple[int, int]
) -> None:
  """Raises unless ``size`` keeps the aspect ratio of ``rec``'s frames (so
  one magnitude scale serves both flow axes, as at read time); datasets
  without flows may be stored at any size."""
  if not spec.flows:
    return
  h, w = (
      (SYNTHIA_CROP_ROWS, SYNTHIA_SIZE[1])
      if spec.name == 'synthia_seq'
      else io.image_size(rec['frames'][0])
  )
  if abs(size[0] / size[1] - h / w) > 0.01 * h / w:
    raise io.DataError(
        f'Cannot store {spec.name} frames of {h}x{w} (e.g. '
        f'{rec["frames"][0]}) at {size[0]}x{size[1]}: another aspect ratio. '
        'Pass the training size, a scaled copy of the frame size.'
    )


def resize_encoded(
    spec: Spec,
    split: str,
    rec: dict[str, Any],
    cached: Example,
    size: tuple[int, int],
) -> Example:
  """``cached`` with every frame and label stored at ``size``: frames
  bicubic and labels nearest, exactly as the pipeline's ``Resize`` would
  resize them when reading; frames become lossless PNGs."""
  from dastc_jax.data import transforms  # pylint: disable=g-import-not-at-top  (imports this module)

  out = dict(cached)
  frame_keys, _ = split_keys(spec, split)
  for key, path in zip(frame_keys, rec['frames']):
    img = io.decode_rgb(cached[key]) if key in cached else io.read_rgb(path)
    out[key] = io.encode_png(transforms.resize_rgb(img, size))
  for key in ('label_t', 'label_t1', 'label'):
    if key in cached:
      ids = io.decode_ids(cached[key])
      out[key] = io.encode_png(transforms.resize_ids(ids, size))
  return out


def cheap_features(
    spec: Spec,
    split: str,
    rec: dict[str, Any],
    cached: Example,
    size: tuple[int, int] | None = None,
) -> Example:
  """Frames (paths unless re-encoded) and flows; checked against frame t."""
  frame_keys, flow_keys = split_keys(spec, split)
  out = {'id': rec['id']}
  for key, path in zip(frame_keys, rec['frames']):
    out[key] = cached.get(key, path)
  if flow_keys:
    if spec.name == 'synthia_seq':
      hw, crop = (SYNTHIA_CROP_ROWS, SYNTHIA_SIZE[1]), SYNTHIA_CROP_ROWS
    else:
      hw, crop = io.image_size(rec['frames'][0]), None
    flow_paths = {'flow': rec['flow']} if 'flow' in rec else rec['flows']
    for key in flow_keys:
      out[key] = encode_flow(flow_paths[key], hw, crop, size)
  return out


# ------------------------------------------------------------ builders
class _Builder(tfds.core.GeneratorBasedBuilder):
  """Shared builder: the spec says what to read; ``prepare`` drives it."""

  SPEC: Spec
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Pass --manual_dir=<the dataset folder in its original layout>; see '
      'the README, section "Datasets".'
  )

  def __init__(
      self,
      *,
      flow_dirs: dict[str, str] | None = None,
      example_fn: Callable[[str, dict[str, Any]], Example] | None = None,
      records: dict[str, list[Any]] | None = None,
      **kwargs,
  ):
    self._flow_dirs = flow_dirs or {}
    self._example_fn = example_fn
    self._records = records
    super().__init__(**kwargs)

  def _splits(self) -> tuple[str, ...]:
    if self.builder_config is not None:
      return (self.builder_config.name,)
    return tuple(self._records) if self._records else self.SPEC.splits

  def _info(self) -> tfds.core.DatasetInfo:
    split = self.builder_config.name if self.builder_config else 'train'
    frame_keys, flow_keys = split_keys(self.SPEC, split)
    feats = {'id': tfds.features.Text()}
    for key in frame_keys:
      feats[key] = tfds.features.Image(
          shape=(None, None, 3), encoding_format=self.SPEC.frame_format
      )
    label_keys = (
        ('label_t', 'label_t1')[: len(frame_keys)]
        if self.SPEC.source
        else ('label',)
    )
    for key in label_keys:
      feats[key] = tfds.features.Image(
          shape=(None, None, 1), encoding_format='png'
      )
    for key in flow_keys:
      feats[key] = tfds.features.Tensor(shape=(), dtype=np.object_)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(feats),
        disable_shuffling=True,
        description=f'{self.SPEC.name} prepared by dastc_jax '
        f'(label space: {self.SPEC.label_space}).',
    )

  def _split_generators(self, dl_manager):
    if self._records is None or self._example_fn is None:
      raise RuntimeError(
          'Prepare this dataset with python -m '
          'dastc_jax.prepare (it supplies the records).'
      )
    return {split: self._generate_examples(split) for split in self._splits()}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, Example]]:
    for rec in self._records[split]:
      yield rec['id'], self._example_fn(split, rec)


class DastcViper(_Builder):
  SPEC = SPECS['viper']


class DastcSynthiaSeq(_Builder):
  SPEC = SPECS['synthia_seq']


class DastcCityscapesSeq(_Builder):
  SPEC = SPECS['cityscapes_seq']
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name='train',
          description='t, t-1, t-2 clips '
          'with flows t->t-1, t->t-2, t-1->t-2',
      ),
      tfds.core.BuilderConfig(
          name='val',
          description='t, t-1 clips with '
          'the flow t->t-1 and gtFine labelIds',
      ),
  ]


class DastcGta5(_Builder):
  SPEC = SPECS['gta5']


class DastcSynthiaRand(_Builder):
  SPEC = SPECS['synthia_rand']


class DastcCityscapes(_Builder):
  SPEC = SPECS['cityscapes']


BUILDERS = {
    cls.SPEC.name: cls
    for cls in (
        DastcViper,
        DastcSynthiaSeq,
        DastcCityscapesSeq,
        DastcGta5,
        DastcSynthiaRand,
        DastcCityscapes,
    )
}


def stats_path(data_dir: str, spec: Spec, split: str) -> str:
  """Where ``prepare`` writes a split's per-sample label histograms."""
  return os.path.join(
      data_dir, spec.tfds_name, 'stats', f'{split}_label_histogram.npz'
  )


def load_stats(
    data_dir: str, spec: Spec, split: str
) -> tuple[list[str], np.ndarray]:
  """``(ids, [N, 256] pixel counts of frame t's stored label ids)``."""
  path = epath.Path(stats_path(data_dir, spec, split))
  if not path.exists():
    raise io.DataError(
        f'Missing {path} (label statistics written by the preparation). '
        f'Rerun: python -m dastc_jax.prepare --dataset={spec.name} '
        f'--manual_dir={spec.manual_dir} --data_dir={data_dir}'
    )
  with path.open('rb') as f, np.load(f, allow_pickle=False) as z:
    return [str(i) for i in z['ids']], z['histogram']
