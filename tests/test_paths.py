"""gs://-style paths reach the filesystem layer unchanged.

There is no object store offline: ``etils.epath.testing.mock_epath``
replaces epath's non-local backend by functions that record every path
they are called with and serve it from a local folder. So these tests show
that workdirs, checkpoint roots, eval outputs and data dirs given as
``gs://...`` go through epath as ``gs://...`` (never made local by
``os.path``); orbax and TFDS reading and writing real object stores is
their own code and is not exercised here.
"""

import json
import os
import shutil
from unittest import mock

from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing
import numpy as np
import pytest

from configs import synthetic as synthetic_config
from dastc_jax import errors
from dastc_jax import paths
from dastc_jax import train
from dastc_jax.data import labels as labels_lib
from dastc_jax.data.datasets import builders
from dastc_jax.data.datasets import prepared
from dastc_jax.evaluation import eval_job
from dastc_jax.evaluation import evaluate
from dastc_jax.evaluation import visualize
from dastc_jax.runtime import checkpointing


@pytest.fixture
def bucket(tmp_path):
  """Serves ``gs://...`` from ``tmp_path``; yields the paths seen."""
  seen = []

  def local(p):
    p = os.fspath(p)
    assert p.startswith('gs://'), p
    seen.append(p)
    return str(tmp_path / p[len('gs://'):])

  def mkdirs(_, p, *a, **k):
    os.makedirs(local(p), exist_ok=True)

  fns = dict(
      open=lambda _, p, mode='r', **k: open(local(p), mode, **k),
      exists=lambda _, p: os.path.exists(local(p)),
      isdir=lambda _, p: os.path.isdir(local(p)),
      listdir=lambda _, p: os.listdir(local(p)),
      makedirs=mkdirs, mkdir=mkdirs,
      remove=lambda _, p: os.remove(local(p)),
      rename=lambda _, a, b, **k: os.rename(local(a), local(b)),
      replace=lambda _, a, b, **k: os.replace(local(a), local(b)),
      rmtree=lambda _, p: shutil.rmtree(local(p)),
      stat=lambda _, p: os.stat(local(p)),
      glob=lambda _, p: [p],
      walk=lambda _, p, **k: os.walk(local(p)),
  )
  # With TensorFlow installed epath sends gs:// to its TF backend whatever
  # the mock says; route it to the (mocked) default backend instead.
  with mock.patch.object(gpath, '_is_tf_installed', lambda: False), \
      epath_testing.mock_epath(**fns):
    yield seen


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path,
                                                          monkeypatch):
  assert os.fspath(paths.resolve('gs://b/run')) == 'gs://b/run'
  assert os.fspath(paths.resolve('gs://b/run') / 'checkpoints') == (
      'gs://b/run/checkpoints')
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve('run')) == str(tmp_path / 'run')
  root, step = checkpointing.resolve('gs://b/run', '')
  assert (os.fspath(root), step) == ('gs://b/run/checkpoints', -1)
  root, step = checkpointing.resolve('gs://b/run', '300')
  assert (os.fspath(root), step) == ('gs://b/run/checkpoints', 300)


def test_workdir_files_on_a_bucket(bucket, tmp_path):
  c = synthetic_config.get_config('smoke')
  workdir = paths.resolve('gs://b/run')
  train._check_and_write_config(c, workdir)  # pylint: disable=protected-access
  assert 'gs://b/run/config.json' in bucket
  saved = json.loads((tmp_path / 'b/run/config.json').read_text())
  assert saved['model']['width'] == c.model.width
  c.model.width += 1  # resuming with another model is refused, by path
  with pytest.raises(errors.ConfigError, match='gs://b/run holds a run'):
    train._check_and_write_config(c, workdir)  # pylint: disable=protected-access
  # A checkpoint step folder on the bucket.
  (tmp_path / 'b/run/checkpoints/900/state').mkdir(parents=True)
  root, step = checkpointing.resolve('.', 'gs://b/run/checkpoints/900')
  assert (os.fspath(root), step) == ('gs://b/run/checkpoints', 900)
  root, step = checkpointing.resolve('.', 'gs://b/run')
  assert (os.fspath(root), step) == ('gs://b/run/checkpoints', -1)


def test_eval_outputs_on_a_bucket(bucket, tmp_path):
  cs = labels_lib.get_class_set('viper15')
  cm = np.eye(15, dtype=np.int64) * 10
  result = evaluate.SplitResult('target_val', cm, 1, cs)
  evaluate.write_results('gs://b/run/eval/step_5', [result], 5)
  assert 'gs://b/run/eval/step_5/results.json' in bucket
  per_step = eval_job.evaluated_steps('gs://b/run', ['target_val'])
  assert per_step == {5: {'target_val': 100.0}}
  eval_job.write_summary('gs://b/run', {5: {'target_val': 100.0}},
                         'gs://b/run/checkpoints')
  summary = json.loads((tmp_path / 'b/run/eval/summary.json').read_text())
  assert summary['checkpoints'] == 'gs://b/run/checkpoints'
  visualize.save_png('gs://b/run/eval/x.png', np.zeros((2, 3, 3), np.uint8))
  assert (tmp_path / 'b/run/eval/x.png').stat().st_size > 0


def test_data_dir_on_a_bucket(bucket):
  spec = builders.SPECS['viper']
  assert not prepared.is_prepared('gs://b/tfds', spec, 'train')
  assert any(p.startswith('gs://b/tfds/') for p in bucket)
  assert isinstance(paths.resolve('gs://b/tfds'), epath.Path)
