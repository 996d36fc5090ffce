"""Loaders on fixture trees in the real layouts: round trip, maps, errors."""

import os

import numpy as np
from PIL import Image
import pytest

from dastc_jax.data import io
from dastc_jax.data import labels
from dastc_jax.data import layouts
from dastc_jax.data import transforms
from tests import layout_fixtures


@pytest.fixture
def viper(tmp_path):
  root, flow_dir = str(tmp_path / 'Viper'), str(tmp_path / 'flow_viper')
  arrays = layout_fixtures.write_viper(root, flow_dir,
                                       np.random.default_rng(0))
  return root, flow_dir, arrays


@pytest.fixture
def cityscapes(tmp_path):
  root = str(tmp_path / 'Cityscapes')
  flow_dirs = {s: str(tmp_path / f'flow_cs_{s}') for s in ('train', 'val')}
  arrays = layout_fixtures.write_cityscapes(root, flow_dirs,
                                            np.random.default_rng(1))
  return root, flow_dirs, arrays


def test_viper_index_takes_every_10th_frame_with_its_previous(viper):
  root, flow_dir, _ = viper
  recs = layouts.viper_index(root, flow_dir, 'train')
  # 00030 is skipped: 00029 does not exist.
  assert [r['id'] for r in recs] == ['001_00010', '001_00020']
  assert recs[0]['frames'][1].endswith('001/001_00009.jpg')
  assert recs[0]['flow'].endswith('001_0001000009_int16_x10.npy')


def test_viper_decode_round_trip_and_label_map(viper):
  root, flow_dir, (frames, raws, flows) = viper
  rec = layouts.viper_index(root, flow_dir, 'train')[1]  # t = 20
  ex = transforms.DecodeViper(remove_ego=True).map(rec)
  for k, f in enumerate((20, 19)):
    # JPEG frames: identical to a plain PIL decode of the file.
    ref = np.asarray(Image.open(rec['frames'][k]).convert('RGB'))
    np.testing.assert_array_equal(ex['frames'][k], ref)
    assert np.abs(ex['frames'][k].astype(int) - frames[f]).mean() < 4
  raw = raws[20]
  lab = ex['labels'][0]
  h, w = raw.shape
  # Tree (7) and vegetation (8) both map to vegetation (6); van (25) -> 255.
  assert np.all(lab[raw == 7] == 6) and np.all(lab[raw == 8] == 6)
  assert np.all(lab[raw == 25] == 255)
  assert np.all(lab[raw == 3] == 0) and np.all(lab[raw == 20] == 9)
  # The ego vehicle (car touching the bottom centre) is ignored; the other
  # car component stays car (10).
  assert np.all(lab[h - 4:, w // 2 - 4:w // 2 + 4] == 255)
  assert lab[h - 5, w // 2 + 4] == 255  # diagonal neighbour: 8-connected
  assert np.all(lab[:3, :3] == 10)
  np.testing.assert_allclose(ex['flow'], flows[20].astype(np.float32),
                             atol=1e-5)


def test_cityscapes_seq_train_and_val_records(cityscapes):
  root, flow_dirs, arrays = cityscapes
  train = layouts.cityscapes_seq_index(root, flow_dirs['train'], 'train',
                                       'train')
  val = layouts.cityscapes_seq_index(root, flow_dirs['val'], 'val', 'val')
  assert [r['id'] for r in train] == ['aachen_000000_000019']
  assert sorted(train[0]['flows']) == ['flow', 'flow_t1_t2', 'flow_t_t2']
  assert train[0]['flows']['flow_t_t2'].endswith(
      'aachen_000000_000019_000017_int16_x10.npy')
  ex = transforms.DecodeCityscapesSeq('viper15', with_label=False).map(
      train[0])
  for k, f in enumerate((19, 18, 17)):  # PNG: pixel exact
    np.testing.assert_array_equal(ex['frames'][k], arrays[('train', f)])
  np.testing.assert_allclose(ex['flow_t1_t2'], arrays[('train', 18, 17)],
                             atol=1e-5)
  ev = transforms.DecodeCityscapesSeq('viper15').map(val[0])
  assert ev['frames'].shape[0] == 2
  gt = arrays[('val', 'gt')]
  np.testing.assert_array_equal(ev['label'],
                                labels.CITYSCAPES_TO_VIPER15[gt])
  # Rider (25) merges into person for VIPER; pole (17) is ignored there but
  # scored for SYNTHIA; ego vehicle (1) is ignored by both.
  assert np.all(ev['label'][gt == 25] == 9)
  assert np.all(ev['label'][gt == 17] == 255)
  syn = transforms.DecodeCityscapesSeq('synthia12').map(val[0])['label']
  assert np.all(syn[gt == 25] == 10) and np.all(syn[gt == 17] == 4)
  assert np.all(syn[gt == 1] == 255)


def test_resize_scales_flows_and_flip_negates_dx():
  ex = {'frames': np.zeros((2, 8, 16, 3), np.uint8),
        'labels': np.zeros((2, 8, 16), np.uint8),
        'flow': np.full((8, 16, 2), 2.0, np.float32)}
  ex['labels'][:, :, :4] = 7
  ex['flow'][:, :8, 0] = -1.0
  big = transforms.Resize(image_size=(16, 32)).map(ex)
  assert big['frames'].shape == (2, 16, 32, 3)
  assert big['labels'].shape == (2, 16, 32)
  np.testing.assert_allclose(big['flow'][..., 1], 4.0)  # x2 magnitudes
  flipped = transforms.hflip(ex)
  np.testing.assert_array_equal(flipped['labels'][:, :, -4:], 7)
  np.testing.assert_allclose(flipped['flow'][:, -1, 0], 1.0)  # was -1, x-flip
  np.testing.assert_allclose(flipped['flow'][:, 0, 0], -2.0)
  np.testing.assert_allclose(flipped['flow'][..., 1], 2.0)
  # The reference bug, behind a flag: flipped frames, dx sign kept.
  rng = np.random.default_rng(0)
  buggy = transforms.RandomFlip(p=1.0, negate_dx=False).random_map(ex, rng)
  np.testing.assert_array_equal(buggy['labels'], flipped['labels'])
  np.testing.assert_allclose(buggy['flow'][:, -1, 0], -1.0)
  np.testing.assert_allclose(buggy['flow'][:, 0, 0], 2.0)
  fixed = transforms.RandomFlip(p=1.0).random_map(ex, rng)
  np.testing.assert_allclose(fixed['flow'], flipped['flow'])


def test_missing_flow_names_the_file_and_how_flows_are_made(viper):
  root, flow_dir, _ = viper
  path = layouts.viper_flow(flow_dir, 1, 20)
  os.remove(path)
  with pytest.raises(io.DataError, match='FlowNet2') as e:
    layouts.viper_index(root, flow_dir, 'train')
  assert path in str(e.value)


def test_missing_previous_cityscapes_frame_is_an_error(cityscapes):
  root, flow_dirs, _ = cityscapes
  path = layouts.cs_image(root, 'train', 'aachen', 0, 17)
  os.remove(path)
  with pytest.raises(io.DataError, match='Missing frame') as e:
    layouts.cityscapes_seq_index(root, flow_dirs['train'], 'train', 'train')
  assert path in str(e.value)


def test_corrupt_image_names_the_file(viper):
  root, flow_dir, _ = viper
  rec = layouts.viper_index(root, flow_dir, 'train')[0]
  with open(rec['frames'][1], 'r+b') as f:
    f.truncate(100)
  with pytest.raises(io.DataError, match='Cannot decode image') as e:
    transforms.DecodeViper().map(rec)
  assert rec['frames'][1] in str(e.value)


def test_bad_labels_and_flows_are_rejected(viper, tmp_path):
  root, flow_dir, _ = viper
  rec = layouts.viper_index(root, flow_dir, 'train')[0]
  good = np.asarray(Image.open(rec['labels'][0]))
  Image.fromarray(np.full((5, 5), 3, np.uint8)).save(rec['labels'][0])
  with pytest.raises(io.DataError, match='expected the size of its frame'):
    transforms.DecodeViper().map(rec)
  bad = good.copy()
  bad[0, 0] = 77
  Image.fromarray(bad).save(rec['labels'][0])
  with pytest.raises(io.DataError, match=r'unexpected ids \[77\]'):
    transforms.DecodeViper().map(rec)
  Image.fromarray(good).save(rec['labels'][0])
  np.save(rec['flow'], np.zeros((4, 4, 2), np.float32))
  with pytest.raises(io.DataError, match='dtype float32; expected int16'):
    transforms.DecodeViper().map(rec)
  np.save(rec['flow'], np.zeros((4, 4, 3), np.int16))
  with pytest.raises(io.DataError, match=r'expected \[H, W, 2\]'):
    transforms.DecodeViper().map(rec)
  rgb_label = str(tmp_path / 'rgb.png')
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb_label)
  with pytest.raises(io.DataError, match='single-channel'):
    io.read_label(rgb_label)


def test_wrong_dataset_root_is_explained(viper, cityscapes):
  vroot, vflow, _ = viper
  croot, cflows, _ = cityscapes
  with pytest.raises(io.DataError, match='does not look like VIPER'):
    layouts.viper_index(croot, vflow, 'train')
  with pytest.raises(io.DataError, match='does not look like Cityscapes'):
    layouts.cityscapes_seq_index(vroot, cflows['val'], 'val', 'val')


def test_clip_frames_of_different_sizes_and_mismatched_flow_grids(
    cityscapes):
  root, flow_dirs, _ = cityscapes
  rec = layouts.cityscapes_seq_index(root, flow_dirs['val'], 'val',
                                     'val')[0]
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rec['frames'][1])
  with pytest.raises(io.DataError, match='must have one size') as e:
    transforms.DecodeCityscapesSeq().map(rec)
  assert rec['frames'][1] in str(e.value)
  Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(rec['frames'][1])
  np.save(rec['flows']['flow'], np.zeros((16, 16, 2), np.int16))
  with pytest.raises(io.DataError, match='same aspect ratio') as e:
    transforms.DecodeCityscapesSeq().map(rec)
  assert rec['flows']['flow'] in str(e.value)
  # A flow on a half-resolution copy of the frame grid is fine.
  np.save(rec['flows']['flow'], np.zeros((8, 16, 2), np.int16))
  assert transforms.DecodeCityscapesSeq().map(rec)['flow'].shape == (8, 16,
                                                                     2)
