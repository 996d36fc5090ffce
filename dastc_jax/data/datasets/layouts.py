"""File layouts of the real datasets and the rules that derive frame lists.

VIPER (docs/reference_code.md, "Layouts and preprocessing")::

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

SYNTHIA-Seq (the reference's flattened copy, or the official tree)::

  {root}/rgb/{t:06d}.png            or {root}/RGB/Stereo_Left/Omni_F/{t:06d}.png
  {root}/label/{t:06d}.png          or {root}/GT/LABELS/Stereo_Left/Omni_F/...
  {flow_dir}/{t:06d}_int16_x10.npy                             (flow t->t-1)

  Samples are every frame t >= 1 with frame t-1 (000001..000849 for
  SEQS-04-DAWN).

Image domain (clip length 1)::

  GTA5:        {root}/images/{i:05d}.png, {root}/labels/{i:05d}.png
  SYNTHIA-RAND-CITYSCAPES: {root}/RGB/{i:07d}.png, {root}/GT/LABELS/{i:07d}.png
  Cityscapes:  {root}/leftImg8bit/{split}/{city}/
                 {city}_{seq:06d}_{frame:06d}_leftImg8bit.png
               + gtFine as above

Index records hold file paths only; the TFDS builders (``builders``) check
and encode them.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from absl import logging

from dastc_jax.data import io

Record = dict[str, Any]


# ---------------------------------------------------------------- VIPER
def viper_image(root: str, split: str, seq: int, frame: int) -> str:
  return os.path.join(
      root, split, 'img', f'{seq:03d}', f'{seq:03d}_{frame:05d}.jpg'
  )


def viper_label(root: str, split: str, seq: int, frame: int) -> str:
  return os.path.join(
      root, split, 'cls', f'{seq:03d}', f'{seq:03d}_{frame:05d}.png'
  )


def viper_flow(flow_dir: str, seq: int, t: int) -> str:
  return os.path.join(flow_dir, f'{seq:03d}_{t:05d}{t - 1:05d}_int16_x10.npy')


_VIPER_RE = re.compile(r'^(\d{3})_(\d{5})\.jpg$')


def viper_index(
    root: str,
    flow_dir: str,
    split: str,
    stride: int = 10,
    require_flows: bool = True,
) -> list[Record]:
  """Lists VIPER samples: every ``stride``-th frame with its frame t-1.

  Args:
    root: the VIPER folder (holding ``train/``, ``val/``).
    flow_dir: folder of ``int16_x10`` flows for this split.
    split: ``train`` or ``val``.
    stride: sample every stride-th frame.
    require_flows: raise if a flow file is missing (off when the flows are
      about to be computed).

  Returns:
    Records ``{'id', 'frames': [t, t-1], 'labels': [t, t-1], 'flow'}``.

  Raises:
    io.DataError: if the layout is not VIPER's or a required file is missing.
  """
  img_dir = os.path.join(root, split, 'img')
  if not os.path.isdir(img_dir):
    raise io.DataError(
        f'{root!r} does not look like VIPER: expected the folder {img_dir} '
        'holding {seq:03d}/{seq:03d}_{frame:05d}.jpg frames.'
    )
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
        'frames': [
            viper_image(root, split, seq, frame),
            viper_image(root, split, seq, frame - 1),
        ],
        'labels': [
            viper_label(root, split, seq, frame),
            viper_label(root, split, seq, frame - 1),
        ],
        'flow': viper_flow(flow_dir, seq, frame),
    }
    _require(rec['labels'], 'label')
    if require_flows:
      _require([rec['flow']], 'flow file', io.FLOW_HELP)
    records.append(rec)
  if not records:
    raise io.DataError(
        f'No VIPER samples in {img_dir}: expected frames '
        f'numbered by multiples of {stride} with frame t-1.'
    )
  return records


# ------------------------------------------------------- Cityscapes-Seq
def cs_image(root: str, split: str, city: str, seq: int, frame: int) -> str:
  return os.path.join(
      root,
      'leftImg8bit_sequence',
      split,
      city,
      f'{city}_{seq:06d}_{frame:06d}_leftImg8bit.png',
  )


def cs_label(root: str, split: str, city: str, seq: int, frame: int) -> str:
  return os.path.join(
      root,
      'gtFine',
      split,
      city,
      f'{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png',
  )


def cs_flow(flow_dir: str, city: str, seq: int, t: int, s: int) -> str:
  return os.path.join(
      flow_dir, f'{city}_{seq:06d}_{t:06d}_{s:06d}_int16_x10.npy'
  )


_CS_RE = re.compile(r'^(.+)_(\d{6})_(\d{6})_gtFine_labelIds\.png$')


def cityscapes_seq_index(
    root: str, flow_dir: str, split: str, clip: str, require_flows: bool = True
) -> list[Record]:
  """Lists Cityscapes-Seq samples: the annotated frames of ``split``.

  Args:
    root: the Cityscapes folder (holding ``leftImg8bit_sequence/``,
      ``gtFine/``).
    flow_dir: folder of ``int16_x10`` flows for this split.
    split: ``train`` or ``val``.
    clip: ``train`` (t, t-1, t-2 and three flows) or ``val`` (t, t-1 and
      the flow t->t-1).
    require_flows: raise if a flow file is missing.

  Returns:
    Records ``{'id', 'frames', 'label', 'flows': {name: path}}``.

  Raises:
    io.DataError: if the layout is not Cityscapes-Seq's or a file is missing.
  """
  if clip not in ('train', 'val'):
    raise ValueError(f'clip must be train or val, got {clip!r}')
  records = []
  for path, city, seq, t in _annotated(
      root, split, 'leftImg8bit_sequence', 'Cityscapes-Seq'
  ):
    frames = [
        cs_image(root, split, city, seq, t - k)
        for k in range(3 if clip == 'train' else 2)
    ]
    flows = {'flow': cs_flow(flow_dir, city, seq, t, t - 1)}
    if clip == 'train':
      flows['flow_t_t2'] = cs_flow(flow_dir, city, seq, t, t - 2)
      flows['flow_t1_t2'] = cs_flow(flow_dir, city, seq, t - 1, t - 2)
    _require(frames, 'frame (leftImg8bit_sequence)')
    if require_flows:
      _require(list(flows.values()), 'flow file', io.FLOW_HELP)
    records.append(
        {
            'id': f'{city}_{seq:06d}_{t:06d}',
            'frames': frames,
            'label': path,
            'flows': flows,
        }
    )
  if not records:
    raise io.DataError(
        f'No annotated frames (*_gtFine_labelIds.png) under '
        f'{os.path.join(root, "gtFine", split)}.'
    )
  return records


def _annotated(root: str, split: str, frames_sub: str, what: str):
  """Yields ``(label path, city, seq, t)`` of the gtFine labelIds files."""
  gt_dir = os.path.join(root, 'gtFine', split)
  for d in (gt_dir, os.path.join(root, frames_sub, split)):
    if not os.path.isdir(d):
      raise io.DataError(
          f'{root!r} does not look like {what}: expected the folder {d} '
          f'({frames_sub}/ and gtFine/ per split).'
      )
  for path in sorted(glob.glob(os.path.join(gt_dir, '*', '*_labelIds.png'))):
    m = _CS_RE.match(os.path.basename(path))
    if m:
      yield path, m.group(1), int(m.group(2)), int(m.group(3))


# ------------------------------------------------------------ SYNTHIA-Seq
def synthia_seq_dirs(root: str) -> tuple[str, str]:
  """``(rgb_dir, label_dir)``: the flattened or the official SYNTHIA tree."""
  for rgb, lab in (
      ('rgb', 'label'),
      (
          os.path.join('RGB', 'Stereo_Left', 'Omni_F'),
          os.path.join('GT', 'LABELS', 'Stereo_Left', 'Omni_F'),
      ),
  ):
    if os.path.isdir(os.path.join(root, rgb)):
      return os.path.join(root, rgb), os.path.join(root, lab)
  raise io.DataError(
      f'{root!r} does not look like SYNTHIA-Seq (e.g. SEQS-04-DAWN): '
      'expected rgb/{t:06d}.png and label/{t:06d}.png, or the official '
      'RGB/Stereo_Left/Omni_F/ and GT/LABELS/Stereo_Left/Omni_F/.'
  )


def synthia_seq_flow(flow_dir: str, t: int) -> str:
  return os.path.join(flow_dir, f'{t:06d}_int16_x10.npy')


_NUM_PNG = re.compile(r'^(\d+)\.png$')


def _numbered(folder: str, digits: int) -> set[int]:
  out = set()
  for path in glob.glob(os.path.join(folder, '*.png')):
    m = _NUM_PNG.match(os.path.basename(path))
    if m and len(m.group(1)) == digits:
      out.add(int(m.group(1)))
  return out


def synthia_seq_index(
    root: str, flow_dir: str, require_flows: bool = True
) -> list[Record]:
  """Lists SYNTHIA-Seq samples: every frame t >= 1 with its frame t-1.

  Returns:
    Records ``{'id', 'frames': [t, t-1], 'labels': [t, t-1], 'flow'}``.
  """
  rgb_dir, lab_dir = synthia_seq_dirs(root)
  present = _numbered(rgb_dir, 6)
  records = []
  for t in sorted(present):
    if t < 1 or t - 1 not in present:
      continue
    rec = {
        'id': f'{t:06d}',
        'frames': [
            os.path.join(rgb_dir, f'{t:06d}.png'),
            os.path.join(rgb_dir, f'{t - 1:06d}.png'),
        ],
        'labels': [
            os.path.join(lab_dir, f'{t:06d}.png'),
            os.path.join(lab_dir, f'{t - 1:06d}.png'),
        ],
        'flow': synthia_seq_flow(flow_dir, t),
    }
    _require(rec['labels'], 'label')
    if require_flows:
      _require([rec['flow']], 'flow file', io.FLOW_HELP)
    records.append(rec)
  if not records:
    raise io.DataError(
        f'No SYNTHIA-Seq samples in {rgb_dir}: expected '
        'frames {t:06d}.png with frame t-1.'
    )
  return records


# ----------------------------------------------------------- image domain
def _image_pairs(
    root: str, img_sub: str, lab_sub: str, digits: int, what: str
) -> list[Record]:
  img_dir, lab_dir = os.path.join(root, img_sub), os.path.join(root, lab_sub)
  if not os.path.isdir(img_dir):
    raise io.DataError(
        f'{root!r} does not look like {what}: expected the '
        f'folder {img_dir} of {{i:0{digits}d}}.png images.'
    )
  records = []
  for i in sorted(_numbered(img_dir, digits)):
    name = f'{i:0{digits}d}.png'
    rec = {
        'id': f'{i:0{digits}d}',
        'frames': [os.path.join(img_dir, name)],
        'labels': [os.path.join(lab_dir, name)],
    }
    _require(rec['labels'], 'label')
    records.append(rec)
  if not records:
    raise io.DataError(f'No {what} images in {img_dir}.')
  return records


def gta5_index(root: str) -> list[Record]:
  """GTA5: ``images/{i:05d}.png`` with ``labels/{i:05d}.png`` labelIds."""
  return _image_pairs(root, 'images', 'labels', 5, 'GTA5')


def synthia_rand_index(root: str) -> list[Record]:
  """SYNTHIA-RAND-CITYSCAPES: ``RGB/{i:07d}.png``, ``GT/LABELS/...``."""
  return _image_pairs(
      root, 'RGB', os.path.join('GT', 'LABELS'), 7, 'SYNTHIA-RAND-CITYSCAPES'
  )


def cityscapes_index(root: str, split: str) -> list[Record]:
  """Cityscapes (images): ``leftImg8bit`` with gtFine labelIds."""
  img_dir = os.path.join(root, 'leftImg8bit', split)
  records = []
  for path, city, seq, t in _annotated(
      root, split, 'leftImg8bit', 'Cityscapes'
  ):
    frame = os.path.join(
        img_dir, city, f'{city}_{seq:06d}_{t:06d}_leftImg8bit.png'
    )
    _require([frame], 'image (leftImg8bit)')
    records.append(
        {'id': f'{city}_{seq:06d}_{t:06d}', 'frames': [frame], 'label': path}
    )
  if not records:
    raise io.DataError(
        f'No annotated frames (*_gtFine_labelIds.png) under '
        f'{os.path.join(root, "gtFine", split)}.'
    )
  return records


# ------------------------------------------------------- official counts
CITYSCAPES_CITIES = {
    'train': (
        'aachen',
        'bochum',
        'bremen',
        'cologne',
        'darmstadt',
        'dusseldorf',
        'erfurt',
        'hamburg',
        'hanover',
        'jena',
        'krefeld',
        'monchengladbach',
        'strasbourg',
        'stuttgart',
        'tubingen',
        'ulm',
        'weimar',
        'zurich',
    ),
    'val': ('frankfurt', 'lindau', 'munster'),
}
VIPER_TRAIN_SEQUENCES = 77

# (dataset, split) -> number of samples of the official lists.
OFFICIAL_COUNTS = {
    ('viper', 'train'): 13367,
    ('synthia_seq', 'train'): 849,
    ('cityscapes_seq', 'train'): 2975,
    ('cityscapes_seq', 'val'): 500,
    ('cityscapes', 'train'): 2975,
    ('cityscapes', 'val'): 500,
    ('gta5', 'train'): 24966,
    ('synthia_rand', 'train'): 9400,
}


def is_full_copy(
    dataset: str, split: str, root: str, records: list[Record]
) -> bool:
  """Whether ``root`` holds the whole official dataset split.

  Only a full copy can be checked against the official count; a partial
  copy (a few sequences or cities) is allowed and reported.
  """
  if dataset == 'viper':
    seqs = {os.path.basename(os.path.dirname(r['frames'][0])) for r in records}
    return split == 'train' and len(seqs) >= VIPER_TRAIN_SEQUENCES
  if dataset in ('cityscapes_seq', 'cityscapes'):
    cities = {r['id'].rsplit('_', 2)[0] for r in records}
    return set(CITYSCAPES_CITIES.get(split, ('?',))) <= cities
  official = OFFICIAL_COUNTS.get((dataset, split))
  return official is not None and len(records) >= official


def check_count(
    dataset: str, split: str, root: str, records: list[Record]
) -> None:
  """Checks the derived list against the official count (full copies).

  Raises:
    io.DataError: a full copy whose list does not have the official length.
  """
  official = OFFICIAL_COUNTS.get((dataset, split))
  if official is None:
    return
  if is_full_copy(dataset, split, root, records):
    if len(records) != official:
      raise io.DataError(
          f'{dataset}/{split} in {root}: the layout rules give '
          f'{len(records)} samples, but the official list has {official}. '
          'Some frames (or their frame t-1) are missing or extra files are '
          'present; compare the folder with the official release.'
      )
  elif len(records) != official:
    logging.warning(
        '%s/%s in %s: %d of the official %d samples (a partial ' 'copy).',
        dataset,
        split,
        root,
        len(records),
        official,
    )


def _require(paths: list[str], what: str, hint: str = '') -> None:
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise io.DataError(
        f'Missing {what}: {missing[0]}'
        + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else '')
        + (f'. {hint}' if hint else '')
    )
