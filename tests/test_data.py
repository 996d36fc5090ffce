"""Datasets: layout rules, TFDS preparation read back pixel-exact, label maps,
flow rules, clip transforms and every bad input."""

import os
import signal
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
from PIL import Image
import pytest

from dastc_jax.data.datasets import builders
from dastc_jax.data.datasets import layouts
from dastc_jax.data.datasets import prepare
from dastc_jax.data import io
from dastc_jax.data import labels
from dastc_jax.data import pipeline
from dastc_jax.data import transforms
from tests import layout_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def viper(tmp_path):
  """VIPER with its flows at the reference location (data/...)."""
  root = str(tmp_path / 'data' / 'Viper')
  flow_dir = str(tmp_path / 'data' / 'estimated_optical_flow_viper_train')
  arrays = layout_fixtures.write_viper(root, flow_dir, np.random.default_rng(0))
  return root, flow_dir, arrays


@pytest.fixture
def cityscapes(tmp_path):
  root = str(tmp_path / 'data' / 'Cityscapes')
  flow_dirs = {
      s: str(tmp_path / 'data' / f'estimated_optical_flow_cityscapes_seq_{s}')
      for s in ('train', 'val')
  }
  arrays = layout_fixtures.write_cityscapes(
      root, flow_dirs, np.random.default_rng(1)
  )
  return root, flow_dirs, arrays


def _read(dataset, split, data_dir, class_set, with_label=True):
  """Prepared examples of a split, decoded by the pipeline's transform."""
  dcfg = ml_collections.ConfigDict({'dataset': dataset, 'split': split})
  spec, source = pipeline.data_source(dcfg, data_dir)
  decode = pipeline.decoder(spec, split, class_set, with_label)
  return [decode.map(source[i]) for i in range(len(source))]


def test_viper_index_takes_every_10th_frame_with_its_previous(viper):
  root, flow_dir, _ = viper
  recs = layouts.viper_index(root, flow_dir, 'train')
  # 00030 is skipped: 00029 does not exist.
  assert [r['id'] for r in recs] == ['001_00010', '001_00020']
  assert recs[0]['frames'][1].endswith('001/001_00009.jpg')
  assert recs[0]['flow'].endswith('001_0001000009_int16_x10.npy')


def test_viper_prepared_round_trip_label_map_and_ego_vehicle(viper, tmp_path):
  root, _, (frames, raws, flows) = viper
  data_dir = str(tmp_path / 'tfds')
  # Flows are found at the reference location beside the dataset folder.
  assert prepare.prepare('viper', root, data_dir) == {'train': 2}
  ex = {e['id']: e for e in _read('viper', 'train', data_dir, 'viper15')}
  e = ex['001_00020']
  for k, f in enumerate((20, 19)):
    # JPEG frames: identical to a plain PIL decode of the file.
    path = layouts.viper_image(root, 'train', 1, f)
    np.testing.assert_array_equal(
        e['frames'][k], np.asarray(Image.open(path).convert('RGB'))
    )
    assert np.abs(e['frames'][k].astype(int) - frames[f]).mean() < 4
  raw, lab = raws[20], e['labels'][0]
  h, w = raw.shape
  # Tree (7) and vegetation (8) both map to vegetation (6); van (25) -> 255.
  assert np.all(lab[raw == 7] == 6) and np.all(lab[raw == 8] == 6)
  assert np.all(lab[raw == 25] == 255)
  assert np.all(lab[raw == 3] == 0) and np.all(lab[raw == 20] == 9)
  # The ego vehicle (car touching the bottom centre) is ignored; the other
  # car component stays car (10).
  assert np.all(lab[h - 4 :, w // 2 - 4 : w // 2 + 4] == 255)
  assert lab[h - 5, w // 2 + 4] == 255  # diagonal neighbour: 8-connected
  assert np.all(lab[:3, :3] == 10)
  np.testing.assert_array_equal(e['labels'][1], _viper_train_ids(raws[19]))
  np.testing.assert_allclose(e['flow'], flows[20].astype(np.float32), atol=1e-5)
  # The label statistics (rare-class index) match the stored labels.
  ids, hist = builders.load_stats(data_dir, builders.SPECS['viper'], 'train')
  assert ids == ['001_00010', '001_00020']
  np.testing.assert_array_equal(
      hist[1], np.bincount(lab.ravel(), minlength=256)
  )


def _viper_train_ids(raw):
  return labels.VIPER_TO_TRAIN[io.remove_ego_vehicle(raw, labels.VIPER_CAR)]


def test_cityscapes_seq_prepared_with_per_benchmark_label_maps(
    cityscapes, tmp_path
):
  root, _, arrays = cityscapes
  data_dir = str(tmp_path / 'tfds')
  assert prepare.prepare('cityscapes_seq', root, data_dir) == {
      'train': 1,
      'val': 1,
  }
  [tr] = _read('cityscapes_seq', 'train', data_dir, 'viper15')
  assert tr['id'] == 'aachen_000000_000019'
  for k, f in enumerate((19, 18, 17)):  # PNG: pixel exact
    np.testing.assert_array_equal(tr['frames'][k], arrays[('train', f)])
  for key, (t, s) in (
      ('flow', (19, 18)),
      ('flow_t_t2', (19, 17)),
      ('flow_t1_t2', (18, 17)),
  ):
    np.testing.assert_allclose(tr[key], arrays[('train', t, s)], atol=1e-5)
  [ev] = _read('cityscapes_seq', 'val', data_dir, 'viper15')
  assert ev['frames'].shape[0] == 2 and 'flow_t_t2' not in ev
  gt = arrays[('val', 'gt')]
  np.testing.assert_array_equal(ev['label'], labels.CITYSCAPES_TO_VIPER15[gt])
  # Rider (25) merges into person for VIPER; pole (17) is ignored there but
  # scored for SYNTHIA; ego vehicle (1) is ignored by both.
  assert np.all(ev['label'][gt == 25] == 9)
  assert np.all(ev['label'][gt == 17] == 255)
  [syn] = _read('cityscapes_seq', 'val', data_dir, 'synthia12')
  assert np.all(syn['label'][gt == 25] == 10)
  assert np.all(syn['label'][gt == 17] == 4)
  assert np.all(syn['label'][gt == 1] == 255)


def test_synthia_seq_16bit_labels_crop_rule_and_flows(tmp_path):
  root = str(tmp_path / 'SynthiaSeq' / 'SEQS-04-DAWN')
  flow_dir = str(tmp_path / 'flows')
  arrays = layout_fixtures.write_synthia_seq(
      root, flow_dir, np.random.default_rng(2)
  )
  # Pillow keeps only the high byte of 16-bit RGB samples: the class
  # channel would read as all zeros.
  assert not np.asarray(Image.open(os.path.join(root, 'label', '000001.png')))[
      ..., 0
  ].any()
  data_dir = str(tmp_path / 'tfds')
  assert prepare.prepare(
      'synthia_seq', root, data_dir, flow_dirs={'train': flow_dir}
  ) == {'train': 2}
  ex = _read('synthia_seq', 'train', data_dir, 'synthia12')
  assert [e['id'] for e in ex] == ['000001', '000002']
  for e, t in zip(ex, (1, 2)):
    assert e['frames'].shape == (2, 640, 1280, 3)
    for k, f in enumerate((t, t - 1)):
      img, raw = arrays[f]
      # The bottom 120 rows are cut; channel 0 holds the class.
      np.testing.assert_array_equal(e['frames'][k], img[:640])
      np.testing.assert_array_equal(
          e['labels'][k], labels.SYNTHIA_TO_TRAIN[raw[:640]]
      )
  # SYNTHIA id 11 ("bicycle") is the rider class; lane marking 12 is void.
  raw = arrays[1][1][:640]
  assert np.all(ex[0]['labels'][0][raw == 11] == 10)
  assert np.all(ex[0]['labels'][0][raw == 15] == 5)
  assert np.all(ex[0]['labels'][0][raw == 0] == 255)
  # A flow on the uncropped grid (380x640 = half of 760x1280) is cut like
  # its frame (to 320 rows); one on the crop grid is kept.
  np.testing.assert_allclose(
      ex[0]['flow'], arrays[('flow', 1)][:320], atol=1e-5
  )
  np.testing.assert_allclose(ex[1]['flow'], arrays[('flow', 2)], atol=1e-5)
  with pytest.raises(ValueError, match='labelled with the synthia12'):
    _read('synthia_seq', 'train', data_dir, 'viper15')


def test_image_domain_datasets(tmp_path):
  rng = np.random.default_rng(3)
  data_dir = str(tmp_path / 'tfds')
  gta = layout_fixtures.write_gta5(str(tmp_path / 'GTA5'), rng)
  syn = layout_fixtures.write_synthia_rand(str(tmp_path / 'RAND'), rng)
  cs = layout_fixtures.write_cityscapes_images(str(tmp_path / 'CS'), rng)
  assert prepare.prepare('gta5', str(tmp_path / 'GTA5'), data_dir) == {
      'train': 3
  }
  assert prepare.prepare('synthia_rand', str(tmp_path / 'RAND'), data_dir) == {
      'train': 2
  }
  assert prepare.prepare('cityscapes', str(tmp_path / 'CS'), data_dir) == {
      'train': 1,
      'val': 2,
  }
  for e in _read('gta5', 'train', data_dir, 'cityscapes19'):
    img, lab = gta[int(e['id'])]
    assert e['frames'].shape == (1,) + img.shape
    np.testing.assert_array_equal(e['frames'][0], img)
    np.testing.assert_array_equal(e['labels'][0], labels.CITYSCAPES_TO_19[lab])
    assert np.all(e['labels'][0][lab == 31] == 16)  # train
    assert 'flow' not in e
  for e in _read('synthia_rand', 'train', data_dir, 'synthia16'):
    img, raw = syn[int(e['id'])]
    np.testing.assert_array_equal(e['frames'][0], img)
    np.testing.assert_array_equal(
        e['labels'][0], labels.SYNTHIA_RAND_TO_TRAIN[raw]
    )
    assert np.all(e['labels'][0][raw == 17] == 11)  # rider
    assert np.all(e['labels'][0][raw == 22] == 255)  # lane marking
  val = _read('cityscapes', 'val', data_dir, 'synthia16')
  assert [e['id'] for e in val] == [
      'lindau_000000_000019',
      'munster_000002_000019',
  ]
  for e in val:
    img, gt = cs[e['id']]
    np.testing.assert_array_equal(e['frames'][0], img)
    np.testing.assert_array_equal(
        e['label'], labels.CITYSCAPES_TO_SYNTHIA16[gt]
    )
  # Long-tail index of GTA5 in the 19 Cityscapes classes.
  spec = builders.SPECS['gta5']
  rare = pipeline.source_rare_index(spec, data_dir, 'train', 'cityscapes19')
  for k, members in rare.items():
    for i, e in enumerate(_read('gta5', 'train', data_dir, 'cityscapes19')):
      assert (i in members) == (
          np.count_nonzero(e['labels'][0] == k) >= pipeline.RARE_MIN_PIXELS
      )


def test_resize_scales_flows_and_flip_negates_dx():
  ex = {
      'frames': np.zeros((2, 8, 16, 3), np.uint8),
      'labels': np.zeros((2, 8, 16), np.uint8),
      'flow': np.full((8, 16, 2), 2.0, np.float32),
  }
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


def test_random_scale_crop_is_one_window_for_the_whole_clip():
  h, w = 16, 24
  yy, xx = np.mgrid[0:h, 0:w]
  code = (yy * w + xx).astype(np.int64)
  ex = {
      'frames': np.stack([np.stack([code % 256] * 3, -1)] * 3).astype(np.uint8),
      'labels': np.stack([code % 200] * 2).astype(np.uint8),
      'label': (code % 200).astype(np.uint8),
      'flow': np.stack([xx, yy], -1).astype(np.float32),
      'flow_t_t2': np.ones((h, w, 2), np.float32),
  }
  crop = transforms.RandomScaleCrop(crop_size=(8, 10))
  out = crop.random_map(ex, np.random.default_rng(5))
  # The flow here stores each pixel's own (x, y): it locates the window.
  c0, r0 = int(out['flow'][0, 0, 0]), int(out['flow'][0, 0, 1])
  win = (slice(r0, r0 + 8), slice(c0, c0 + 10))
  np.testing.assert_array_equal(
      out['frames'], ex['frames'][(slice(None),) + win]
  )
  np.testing.assert_array_equal(
      out['labels'], ex['labels'][(slice(None),) + win]
  )
  np.testing.assert_array_equal(out['label'], ex['label'][win])
  np.testing.assert_array_equal(out['flow_t_t2'], 1.0)
  scaled = transforms.RandomScaleCrop(scale=(2.0, 2.0)).random_map(
      ex, np.random.default_rng(0)
  )
  assert scaled['frames'].shape == (3, 32, 48, 3)
  assert scaled['labels'].shape == (2, 32, 48)
  np.testing.assert_allclose(scaled['flow_t_t2'], 2.0)  # magnitudes x2
  with pytest.raises(ValueError, match='larger than the'):
    transforms.RandomScaleCrop(crop_size=(20, 10)).random_map(
        ex, np.random.default_rng(0)
    )


def test_pseudo_margins_mark_the_crop_window_of_the_frame_borders():
  h, w = 16, 24
  yy, xx = np.mgrid[0:h, 0:w]
  ex = {
      'frames': np.zeros((2, h, w, 3), np.uint8),
      'flow': np.stack([xx, yy], -1).astype(np.float32),
  }
  margins = (2, 5, 3, 1)  # top, bottom, left, right
  full = np.zeros((h, w), np.uint8)
  full[2 : h - 5, 3 : w - 1] = 1
  whole = transforms.RandomScaleCrop(pseudo_margins=margins).random_map(
      ex, np.random.default_rng(0)
  )
  np.testing.assert_array_equal(whole['pl_valid'], full)
  for seed in range(5):
    out = transforms.RandomScaleCrop(
        crop_size=(8, 10), pseudo_margins=margins
    ).random_map(ex, np.random.default_rng(seed))
    c0, r0 = int(out['flow'][0, 0, 0]), int(out['flow'][0, 0, 1])
    np.testing.assert_array_equal(
        out['pl_valid'], full[r0 : r0 + 8, c0 : c0 + 10]
    )
    flipped = transforms.hflip(out)
    np.testing.assert_array_equal(flipped['pl_valid'], out['pl_valid'][:, ::-1])
  # No margins, no key.
  plain = transforms.RandomScaleCrop(crop_size=(8, 10)).random_map(
      ex, np.random.default_rng(0)
  )
  assert 'pl_valid' not in plain


# ------------------------------------------------------------- bad input
def _prepare_error(dataset, root, data_dir, match, **kw):
  with pytest.raises(io.DataError, match=match) as e:
    prepare.prepare(dataset, root, data_dir, **kw)
  return str(e.value)


def test_corrupt_image_names_the_file(viper, tmp_path):
  root, _, _ = viper
  path = layouts.viper_image(root, 'train', 1, 19)
  with open(path, 'r+b') as f:
    f.truncate(100)
  msg = _prepare_error(
      'viper', root, str(tmp_path / 'tfds'), 'Cannot decode image'
  )
  assert path in msg
  # Nothing that looks prepared was left behind.
  assert not prepare.is_prepared(
      str(tmp_path / 'tfds'), builders.SPECS['viper'], 'train'
  )


def test_bad_labels_and_flows_are_rejected(viper, tmp_path):
  root, flow_dir, _ = viper
  data_dir = str(tmp_path / 'tfds')
  label = layouts.viper_label(root, 'train', 1, 20)
  good = np.asarray(Image.open(label))
  Image.fromarray(np.full((5, 5), 3, np.uint8)).save(label)
  assert label in _prepare_error(
      'viper', root, data_dir, 'expected the size of its frame'
  )
  bad = good.copy()
  bad[0, 0] = 77
  Image.fromarray(bad).save(label)
  assert label in _prepare_error(
      'viper', root, data_dir, r'unexpected ids \[77\]'
  )
  Image.fromarray(np.zeros(good.shape + (3,), np.uint8)).save(label)
  _prepare_error('viper', root, data_dir, 'single-channel')
  Image.fromarray(good).save(label)
  flow = layouts.viper_flow(flow_dir, 1, 20)
  np.save(flow, np.zeros((12, 16, 2), np.float32))
  assert flow in _prepare_error(
      'viper', root, data_dir, 'dtype float32; expected int16'
  )
  np.save(flow, np.zeros((12, 16, 3), np.int16))
  _prepare_error('viper', root, data_dir, r'expected \[H, W, 2\]')
  np.save(flow, np.zeros((12, 12, 2), np.int16))
  _prepare_error('viper', root, data_dir, 'same aspect ratio')
  np.save(flow, np.zeros((12, 16, 2), np.int16))  # half-resolution: fine
  assert prepare.prepare('viper', root, data_dir) == {'train': 2}


def test_missing_previous_frame_label_or_flow(viper, cityscapes, tmp_path):
  root, flow_dir, _ = viper
  data_dir = str(tmp_path / 'tfds')
  flow = layouts.viper_flow(flow_dir, 1, 20)
  os.rename(flow, flow + '.bak')
  msg = _prepare_error('viper', root, data_dir, 'Missing flow file')
  assert flow in msg and 'FlowNet2' in msg  # how flows are produced
  os.rename(flow + '.bak', flow)
  label = layouts.viper_label(root, 'train', 1, 19)
  os.remove(label)
  assert label in _prepare_error('viper', root, data_dir, 'Missing label')
  croot, _, _ = cityscapes
  frame = layouts.cs_image(croot, 'train', 'aachen', 0, 17)
  os.remove(frame)
  assert frame in _prepare_error(
      'cityscapes_seq', croot, data_dir, 'Missing frame'
  )


def test_manual_dir_of_the_wrong_dataset(viper, cityscapes, tmp_path):
  vroot, _, _ = viper
  croot, _, _ = cityscapes
  data_dir = str(tmp_path / 'tfds')
  _prepare_error('viper', croot, data_dir, 'does not look like VIPER')
  _prepare_error(
      'cityscapes_seq', vroot, data_dir, 'does not look like Cityscapes-Seq'
  )
  _prepare_error(
      'synthia_seq', vroot, data_dir, 'does not look like SYNTHIA-Seq'
  )
  _prepare_error('gta5', croot, data_dir, 'does not look like GTA5')


def test_full_copy_is_checked_against_the_official_count(
    viper, tmp_path, monkeypatch
):
  root, _, _ = viper
  # Pretend the one sequence is all of VIPER: 2 samples != 13,367.
  monkeypatch.setattr(layouts, 'VIPER_TRAIN_SEQUENCES', 1)
  msg = _prepare_error(
      'viper', root, str(tmp_path / 'tfds'), 'official list has 13367'
  )
  assert 'give 2 samples' in msg


def test_unprepared_data_dir_names_the_prepare_command(tmp_path):
  dcfg = ml_collections.ConfigDict({'dataset': 'viper', 'split': 'train'})
  with pytest.raises(io.DataError) as e:
    pipeline.data_source(dcfg, str(tmp_path / 'nothing'), 'config.data.source')
  msg = str(e.value)
  assert 'config.data.source' in msg
  assert (
      'python -m dastc_jax.prepare --dataset=viper '
      f'--manual_dir=data/Viper --data_dir={tmp_path}/nothing' in msg
  )


# ---------------------------------------------- interruption and resume
_KILL_AFTER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from dastc_jax.data.datasets import builders, prepare
    real, calls = builders.encode, [0]
    def encode(spec, rec):
      calls[0] += 1
      if calls[0] > {k}:
        os.kill(os.getpid(), signal.SIGKILL)  # no chance to clean up
      return real(spec, rec)
    builders.encode = encode
    prepare.prepare({dataset!r}, {root!r}, {data_dir!r})
""")


@pytest.mark.integration
def test_killed_preparation_resumes_and_matches_a_clean_one(
    cityscapes, tmp_path
):
  root, flow_dirs, _ = cityscapes
  # More samples: a second train sequence.
  rng = np.random.default_rng(4)
  for seq in (1, 2):
    for f in (17, 18, 19):
      layout_fixtures._save(
          layouts.cs_image(root, 'train', 'bochum', seq, f),
          rng.integers(0, 255, (16, 32, 3), np.uint8),
      )
    layout_fixtures._save(
        layouts.cs_label(root, 'train', 'bochum', seq, 19),
        np.full((16, 32), 7, np.uint8),
    )
    for t, s in ((19, 18), (19, 17), (18, 17)):
      np.save(
          layouts.cs_flow(flow_dirs['train'], 'bochum', seq, t, s),
          np.zeros((16, 32, 2), np.int16),
      )
  data_dir = str(tmp_path / 'tfds')
  script = _KILL_AFTER.format(
      repo=REPO, k=2, dataset='cityscapes_seq', root=root, data_dir=data_dir
  )
  proc = subprocess.run(
      [sys.executable, '-c', script],
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  spec = builders.SPECS['cityscapes_seq']
  assert not prepare.is_prepared(data_dir, spec, 'train')
  cache = os.path.join(data_dir, spec.tfds_name, '.prepare_cache', 'train')
  assert len(os.listdir(cache)) == 2  # the finished samples survive
  # A cache entry cut short (a kill while it was written) is redone.
  with open(os.path.join(cache, sorted(os.listdir(cache))[0]), 'r+b') as f:
    f.truncate(20)
  # The same command again finishes the job, reusing the finished samples.
  calls = []
  real = builders.encode

  def counting(s, rec):
    calls.append(rec['id'])
    return real(s, rec)

  builders.encode, saved = counting, builders.encode
  try:
    assert prepare.prepare('cityscapes_seq', root, data_dir) == {
        'train': 3,
        'val': 1,
    }
  finally:
    builders.encode = saved
  # 3 train samples: 1 reused, 1 redone (truncated entry), 1 never done.
  assert len([c for c in calls if c != 'frankfurt_000003_000019']) == 2
  assert not os.path.exists(os.path.dirname(cache))  # cache removed
  leftovers = [p for p, _, _ in os.walk(data_dir) if 'incomplete.' in p]
  assert not leftovers
  clean = str(tmp_path / 'clean')
  prepare.prepare('cityscapes_seq', root, clean)
  for split in ('train', 'val'):
    a = _read('cityscapes_seq', split, data_dir, 'viper15')
    b = _read('cityscapes_seq', split, clean, 'viper15')
    assert [e['id'] for e in a] == [e['id'] for e in b]
    for x, y in zip(a, b):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])
  # A rerun of a prepared dataset is a no-op that keeps the files.
  files = {p: os.path.getmtime(p) for p in _files(data_dir)}
  assert prepare.prepare('cityscapes_seq', root, data_dir) == {
      'train': 3,
      'val': 1,
  }
  assert {p: os.path.getmtime(p) for p in _files(data_dir)} == files


def _files(folder):
  return [
      os.path.join(d, f)
      for d, _, fs in os.walk(folder)
      for f in fs
      if not f.endswith('.lock')
  ]


@pytest.mark.integration
def test_preparation_needs_no_tensorflow(viper, tmp_path):
  root, _, _ = viper
  script = textwrap.dedent(f"""
      import importlib.machinery as machinery
      import sys

      class NoTensorFlow(machinery.PathFinder):  # TF looks uninstalled
        @classmethod
        def find_spec(cls, name, path=None, target=None):
          if name.split('.')[0] in ('tensorflow', 'keras'):
            return None
          return machinery.PathFinder.find_spec(name, path, target)

      sys.meta_path = [NoTensorFlow if f is machinery.PathFinder else f
                       for f in sys.meta_path]
      sys.path.insert(0, {REPO!r})
      import ml_collections
      from dastc_jax.data import pipeline
      from dastc_jax.data.datasets import prepare
      prepare.prepare('viper', {root!r}, {str(tmp_path / 'tfds')!r})
      d = ml_collections.ConfigDict(dict(dataset='viper', split='train'))
      spec, src = pipeline.data_source(d, {str(tmp_path / 'tfds')!r})
      ex = pipeline.decoder(spec, 'train', 'viper15', True).map(src[1])
      print(ex['frames'].shape, ex['flow'].shape)
      assert 'tensorflow' not in sys.modules
  """)
  proc = subprocess.run(
      [sys.executable, '-c', script],
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '(2, 24, 32, 3) (12, 16, 2)' in proc.stdout


@pytest.mark.integration
def test_prepare_command_line(tmp_path):
  layout_fixtures.write_gta5(str(tmp_path / 'GTA5'), np.random.default_rng(5))
  data_dir = str(tmp_path / 'tfds')
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'dastc_jax.prepare',
          '--dataset=gta5',
          f'--manual_dir={tmp_path}/GTA5',
          f'--data_dir={data_dir}',
      ],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=REPO,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '"samples": {"train": 3}' in proc.stdout
  assert prepare.is_prepared(data_dir, builders.SPECS['gta5'], 'train')
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'dastc_jax.prepare',
          '--dataset=viper',
          f'--manual_dir={tmp_path}/GTA5',
          f'--data_dir={data_dir}',
      ],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=REPO,
  )
  assert proc.returncode != 0
  assert 'does not look like VIPER' in proc.stderr


def test_adding_a_split_to_a_prepared_dataset_is_refused(tmp_path):
  rng = np.random.default_rng(6)
  layout_fixtures.write_cityscapes_images(str(tmp_path / 'CS'), rng)
  data_dir = str(tmp_path / 'tfds')
  assert prepare.prepare(
      'cityscapes', str(tmp_path / 'CS'), data_dir, splits=['val']
  ) == {'val': 2}
  with pytest.raises(io.DataError, match=r"without the split\(s\) \['train'\]"):
    prepare.prepare('cityscapes', str(tmp_path / 'CS'), data_dir)
  # The prepared split is untouched and still reads.
  assert len(_read('cityscapes', 'val', data_dir, 'cityscapes19')) == 2
