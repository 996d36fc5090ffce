"""Fault injection: SIGKILL and exact resume, SIGTERM preemption, kills during
a checkpoint save, non-finite steps, undecodable records, config errors.

The runs that get SIGKILLed are ``python -m dastc_jax.main`` subprocesses
(the smoke DA-STC config on the tiny synthetic world) with this suite's JAX
setup and compilation cache, so they compute bitwise what the in-process
reference runs compute; restarts run in this process (the fault benchmark,
``benchmarks/faults.md``, restarts with the command itself).
"""

import copy
import os
import signal

import jax
import numpy as np
import pytest

from dastc_jax.benchmarks import faults
from dastc_jax.data import checked_source
from dastc_jax.data import io as io_lib
from dastc_jax.data import pipeline
from dastc_jax.runtime import checkpointing
from dastc_jax.runtime import preemption
from dastc_jax.runtime import workdir as workdir_lib
from dastc_jax import train
from tests import faults_helpers


def _run(workdir, cache_dir, devices, steps, extra=(), **kw):
  # The cache folder and XLA flags of this process (both are part of the
  # cache key), so the subprocess loads the steps compiled here.
  r = faults.run(
      workdir,
      cache_dir,
      devices,
      steps,
      extra,
      jax_cache=jax.config.jax_compilation_cache_dir,
      xla_flags=os.environ['XLA_FLAGS'],
      **kw,
  )
  return r['rc'], r['log']


_committed = faults.committed


def _state(workdir, step):
  return faults.final_state(workdir, step)


def _assert_bitwise(a, b):
  assert not faults.bitwise_diff(a, b)


def _reference(config, devices, steps, workdir):
  """The uninterrupted run, in this process (same compiled steps as the
  subprocesses: same flags, same compilation cache)."""
  config.train.num_steps = steps
  config.mesh.data = devices
  config.eval.splits = ()
  train.train_and_evaluate(config, workdir)
  return _state(workdir, steps)


_DEVICES, _STEPS = 4, 3


@pytest.fixture(scope='module')
def reference_run(world_cache, tmp_path_factory):
  """The uninterrupted 4-device run every fault run must end equal to."""
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top

  c = synthetic_config.get_config('smoke')
  c.data.synthetic.cache_dir = world_cache
  workdir = str(tmp_path_factory.mktemp('reference') / 'ref')
  state, it = _reference(c, _DEVICES, _STEPS, workdir)
  return c, workdir, state, it


@pytest.mark.integration
@pytest.mark.xdist_group('smoke_dastc_4dev')  # one worker, one reference
@pytest.mark.parametrize('delay', [0.0, 0.02])
def test_sigkill_during_a_save_then_rerun_is_bitwise_uninterrupted(
    delay, reference_run, world_cache, tmp_path
):
  """SIGKILL while a checkpoint after the first is being written (its
  temporary folder exists), ``delay`` seconds into the save; 4 devices, so
  the save writes sharded arrays."""
  c, ref, a, it_a = reference_run
  c = copy.deepcopy(c)
  run = str(tmp_path / 'killed')
  rc, out = _run(
      run,
      world_cache,
      _DEVICES,
      _STEPS,
      delay=delay,
      until=lambda w: faults.committed(w) and faults.saving(w),
  )
  assert rc == -signal.SIGKILL, out[-3000:]
  assert faults.committed(run) and max(faults.committed(run)) < _STEPS
  # No step folder looks committed without restoring completely.
  assert not faults.unrestorable(run)
  # The restart (in this process, to reuse its compiled steps; the fault
  # benchmark restarts with the command itself).
  train.train_and_evaluate(c, run)
  b, it_b = _state(run, _STEPS)
  # Parameters, optimizer, BN averages, EMA teacher, carried fusion state,
  # RNG and step; and the data-iterator position.
  assert {'params', 'opt_state', 'teacher', 'carried', 'rng'} <= set(a)
  _assert_bitwise(a, b)
  assert it_a == it_b
  if delay:
    _resumed_iterator_and_carried_clips(c, ref)


def _resumed_iterator_and_carried_clips(c, ref):
  """Restoring step 2 puts the data iterator where an uninterrupted one is
  after 2 batches, and restores the clips step 2 carries to step 3."""
  root = train.resolve_data_root(c)
  make = lambda: iter(
      pipeline.make_train_dataset(c, root, local_batch_size=c.train.batch_size)
  )
  it = make()
  batches = [next(it) for _ in range(3)]
  resumed = make()
  ckpt = checkpointing.Checkpointer(
      os.path.join(ref, 'checkpoints'), async_save=False, read_only=True
  )
  from dastc_jax.runtime import state as state_lib  # pylint: disable=g-import-not-at-top

  state2 = ckpt.restore(
      2,
      state_lib.abstract_train_state(c, state_lib.carried_sizes(c, root)),
      resumed,
  )
  ckpt.close()
  _assert_bitwise(batches[2], next(resumed))
  # Step 2 was a DA-STC step: the clips it carries to step 3 were saved.
  assert bool(state2.carried['has_prev'])
  np.testing.assert_array_equal(
      np.asarray(state2.carried['src_frames']), batches[1]['source']['frames']
  )
  np.testing.assert_array_equal(
      np.asarray(state2.carried['tgt_frames']),
      batches[1]['target']['frames'][:, :2],
  )


def test_a_preempted_run_exits_75():
  # What main.py does around training (the SIGTERM itself:
  # tests/test_loop.py).
  def preempted():
    raise preemption.Preempted(7, '/tmp/x')

  with pytest.raises(SystemExit) as e:
    preemption.exit_if_preempted(preempted)
  assert e.value.code == preemption.EXIT_PREEMPTED == 75
  assert preemption.exit_if_preempted(lambda: 3) == 3


# ------------------------------------------------------------- in-process
def _poisoned(monkeypatch, bad_calls):
  faults_helpers.poison_batches(monkeypatch, lambda n: n in bad_calls)


def _restore(config, workdir, step):
  from dastc_jax.runtime import state as state_lib  # pylint: disable=g-import-not-at-top

  _, abstract, _ = state_lib.create_train_state(config, abstract=True)
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), async_save=False, read_only=True
  )
  try:
    return ckpt.restore(step, abstract)
  finally:
    ckpt.close()


def test_skip_policy_leaves_the_state_unchanged(
    smoke_config, tmp_path, monkeypatch, caplog
):
  c = smoke_config
  c.method = 'source_only'
  c.train.num_steps = 4
  c.train.nonfinite = 'skip'
  c.eval.splits = ()
  _poisoned(monkeypatch, {3})  # the third batch has a NaN flow
  workdir = str(tmp_path / 'skip')
  train.train_and_evaluate(c, workdir)
  s2, s3, s4 = (_restore(c, workdir, k) for k in (2, 3, 4))
  assert int(s3.step) == 3
  _assert_bitwise(s2.params, s3.params)
  _assert_bitwise(s2.opt_state, s3.opt_state)
  _assert_bitwise(s2.batch_stats, s3.batch_stats)
  assert not np.array_equal(
      np.asarray(s3.params['sf_layer']['kernel']),
      np.asarray(s4.params['sf_layer']['kernel']),
  )
  assert all(
      np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(s4.params)
  )
  assert any(
      'Step 3 skipped' in r.message and 'loss_src_main=nan' in r.message
      for r in caplog.records
  )
  # Too many skips in a row stop the run: tests/test_loop.py.


class _Flaky:
  """A record source whose record ``bad`` cannot be decoded."""

  def __init__(self, n, bad):
    self.n, self.bad = n, bad

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i == self.bad:
      raise ValueError('Invalid JPEG data')
    return {'x': i}


def test_undecodable_record_policy():
  ids = [{'id': f'rec{i}'.encode()} for i in range(4)]
  fail = checked_source.CheckedSource(
      _Flaky(4, 2),
      name='dastc_viper/train',
      data_dir='/data/tfds',
      id_source=ids,
  )
  assert fail[1] == {'x': 1}
  with pytest.raises(
      io_lib.DataError,
      match=r"Record 2 \(id 'rec2'\) of "
      r'dastc_viper/train in /data/tfds cannot be decoded.*'
      'Invalid JPEG',
  ):
    fail[2]  # pylint: disable=pointless-statement
  skip = checked_source.CheckedSource(
      _Flaky(4, 2), name='v', data_dir='d', policy='skip', id_source=ids
  )
  assert skip[2] == {'x': 3, 'bad_records': 1}  # the next record, counted
  assert skip[1] == {'x': 1, 'bad_records': 0}
  # Random access stays exact (what checkpointed iterators need): a fresh
  # source gives the same replacement and count for the same index.
  again = checked_source.CheckedSource(
      _Flaky(4, 2), name='v', data_dir='d', policy='skip', id_source=ids
  )
  assert again[2] == {'x': 3, 'bad_records': 1}
  # A bad last record is replaced by the first one (wrapping around).
  last = checked_source.CheckedSource(
      _Flaky(4, 3), name='v', data_dir='d', policy='skip', id_source=ids
  )
  assert last[3] == {'x': 0, 'bad_records': 1}


def test_skip_policy_counts_bad_records_in_a_run(
    smoke_config, tmp_path, monkeypatch
):
  c = smoke_config
  c.method = 'source_only'
  c.train.num_steps = 2
  c.data.on_error = 'skip'
  c.eval.splits = ()
  real = checked_source.CheckedSource.__getitem__

  def flaky(self, index):  # every source record passed over one bad one
    if self._name == 'viper/train':  # pylint: disable=protected-access
      return {**real(self, index), 'bad_records': 1}
    return real(self, index)

  monkeypatch.setattr(checked_source.CheckedSource, '__getitem__', flaky)
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  total = workdir_lib.read_scalars(
      str(tmp_path / 'run'), 'data/bad_records_total'
  )
  # A running total over the consumed batches only (the prefetched records
  # beyond them are not counted): one per source example.
  b = c.train.batch_size
  assert total and total[-1] == (2, 2.0 * b)
  assert all(value == step * b for step, value in total)


def test_resume_on_another_device_count(smoke_config, tmp_path):
  c = smoke_config
  c.method = 'source_only'
  c.train.num_steps = 2
  c.eval.splits = ()
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)  # 4 devices
  c.mesh.data = 2
  c.train.num_steps = 3
  # A speed-only model key may change on resume (the other model.* keys
  # are refused: tests/test_train.py).
  c.model.conv_kernel_grad = 'conv'
  train.train_and_evaluate(c, workdir)  # resumes from step 2 on 2 devices
  state = _restore(c, workdir, 3)
  assert int(state.step) == 3
  assert all(
      np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params)
  )


def _corrupted_copy(tiny_data, tmp_path):
  """A copy of the prepared data whose VIPER train shard has 64 bytes
  inverted at 30% of its length: inside a record in the middle (the
  ArrayRecord chunk checksums catch it when that record is read)."""
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top

  data = str(tmp_path / 'tfds')
  shutil.copytree(tiny_data, data)
  (shard,) = glob.glob(
      os.path.join(data, 'dastc_viper', '*', 'dastc_viper-train.array_record*')
  )
  offset = int(0.3 * os.path.getsize(shard))
  with open(shard, 'r+b') as f:
    f.seek(offset)
    raw = f.read(64)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in raw))
  return data, shard


def test_byte_corrupted_shard_names_the_shard_or_is_skipped_exactly(
    smoke_config, tiny_data, tmp_path
):
  """A prepared shard corrupted on disk: ``on_error='fail'`` stops at the
  record with an error naming the record and its shard file; ``'skip'``
  trains on, counts the skipped record, and a run resumed from its
  checkpoint continues bitwise like an uninterrupted one."""
  data, shard = _corrupted_copy(tiny_data, tmp_path)
  c = smoke_config
  c.method = 'source_only'
  c.data.synthetic.enabled = False
  c.data.data_dir = data
  c.eval.splits = ()
  _, source = pipeline.data_source(c.data.source, data)
  bad = None
  for i in range(len(source)):
    try:
      source[i]
    except io_lib.DataError as e:
      bad = i
      assert f'of shard {shard}' in str(e) and f'Record {i} ' in str(e)
      assert 'Corrupted Riegeli' in str(e)
      break
  assert bad is not None and 0 < bad < len(source) - 1
  c.data.on_error = 'skip'
  c.train.num_steps = 4
  c.train.checkpoint_every = 2
  ref = str(tmp_path / 'ref')
  train.train_and_evaluate(c, ref)
  total = workdir_lib.read_scalars(ref, 'data/bad_records_total')
  # Every pass over the 6 source records meets the bad one once.
  assert total and total[-1][1] >= 1
  # Stop after step 2, then resume to step 4.
  c2 = copy.deepcopy(c)
  c2.train.num_steps = 2
  run = str(tmp_path / 'resumed')
  train.train_and_evaluate(c2, run)
  train.train_and_evaluate(c, run)
  _assert_bitwise(_restore(c, ref, 4).params, _restore(c, run, 4).params)
