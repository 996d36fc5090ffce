"""File layouts of the real datasets and the rules that derive frame lists.

VIPER (method.md §2.1)::

  {root}/{split}/img/{seq:03d}/{seq:03d}_{frame:05d}.jpg
  {root}/{split}/cls/{seq:03d}/{seq:03d}_{frame:05d}.png
  {flow_dir}/{seq:03d}_{t:05d}{t-1:05d}_int16_x10.npy          (flow t->t-1)

  Samples are every ``stride``-th frame (00010, 00020, ...) whose frame t-1
  is present, as in the official 13,367-frame list.

Cityscapes-Seq::

  {root}/leftImg8bit_sequence/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png
  {root}/gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png
  {flow_dir}/{city}_{seq:06d}_{t:06d}_{s:06d}_int16_x10.npy     (flow t->s)

  Samples are the annotated frames t (those with a gtFine labelIds file).
  Training clips use t, t-1, t-2 and the flows t->t-1, t->t-2, t-1->t-2;
  validation clips use t, t-1 and the flow t->t-1.

Index records hold file paths only; decoding happens in ``transforms``.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from dastc_jax.data import io

Record = dict[str, Any]


# ---------------------------------------------------------------- VIPER
def viper_image(root: str, split: str, seq: int, frame: int) -> str:
  return os.path.join(root, split, 'img', f'{seq:03d}',
                      f'{seq:03d}_{frame:05d}.jpg')


def viper_label(root: str, split: str, seq: int, frame: int) -> str:
  return os.path.join(root, split, 'cls', f'{seq:03d}',
                      f'{seq:03d}_{frame:05d}.png')


def viper_flow(flow_dir: str, seq: int, t: int) -> str:
  return os.path.join(flow_dir, f'{seq:03d}_{t:05d}{t - 1:05d}_int16_x10.npy')


_VIPER_RE = re.compile(r'^(\d{3})_(\d{5})\.jpg$')


def viper_index(root: str, flow_dir: str, split: str,
                stride: int = 10) -> list[Record]:
  """Lists VIPER samples: every ``stride``-th frame with its frame t-1.

  Args:
    root: the VIPER folder (holding ``train/``, ``val/``).
    flow_dir: folder of ``int16_x10`` flows for this split.
    split: ``train`` or ``val``.
    stride: sample every stride-th frame.

  Returns:
    Records ``{'id', 'frames': [t, t-1], 'labels': [t, t-1], 'flow'}``.

  Raises:
    io.DataError: if the layout is not VIPER's or a required file is missing.
  """
  img_dir = os.path.join(root, split, 'img')
  if not os.path.isdir(img_dir):
    raise io.DataError(
        f'{root!r} does not look like VIPER: expected the folder {img_dir} '
        'holding {seq:03d}/{seq:03d}_{frame:05d}.jpg frames.')
  present = set()
  for path in glob.glob(os.path.join(img_dir, '*', '*.jpg')):
    m = _VIPER_RE.match(os.path.basename(path))
    if m and os.path.basename(os.path.dirname(path)) == m.group(1):
      present.add((int(m.group(1)), int(m.group(2))))
  records = []
  for seq, frame in sorted(present):
    if frame % stride or (seq, frame - 1) not in present:
      continue
    rec = {
        'id': f'{seq:03d}_{frame:05d}',
        'frames': [viper_image(root, split, seq, frame),
                   viper_image(root, split, seq, frame - 1)],
        'labels': [viper_label(root, split, seq, frame),
                   viper_label(root, split, seq, frame - 1)],
        'flow': viper_flow(flow_dir, seq, frame),
    }
    _require(rec['labels'], 'label')
    _require([rec['flow']], 'flow file', io.FLOW_HELP)
    records.append(rec)
  if not records:
    raise io.DataError(f'No VIPER samples in {img_dir}: expected frames '
                       f'numbered by multiples of {stride} with frame t-1.')
  return records


# ------------------------------------------------------- Cityscapes-Seq
def cs_image(root: str, split: str, city: str, seq: int, frame: int) -> str:
  return os.path.join(root, 'leftImg8bit_sequence', split, city,
                      f'{city}_{seq:06d}_{frame:06d}_leftImg8bit.png')


def cs_label(root: str, split: str, city: str, seq: int, frame: int) -> str:
  return os.path.join(root, 'gtFine', split, city,
                      f'{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png')


def cs_flow(flow_dir: str, city: str, seq: int, t: int, s: int) -> str:
  return os.path.join(flow_dir,
                      f'{city}_{seq:06d}_{t:06d}_{s:06d}_int16_x10.npy')


_CS_RE = re.compile(r'^(.+)_(\d{6})_(\d{6})_gtFine_labelIds\.png$')


def cityscapes_seq_index(root: str, flow_dir: str, split: str,
                         clip: str) -> list[Record]:
  """Lists Cityscapes-Seq samples: the annotated frames of ``split``.

  Args:
    root: the Cityscapes folder (holding ``leftImg8bit_sequence/``,
      ``gtFine/``).
    flow_dir: folder of ``int16_x10`` flows for this split.
    split: ``train`` or ``val``.
    clip: ``train`` (t, t-1, t-2 and three flows) or ``val`` (t, t-1 and
      the flow t->t-1).

  Returns:
    Records ``{'id', 'frames', 'label', 'flows': {name: path}}``.

  Raises:
    io.DataError: if the layout is not Cityscapes-Seq's or a file is missing.
  """
  gt_dir = os.path.join(root, 'gtFine', split)
  seq_dir = os.path.join(root, 'leftImg8bit_sequence', split)
  for d in (gt_dir, seq_dir):
    if not os.path.isdir(d):
      raise io.DataError(
          f'{root!r} does not look like Cityscapes-Seq: expected the folder '
          f'{d} (leftImg8bit_sequence/ and gtFine/ per split).')
  if clip not in ('train', 'val'):
    raise ValueError(f'clip must be train or val, got {clip!r}')
  records = []
  for path in sorted(glob.glob(os.path.join(gt_dir, '*', '*_labelIds.png'))):
    m = _CS_RE.match(os.path.basename(path))
    if not m:
      continue
    city, seq, t = m.group(1), int(m.group(2)), int(m.group(3))
    frames = [cs_image(root, split, city, seq, t - k)
              for k in range(3 if clip == 'train' else 2)]
    flows = {'flow': cs_flow(flow_dir, city, seq, t, t - 1)}
    if clip == 'train':
      flows['flow_t_t2'] = cs_flow(flow_dir, city, seq, t, t - 2)
      flows['flow_t1_t2'] = cs_flow(flow_dir, city, seq, t - 1, t - 2)
    _require(frames, 'frame (leftImg8bit_sequence)')
    _require(list(flows.values()), 'flow file', io.FLOW_HELP)
    records.append({'id': f'{city}_{seq:06d}_{t:06d}', 'frames': frames,
                    'label': path, 'flows': flows})
  if not records:
    raise io.DataError(f'No annotated frames (*_gtFine_labelIds.png) under '
                       f'{gt_dir}.')
  return records


def _require(paths: list[str], what: str, hint: str = '') -> None:
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise io.DataError(f'Missing {what}: {missing[0]}'
                       + (f' (and {len(missing) - 1} more)'
                          if len(missing) > 1 else '')
                       + (f'. {hint}' if hint else ''))
