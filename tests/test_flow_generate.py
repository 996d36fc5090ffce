"""Flow files of the datasets computed with RAFT, on the tiny synthetic world
(whose VIPER and Cityscapes-Seq copies come with exact flows under the
reference names): which files, their format, resuming, the estimator
marker, bad input, a full disk, and prepare reading the result."""

import errno
import glob
import json
import os

import jax
import numpy as np
import pytest
import torch
from torchvision.models import optical_flow as tv_flow

from dastc_jax import errors
from dastc_jax import paths
from dastc_jax.data.datasets import prepare
from dastc_jax.flow import estimate
from dastc_jax.flow import generate
from dastc_jax.flow import weights as flow_weights

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def raft_file(tmp_path_factory):
  """torchvision raft_small with random weights, saved as a .pth."""
  torch.manual_seed(0)
  path = str(tmp_path_factory.mktemp('raft') / 'raft_small.pth')
  torch.save(tv_flow.raft_small(weights=None).state_dict(), path)
  return path


@pytest.fixture(scope='module')
def estimator(raft_file):
  return estimate.RaftEstimator(
      raft_file, iterations=2, devices=jax.local_devices()[:2]
  )


def _names(folder):
  return sorted(
      os.path.basename(p)
      for p in glob.glob(os.path.join(folder, '*_int16_x10.npy'))
  )


@pytest.mark.parametrize(
    'dataset,split',
    [
        ('viper', 'train'),
        ('cityscapes_seq', 'train'),
        ('cityscapes_seq', 'val'),
    ],
)
def test_jobs_are_the_reference_files(tiny_world, dataset, split):
  """The pairs and names equal the world's exact flows (written by the
  world generator from the reference naming, not by this code)."""
  manual = os.path.join(
      tiny_world, {'viper': 'Viper', 'cityscapes_seq': 'Cityscapes'}[dataset]
  )
  splits, dirs = generate.default_splits_and_dirs(dataset, manual, [split], {})
  jobs = generate.list_jobs(dataset, manual, split, dirs[split])
  assert jobs
  assert sorted(os.path.basename(j.output) for j in jobs) == _names(dirs[split])
  for job in jobs:  # frame t's number is in the name, then frame s's
    name = os.path.basename(job.output)
    if dataset == 'cityscapes_seq':
      t, s = name.split('_')[2:4]
      assert job.frame_t.endswith(f'_{t}_leftImg8bit.png')
      assert job.frame_s.endswith(f'_{s}_leftImg8bit.png')
    else:
      seq, ts = name.split('_')[:2]
      assert job.frame_t.endswith(f'{seq}_{ts[:5]}.jpg')
      assert job.frame_s.endswith(f'{seq}_{ts[5:]}.jpg')


def test_write_resume_and_prepare(tiny_world, estimator, tmp_path):
  manual = os.path.join(tiny_world, 'Viper')
  out = str(tmp_path / 'flows')
  hw = (144, 256)  # the frames' 72x128 grid, doubled
  stats = generate.run(
      'viper', manual, ['train'], {'train': out}, estimator, hw=hw, batch_size=4
  )['train']
  assert stats['written'] == stats['total'] == 6 and stats['skipped'] == 0
  files = sorted(glob.glob(os.path.join(out, '*_int16_x10.npy')))
  assert len(files) == 6
  first = np.load(files[0])
  assert first.dtype == np.int16 and first.shape == (144, 256, 2)
  # The stored values are int16(10 F) of RAFT's flow for that pair,
  # recomputed in the writer's first batch of 4: the same program, so the
  # same bits (another batch size rounds differently, and a value next to
  # a multiple of 0.1 can then truncate to the neighbouring integer).
  jobs = generate.list_jobs('viper', manual, 'train', out)[:4]
  pairs = [generate._read_pair(j, hw) for j in jobs]  # pylint: disable=protected-access
  want = estimator.flows(
      np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
  )
  for job, flow in zip(jobs, want):
    np.testing.assert_array_equal(
        np.load(job.output), np.trunc(10 * flow).astype(np.int16)
    )
  marker = json.load(open(os.path.join(out, generate.MARKER)))
  assert marker['variant'] == 'raft_small' and marker['iterations'] == 2
  # A rerun skips everything; a truncated file is recomputed.
  mtimes = {f: os.stat(f).st_mtime_ns for f in files}
  with open(files[1], 'r+b') as f:
    f.truncate(100)
  stats = generate.run(
      'viper', manual, ['train'], {'train': out}, estimator, hw=hw, batch_size=4
  )['train']
  assert (stats['skipped'], stats['written']) == (5, 1)
  assert all(
      os.stat(f).st_mtime_ns == m for f, m in mtimes.items() if f != files[1]
  )
  assert generate.is_done(files[1], hw)
  # prepare reads them (same aspect as the frames; resized on read).
  counts = prepare.prepare(
      'viper',
      manual,
      str(tmp_path / 'tfds'),
      flow_dirs={'train': out},
      splits=['train'],
      check_counts=False,
  )
  assert counts == {'train': 6}


def test_never_mixes_estimators(tiny_world, estimator, raft_file, tmp_path):
  manual = os.path.join(tiny_world, 'Viper')
  out = str(tmp_path / 'flows')
  info = generate.estimator_info(estimator, (144, 256))
  generate.claim_folder(out, info)
  other = estimate.RaftEstimator(
      raft_file, iterations=3, devices=jax.local_devices()[:1]
  )
  with pytest.raises(
      generate.FlowError, match=r'another estimator .*iterations=2, now 3'
  ):
    generate.run(
        'viper', manual, ['train'], {'train': out}, other, hw=(144, 256)
    )
  # The released (FlowNet2) flows: files without a marker.
  world_flows = os.path.join(tiny_world, 'estimated_optical_flow_viper_train')
  with pytest.raises(generate.FlowError, match='no flow_estimator.json'):
    generate.claim_folder(world_flows, info)


def test_full_disk_keeps_what_is_written(
    tiny_world, estimator, tmp_path, monkeypatch
):
  manual = os.path.join(tiny_world, 'Viper')
  out = str(tmp_path / 'flows')
  real, calls = paths.write_atomic, []

  def fill_up(path, data):
    calls.append(path)
    if len(calls) == 3:
      raise OSError(errno.ENOSPC, 'No space left on device')
    real(path, data)

  monkeypatch.setattr(generate.paths, 'write_atomic', fill_up)
  with pytest.raises(generate.FlowError, match=r'disk is full.*The 1 flows'):
    generate.run(
        'viper',
        manual,
        ['train'],
        {'train': out},
        estimator,
        hw=(144, 256),
        batch_size=4,
    )
  # The marker and the first flow are there, whole; nothing partial.
  assert len(_names(out)) == 1 and not glob.glob(os.path.join(out, '.*'))
  monkeypatch.setattr(generate.paths, 'write_atomic', real)
  stats = generate.run(
      'viper',
      manual,
      ['train'],
      {'train': out},
      estimator,
      hw=(144, 256),
      batch_size=4,
  )['train']
  assert (stats['skipped'], stats['written']) == (1, 5)


def test_bad_input_names_the_file(tiny_world, estimator, tmp_path):
  root = tmp_path / 'Viper'
  src = os.path.join(tiny_world, 'Viper')
  for path in glob.glob(os.path.join(src, 'train', '*', '*', '*')):
    dst = root / os.path.relpath(path, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(open(path, 'rb').read())
  frames = sorted(glob.glob(str(root / 'train' / 'img' / '*' / '*.jpg')))
  # Frame t-1 of the first sample in another size.
  from PIL import Image  # pylint: disable=g-import-not-at-top

  job = generate.list_jobs('viper', str(root), 'train', str(tmp_path / 'f'))[0]
  Image.open(job.frame_s).resize((64, 32)).save(job.frame_s)
  with pytest.raises(generate.FlowError, match=os.path.basename(job.frame_s)):
    generate.run(
        'viper',
        str(root),
        ['train'],
        {'train': str(tmp_path / 'f')},
        estimator,
        hw=(144, 256),
    )
  # A truncated frame (the resized one put back).
  original = os.path.join(src, os.path.relpath(job.frame_s, str(root)))
  with open(job.frame_s, 'wb') as f:
    f.write(open(original, 'rb').read())
  with open(frames[-1], 'r+b') as f:
    f.truncate(50)
  with pytest.raises(errors.UserError, match=os.path.basename(frames[-1])):
    generate.run(
        'viper',
        str(root),
        ['train'],
        {'train': str(tmp_path / 'g')},
        estimator,
        hw=(144, 256),
    )
  with pytest.raises(generate.FlowError, match='not a folder'):
    generate.default_splits_and_dirs('viper', str(tmp_path / 'none'), None, {})
  with pytest.raises(generate.FlowError, match='another aspect ratio'):
    generate.run(
        'viper',
        os.path.join(tiny_world, 'Viper'),
        ['train'],
        {'train': str(tmp_path / 'k')},
        estimator,
        hw=(144, 144),
    )
  with pytest.raises(generate.FlowError, match='multiples of 8'):
    generate.run(
        'viper',
        str(root),
        ['train'],
        {'train': str(tmp_path / 'h')},
        estimator,
        hw=(100, 200),
    )


def test_weights_of_the_wrong_variant(raft_file):
  with pytest.raises(
      flow_weights.ConversionError, match='holds raft_small weights'
  ):
    estimate.RaftEstimator(raft_file, variant='raft_large')


def test_a_missing_frame_is_named(tiny_world, tmp_path):
  """A Cityscapes-Seq sequence without its frame t-2."""
  import shutil  # pylint: disable=g-import-not-at-top

  root = str(tmp_path / 'Cityscapes')
  shutil.copytree(os.path.join(tiny_world, 'Cityscapes'), root)
  gone = sorted(
      glob.glob(
          os.path.join(
              root,
              'leftImg8bit_sequence',
              'train',
              '*',
              '*_000017_leftImg8bit.png',
          )
      )
  )[0]
  os.remove(gone)
  with pytest.raises(errors.UserError, match=os.path.basename(gone)):
    generate.list_jobs('cityscapes_seq', root, 'train', str(tmp_path / 'f'))


@pytest.mark.integration
def test_the_flow_command_then_prepare(tiny_world, raft_file, tmp_path):
  """``python -m dastc_jax.flow`` as a user runs it, then ``prepare``
  reading its output; a bad --manual_dir is one line, exit 2."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': repo}
  out = str(tmp_path / 'flows')
  run = lambda *a: subprocess.run(
      [sys.executable, '-m', 'dastc_jax.flow', *a],
      cwd=repo,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  res = run(
      '--dataset=viper',
      f'--manual_dir={tiny_world}/Viper',
      f'--weights={raft_file}',
      '--iterations=2',
      '--size=144,256',
      '--splits=train',
      f'--train_flow_dir={out}',
  )
  assert res.returncode == 0, res.stderr[-2000:]
  stats = json.loads(res.stdout.strip().splitlines()[-1])
  assert stats['estimator'] == 'raft:raft_small'
  assert stats['splits']['train']['written'] == 6 and len(_names(out)) == 6
  counts = prepare.prepare(
      'viper',
      f'{tiny_world}/Viper',
      str(tmp_path / 'tfds'),
      flow_dirs={'train': out},
      splits=['train'],
      check_counts=False,
  )
  assert counts == {'train': 6}
  bad = run(
      '--dataset=viper',
      f'--manual_dir={tmp_path}/none',
      f'--weights={raft_file}',
  )
  assert bad.returncode == 2 and 'Traceback' not in bad.stderr
  assert 'is not a folder' in bad.stderr
