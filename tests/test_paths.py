"""gs://-style paths reach the filesystem layer unchanged.

There is no object store offline: ``etils.epath.testing.mock_epath``
replaces epath's non-local backend by functions that record every path
they are called with and serve it from a local folder. So these tests show
that workdirs, checkpoint roots, eval outputs, data dirs, weight files
(convert) and prediction inputs/outputs given as ``gs://...`` go through
epath as ``gs://...`` (never made local by ``os.path``); orbax and TFDS reading
and writing real object stores is
their own code and is not exercised here.
"""

import glob
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
from dastc_jax.runtime import workdir as workdir_lib
from dastc_jax.data import labels as labels_lib
from dastc_jax.data.datasets import builders
from dastc_jax.data.datasets import prepared
from dastc_jax.evaluation import eval_job
from dastc_jax.evaluation import evaluate
from dastc_jax.evaluation import visualize
from dastc_jax.runtime import checkpointing
from tests import test_predict


@pytest.fixture
def bucket(tmp_path):
  """Serves ``gs://...`` from ``tmp_path``; yields the paths seen."""
  seen = []

  def local(p):
    p = os.fspath(p)
    if not p.startswith('gs://'):  # local files (e.g. the jax cache)
      assert 'gs:/' not in p, f'a gs:// path was made local: {p}'
      return p
    seen.append(p)
    return str(tmp_path / p[len('gs://') :])

  def glob_fn(_, p):
    p = os.fspath(p)
    found = glob.glob(local(p))
    if not p.startswith('gs://'):
      return found
    return ['gs://' + os.path.relpath(f, tmp_path) for f in found]

  def mkdirs(_, p, *a, **k):
    os.makedirs(local(p), exist_ok=True)

  fns = dict(
      open=lambda _, p, mode='r', **k: open(local(p), mode, **k),
      exists=lambda _, p: os.path.exists(local(p)),
      isdir=lambda _, p: os.path.isdir(local(p)),
      listdir=lambda _, p: os.listdir(local(p)),
      makedirs=mkdirs,
      mkdir=mkdirs,
      remove=lambda _, p: os.remove(local(p)),
      rename=lambda _, a, b, **k: os.rename(local(a), local(b)),
      replace=lambda _, a, b, **k: os.replace(local(a), local(b)),
      rmtree=lambda _, p: shutil.rmtree(local(p)),
      stat=lambda _, p: os.stat(local(p)),
      glob=glob_fn,
      walk=lambda _, p, **k: os.walk(local(p)),
  )
  # With TensorFlow installed epath sends gs:// to its TF backend whatever
  # the mock says; route it to the (mocked) default backend instead.
  with (
      mock.patch.object(gpath, '_is_tf_installed', lambda: False),
      epath_testing.mock_epath(**fns),
  ):
    yield seen


def test_resolve_keeps_urls_and_makes_local_paths_absolute(
    tmp_path, monkeypatch
):
  assert os.fspath(paths.resolve('gs://b/run')) == 'gs://b/run'
  assert os.fspath(paths.resolve('gs://b/run') / 'checkpoints') == (
      'gs://b/run/checkpoints'
  )
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve('run')) == str(tmp_path / 'run')
  root, step = checkpointing.resolve('gs://b/run', '')
  assert (os.fspath(root), step) == ('gs://b/run/checkpoints', -1)
  root, step = checkpointing.resolve('gs://b/run', '300')
  assert (os.fspath(root), step) == ('gs://b/run/checkpoints', 300)


def test_workdir_files_on_a_bucket(bucket, tmp_path):
  c = synthetic_config.get_config('smoke')
  workdir = paths.resolve('gs://b/run')
  workdir_lib.check_and_write_config(c, workdir)
  assert 'gs://b/run/config.json' in bucket
  saved = json.loads((tmp_path / 'b/run/config.json').read_text())
  assert saved['model']['width'] == c.model.width
  c.model.width += 1  # resuming with another model is refused, by path
  with pytest.raises(errors.ConfigError, match='gs://b/run holds a run'):
    workdir_lib.check_and_write_config(c, workdir)
  c.model.width -= 1
  # Another learning rate: refused unless allowed; then both configs stay.
  c.optim.lr *= 2
  with pytest.raises(errors.ConfigError, match=r'optim\.lr=.*--allow_config'):
    workdir_lib.check_and_write_config(c, workdir)
  assert workdir_lib.check_and_write_config(c, workdir, allow_changes=True) == [
      'optim.lr'
  ]
  first = json.loads((tmp_path / 'b/run/config.json').read_text())
  second = json.loads((tmp_path / 'b/run/config.1.json').read_text())
  assert second['optim']['lr'] == 2 * first['optim']['lr']
  # A longer run (num_steps) is not a change of what is trained: allowed,
  # and kept.
  c.train.num_steps += 10
  assert workdir_lib.check_and_write_config(c, workdir) == ['train.num_steps']
  assert (tmp_path / 'b/run/config.2.json').exists()
  # A run started before pseudo_margins existed resumes with zero margins
  # (what it trained with), not with others.
  last = tmp_path / 'b/run/config.2.json'  # what a resume compares with
  cfg = json.loads(last.read_text())
  del cfg['data']['target']['pseudo_margins']
  del cfg['dastc']['mic']  # and before MIC existed: resumes with it off
  del cfg['dastc']['pl_class_balanced']  # and before CBST selection
  # ...and before rare-class sampling, cat_max_ratio and the feature
  # distance: resumes with them off.
  del cfg['dastc']['feature_distance']
  for dom in cfg['data'].values():
    if isinstance(dom, dict) and 'cat_max_ratio' in dom:
      del dom['cat_max_ratio'], dom['rare_class_sampling']
  last.write_text(json.dumps(cfg))
  # The demo recipe selects class-balanced since; a run from before that
  # resumes without it (what it trained with), not with it.
  with pytest.raises(errors.ConfigError, match=r'pl_class_balanced=None'):
    workdir_lib.check_and_write_config(c, workdir)
  c.dastc.pl_class_balanced = 0.0
  assert workdir_lib.check_and_write_config(c, workdir) == []
  c.data.target.pseudo_margins = (4, 4, 0, 0)
  with pytest.raises(errors.ConfigError, match='pseudo_margins'):
    workdir_lib.check_and_write_config(c, workdir)
  c.data.target.pseudo_margins = (0, 0, 0, 0)
  c.dastc.mic.enabled = True
  with pytest.raises(errors.ConfigError, match=r'dastc\.mic\.enabled'):
    workdir_lib.check_and_write_config(c, workdir)
  c.dastc.mic.enabled = False
  for key, on, off in (
      ('data.source.rare_class_sampling.enabled', True, False),
      ('data.source.cat_max_ratio', 0.75, 1.0),
      ('dastc.feature_distance.weight', 0.005, 0.0),
  ):
    *path, leaf = key.split('.')
    node = c
    for part in path:
      node = node[part]
    node[leaf] = on
    with pytest.raises(errors.ConfigError, match=key.replace('.', r'\.')):
      workdir_lib.check_and_write_config(c, workdir)
    node[leaf] = off
  assert workdir_lib.check_and_write_config(c, workdir) == []
  # metrics.jsonl on a bucket: rewritten (no append), both rows kept.
  from dastc_jax.runtime import metrics_file  # pylint: disable=g-import-not-at-top

  for step in (1, 2):
    metrics_file.MetricsFile(workdir / 'metrics.jsonl').write_scalars(
        step, {'loss/dastc': 0.5 * step}
    )
  rows = (tmp_path / 'b/run/metrics.jsonl').read_text().splitlines()
  assert [json.loads(r) for r in rows] == [
      {'step': 1, 'loss/dastc': 0.5},
      {'step': 2, 'loss/dastc': 1.0},
  ]
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
  eval_job.write_summary(
      'gs://b/run', {5: {'target_val': 100.0}}, 'gs://b/run/checkpoints'
  )
  summary = json.loads((tmp_path / 'b/run/eval/summary.json').read_text())
  assert summary['checkpoints'] == 'gs://b/run/checkpoints'
  visualize.save_png('gs://b/run/eval/x.png', np.zeros((2, 3, 3), np.uint8))
  assert (tmp_path / 'b/run/eval/x.png').stat().st_size > 0


def test_data_dir_on_a_bucket(bucket):
  spec = builders.SPECS['viper']
  assert not prepared.is_prepared('gs://b/tfds', spec, 'train')
  assert any(p.startswith('gs://b/tfds/') for p in bucket)
  assert isinstance(paths.resolve('gs://b/tfds'), epath.Path)


def test_local_copy_and_publish_dir_on_a_bucket(bucket, tmp_path):
  (tmp_path / 'b/in').mkdir(parents=True)
  (tmp_path / 'b/in/a.txt').write_text('A')
  (tmp_path / 'b/in/b.txt').write_text('B')
  with paths.local_copy('gs://b/in') as local:
    assert not local.startswith('gs://')
    assert sorted(os.listdir(local)) == ['a.txt', 'b.txt']
  assert not os.path.exists(local)  # the copy is removed afterwards
  with paths.local_copy('gs://b/in/a.txt') as local:
    assert open(local).read() == 'A'
  staged = paths.staging_dir('gs://b/out')
  os.makedirs(os.path.join(staged, 'sub'))
  for name in ('sub/x.txt', 'done.json', 'z.txt'):
    with open(os.path.join(staged, name), 'w') as f:
      f.write(name)
  bucket.clear()
  paths.publish_dir(staged, 'gs://b/out', last='done.json')
  writes = [
      p
      for p in bucket
      if p.startswith('gs://b/out/') and p.endswith(('.txt', '.json'))
  ]
  assert writes[-1] == 'gs://b/out/done.json'  # the completion marker last
  assert (tmp_path / 'b/out/sub/x.txt').read_text() == 'sub/x.txt'
  assert not os.path.exists(staged)


def test_convert_reads_and_writes_a_bucket(bucket, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  from tests import test_convert  # pylint: disable=g-import-not-at-top
  from dastc_jax import convert  # pylint: disable=g-import-not-at-top

  c = synthetic_config.get_config('smoke')
  (tmp_path / 'b/weights').mkdir(parents=True)
  torch.save(
      test_convert._torch_model(c.model).state_dict(),  # pylint: disable=protected-access
      tmp_path / 'b/weights/accel.pth',
  )
  report = convert.convert_file(
      'gs://b/weights/accel.pth', 'gs://b/conv', c.model
  )
  assert 'gs://b/weights/accel.pth' in bucket
  assert len(report.converted) > 50
  meta = json.loads((tmp_path / 'b/conv/conversion.json').read_text())
  assert meta['source'] == 'gs://b/weights/accel.pth'
  assert (tmp_path / 'b/conv/checkpoints/0').is_dir()
  with pytest.raises(convert.ConversionError, match='gs://b/conv exists'):
    convert.convert_file('gs://b/weights/accel.pth', 'gs://b/conv', c.model)


def test_predict_reads_and_writes_a_bucket(
    bucket, smoke_config, weights, tmp_path
):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dastc_jax.evaluation import predict  # pylint: disable=g-import-not-at-top

  (tmp_path / 'b/frames').mkdir(parents=True)
  for i, f in enumerate(test_predict._frames(3)):  # pylint: disable=protected-access
    Image.fromarray(f).save(tmp_path / f'b/frames/f{i}.png')
  res = predict.run(
      smoke_config,
      checkpoint=weights,
      workdir='.',
      input_path='gs://b/frames',
      output='gs://b/pred',
      video_format='gif',
  )
  assert res['output'] == 'gs://b/pred' and res['frames'] == 3
  assert 'gs://b/frames/f0.png' in bucket
  written = [p for p in bucket if p.startswith('gs://b/pred/')]
  assert written[-1] == 'gs://b/pred/legend.json'
  assert len(os.listdir(tmp_path / 'b/pred/overlays')) == 3
  assert (tmp_path / 'b/pred/prediction.gif').stat().st_size > 0
