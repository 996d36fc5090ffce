"""Evaluation jobs: every checkpoint of a folder, last vs best, watch mode,
and clear errors on corrupt or mismatched checkpoints."""

import copy
import glob
import json
import os
import shutil

import pytest

from dastc_jax.evaluation import eval_job
from dastc_jax.runtime import checkpointing
from dastc_jax import train


@pytest.fixture(scope='module')
def _trained(world_cache, tmp_path_factory):
  """One source-only run with checkpoints 1, 2, 3 (shared by this module)."""
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top

  c = synthetic_config.get_config('smoke')
  c.data.synthetic.cache_dir = world_cache
  c.mesh.data = 4
  c.method = 'source_only'
  c.train.num_steps = 3
  c.train.checkpoint_every = 1
  c.eval.splits = ('target_val',)
  c.eval.num_overlays = 0
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  train.train_and_evaluate(c, workdir)
  return c, workdir


@pytest.fixture
def three_checkpoints(_trained):
  c, workdir = _trained
  return copy.deepcopy(c), workdir


def test_folder_of_checkpoints_last_and_best(three_checkpoints, tmp_path):
  c, workdir = three_checkpoints
  out = str(tmp_path / 'eval')
  summary = eval_job.run(c, out, workdir)
  s = summary['splits']['target_val']
  assert sorted(int(k) for k in s['steps']) == [1, 2, 3]
  assert s['last']['step'] == 3
  best = max(s['steps'].values(), key=lambda v: v['target_val'])
  assert s['best_on_val']['miou'] == best['target_val']
  assert s['best_on_val']['miou'] >= s['last']['miou']
  for step in (1, 2, 3):
    with open(os.path.join(out, 'eval', f'step_{step}', 'results.json')) as f:
      assert json.load(f)['step'] == step
  md = open(os.path.join(out, 'eval', 'summary.md')).read()
  assert 'target_val, last checkpoint** (step 3)' in md
  assert 'best on val (oracle selection over 3 checkpoints' in md
  assert glob.glob(os.path.join(out, 'eval', 'events.out.tfevents.*'))
  # The last-step numbers equal the training run's own final evaluation.
  with open(os.path.join(workdir, 'eval', 'step_3', 'results.json')) as f:
    final = json.load(f)['splits']['target_val']['miou']
  assert abs(s['last']['miou'] - final) < 0.01
  # A rerun reuses the tables instead of recomputing them.
  path = os.path.join(out, 'eval', 'step_2', 'results.json')
  before = os.path.getmtime(path)
  again = eval_job.run(c, out, workdir)
  assert os.path.getmtime(path) == before
  assert again['splits'] == summary['splits']


def test_watch_evaluates_new_checkpoints_until_the_last_step(
    three_checkpoints, tmp_path
):
  c, workdir = three_checkpoints
  src = os.path.join(workdir, 'checkpoints')
  root = str(tmp_path / 'live' / 'checkpoints')
  os.makedirs(root)
  shutil.copytree(os.path.join(src, '1'), os.path.join(root, '1'))
  pending = ['2', '3']
  polls = []

  def sleep(_):  # a "training job" commits one checkpoint per poll
    polls.append(1)
    step = pending.pop(0)
    shutil.copytree(os.path.join(src, step), os.path.join(root, step))

  summary = eval_job.run(
      c,
      str(tmp_path / 'watch'),
      root,
      watch=True,
      watch_interval=0,
      sleep=sleep,
  )
  assert sorted(summary['splits']['target_val']['steps']) == ['1', '2', '3']
  assert len(polls) == 2  # stopped at config.train.num_steps

  # Without new checkpoints the watch gives up after the timeout.
  t = [0.0]

  def clock():
    return t[0]

  def idle(seconds):
    t[0] += seconds

  c.train.num_steps = 10
  summary = eval_job.run(
      c,
      str(tmp_path / 'watch2'),
      root,
      watch=True,
      watch_interval=30,
      watch_timeout=100,
      clock=clock,
      sleep=idle,
  )
  assert len(summary['splits']['target_val']['steps']) == 3
  assert t[0] > 100


def test_corrupt_and_mismatched_checkpoints(three_checkpoints, tmp_path):
  c, workdir = three_checkpoints
  bad = str(tmp_path / 'bad' / 'checkpoints')
  shutil.copytree(os.path.join(workdir, 'checkpoints'), bad)
  data = [
      f
      for f in glob.glob(
          os.path.join(bad, '2', 'state', '**', '*'), recursive=True
      )
      if os.path.isfile(f) and os.path.getsize(f) > 1000
  ]
  assert data
  for f in data:  # truncate every array file of step 2
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 3)
  out = str(tmp_path / 'out')
  with pytest.raises(checkpointing.CheckpointError, match=f'{bad}/2'):
    eval_job.run(c, out, os.path.join(bad, '2'))
  assert not os.path.exists(os.path.join(out, 'eval', 'step_2', 'results.json'))
  # Another architecture or class count: the mismatched keys are named.
  c.model.width = 16
  with pytest.raises(
      checkpointing.CheckpointError,
      match=r'checkpoints/3 do not fit.*shape mismatches '
      r'\(aux_head/branches/0/kernel: \(3, 3, 128, 15\) vs',
  ):
    eval_job.evaluate_checkpoint(c, out, workdir)
