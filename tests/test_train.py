"""End to end: train -> checkpoint -> resume -> eval, sharding, failures."""

import glob
import json
import os
import subprocess
import sys

import chex
import jax
from jax.sharding import AxisType
import numpy as np
import pytest

from dastc_jax.data import pipeline
from dastc_jax.evaluation import eval_job
from dastc_jax.runtime import checkpointing
from dastc_jax.runtime import sharding as sharding_lib
from dastc_jax.runtime import state as state_lib
from dastc_jax.runtime import steps as step_lib
from dastc_jax import train
from tests import faults_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _abstract(config):
  root = train.resolve_data_root(config)
  return state_lib.abstract_train_state(
      config, state_lib.carried_sizes(config, root)
  )


def _restore(config, workdir, step):
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), async_save=False
  )
  abstract = _abstract(config)
  state = ckpt.restore(step, abstract)
  ckpt.close()
  return state


def _assert_trees_equal(a, b):
  chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


# On the worker of the SIGKILL tests, whose reference run compiles the same
# 4-device smoke steps (tests/test_faults.py).
@pytest.mark.xdist_group('smoke_dastc_4dev')
def test_outputs_and_eval_mode(smoke_config, tmp_path):
  c = smoke_config
  workdir = str(tmp_path / 'run')
  final = train.train_and_evaluate(c, workdir)
  assert set(final) == {'source_val', 'target_val'}
  assert all(0.0 <= v <= 100.0 for v in final.values())
  with open(os.path.join(workdir, 'eval', 'step_3', 'results.json')) as f:
    res = json.load(f)
  assert res['step'] == 3
  assert set(res['splits']) == {'source_val', 'target_val'}
  tv = res['splits']['target_val']
  assert len(tv['iou']) == 15 and tv['num_images'] == 4
  np.testing.assert_allclose(tv['miou'], final['target_val'], atol=0.01)
  with open(os.path.join(workdir, 'eval', 'step_3', 'results.md')) as f:
    assert '| road |' in f.read()
  overlays = glob.glob(
      os.path.join(workdir, 'eval', 'step_3', 'overlays', '*', '*.png')
  )
  assert len(overlays) == 2 * c.eval.num_overlays
  events = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert events and os.path.getsize(events[0]) > 0
  # The overlays are TensorBoard images too; each phase's loss has its own
  # tag; the scalars are also in metrics.jsonl.
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tags = {
      v.tag
      for path in events
      for raw in tf.data.TFRecordDataset(path)
      for v in event_pb2.Event.FromString(raw.numpy()).summary.value
  }
  images = [t for t in tags if '/overlay/' in t]
  assert len(images) == 2 * c.eval.num_overlays, sorted(tags)
  assert {'loss/warm_start', 'loss/dastc'} <= tags and 'loss' not in tags
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'grad_norm' in r] == [1, 2, 3]
  # Eval mode on the latest checkpoint reproduces the final numbers.
  again = eval_job.evaluate_checkpoint(
      c, str(tmp_path / 'eval'), os.path.join(workdir, 'checkpoints')
  )
  for k, v in final.items():
    np.testing.assert_allclose(again[k], v, atol=1e-6)
  step1 = eval_job.evaluate_checkpoint(c, workdir, '1')
  assert os.path.exists(os.path.join(workdir, 'eval', 'step_1', 'results.json'))
  assert set(step1) == set(final)
  with pytest.raises(
      checkpointing.CheckpointError, match='No checkpoint ' 'step 7'
  ):
    eval_job.evaluate_checkpoint(c, workdir, '7')


def _step_on_mesh(config, state, batch, n_devices):
  mesh = jax.make_mesh(
      (n_devices,),
      ('data',),
      axis_types=(AxisType.Auto,),
      devices=jax.devices()[:n_devices],
  )
  repl = sharding_lib.replicated(mesh)
  data = sharding_lib.data_sharding(mesh)
  graphdef, _, tx = state_lib.create_train_state(config)
  fn = jax.jit(
      step_lib.make_train_step(config, graphdef, tx),
      in_shardings=(repl, data),
      out_shardings=(repl, repl),
  )
  new_state, metrics = fn(
      jax.device_put(state, repl), sharding_lib.shard_batch(batch, data)
  )
  return jax.device_get(new_state), jax.device_get(metrics)


@pytest.mark.parametrize(
    'checkpoint_every,log_every,saved',
    [
        (1, 1, [1, 2]),  # caught at the step that produced it
        (2, 10, [2]),  # caught one step later, while step 4 runs
    ],
)
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    smoke_config, tmp_path, monkeypatch, checkpoint_every, log_every, saved
):
  c = smoke_config
  c.method = 'source_only'  # the loop's behaviour; any method
  c.train.num_steps = 4
  c.train.checkpoint_every = checkpoint_every
  c.train.log_every = log_every
  c.eval.splits = ()
  # The third batch and every later one carry a NaN flow.
  faults_helpers.poison_batches(monkeypatch, lambda n: n >= 3)
  workdir = str(tmp_path / 'nan')
  with pytest.raises(
      train.NonFiniteLossError, match=r'Non-finite values at step 3: .*loss=nan'
  ) as e:
    train.train_and_evaluate(c, workdir)
  assert 'last good checkpoint is step 2' in str(e.value)
  steps = sorted(
      int(s)
      for s in os.listdir(os.path.join(workdir, 'checkpoints'))
      if s.isdigit()
  )
  assert steps == saved
  state = _restore(c, workdir, 2)
  assert all(
      np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params)
  )


@pytest.mark.integration
def test_cli_rejects_a_misspelt_override(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'dastc_jax.main',
          '--config=configs/synthetic.py:smoke',
          f'--workdir={tmp_path}',
          '--config.train.num_stepz=3',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert proc.returncode != 0
  assert 'num_stepz' in proc.stderr and 'num_steps' in proc.stderr


def test_train_step_compiles_once(smoke_config):
  c = smoke_config
  c.method = 'source_only'
  root = train.resolve_data_root(c)
  it = iter(
      pipeline.make_train_dataset(
          c, root, local_batch_size=4, with_target=False
      )
  )
  graphdef, state, tx = state_lib.create_train_state(c)
  step = chex.assert_max_traces(
      step_lib.make_train_step(c, graphdef, tx), n=1
  )  # a second trace raises
  fn = jax.jit(step, donate_argnums=(0,))
  for _ in range(3):
    state, _ = fn(state, next(it))
  assert int(state.step) == 3


def test_resuming_with_another_model_is_refused(smoke_config, tmp_path):
  c = smoke_config
  c.method = 'source_only'
  c.train.num_steps = 1
  c.eval.splits = ()
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  c.model.width = 16
  with pytest.raises(ValueError, match=r'model.width=8 \(now 16\)'):
    train.train_and_evaluate(c, workdir)


def test_eval_batch_is_rounded_to_the_device_count(smoke_config, tmp_path):
  c = smoke_config
  c.method = 'source_only'
  c.train.num_steps = 1
  c.eval.batch_size = 1  # 4 devices: each step evaluates 4 (masked) slots
  out = train.train_and_evaluate(c, str(tmp_path / 'run'))
  c.eval.batch_size = 4
  ref = eval_job.evaluate_checkpoint(
      c, str(tmp_path / 'eval'), str(tmp_path / 'run')
  )
  for k in out:
    np.testing.assert_allclose(out[k], ref[k], atol=1e-6)
  with pytest.raises(checkpointing.CheckpointError, match='does not exist'):
    eval_job.evaluate_checkpoint(
        c, str(tmp_path / 'x'), str(tmp_path / 'missing')
    )
  assert not os.path.exists(tmp_path / 'missing')


def test_config_errors_are_clear(smoke_config, tmp_path):
  c = smoke_config
  c.model.num_classes = 12
  with pytest.raises(ValueError, match='has 15 classes'):
    train.train_and_evaluate(c, str(tmp_path))
  c.model.num_classes = 15
  c.train.batch_size = 3
  with pytest.raises(ValueError, match='not divisible by the 4 devices'):
    train.train_and_evaluate(c, str(tmp_path))
