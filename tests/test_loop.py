"""The train loop's bookkeeping on a tiny stand-in model (seconds, no data
world): log windows and their means, checkpoint and eval cadence, the phase
switch, skipped steps, bad-record counts and preemption."""

import contextlib
import dataclasses
import os
import signal

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from dastc_jax import train
from dastc_jax.runtime import checkpointing
from dastc_jax.runtime import preemption
from dastc_jax.runtime import sharding as sharding_lib


class _Writer:
  """Records what the loop writes."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)


class _Report:
  """The parts of clu's ReportProgress the loop calls."""

  def __call__(self, step):
    del step

  def timed(self, name, wait_jax_async_dispatch=True):
    del name, wait_jax_async_dispatch
    return contextlib.nullcontext()


@dataclasses.dataclass
class _FakeRun(train._Run):  # pylint: disable=protected-access
  evaluated: list = dataclasses.field(default_factory=list)

  def evaluate(self, state, step, num_overlays):
    self.evaluated.append(step)
    return []


def _batches(bad_every=0):
  """Batch i holds the value i (and one bad record every ``bad_every``)."""

  def make(i):
    out = {'source': {'x': np.full((4, 2), i, np.float32)}}
    if bad_every:
      out['source']['bad_records'] = np.full(
          (4,), (i % bad_every) == 0, np.int32
      )
    return out

  return iter(grain.MapDataset.range(1000).map(make).to_iter_dataset())


def _sigterm_at(step_fn, n):
  """``step_fn`` that sends this process a SIGTERM when step ``n`` starts
  (on the loop's thread, so the moment is deterministic)."""
  calls = {'n': 0}

  def step(state, batch):
    if calls['n'] == n:
      os.kill(os.getpid(), signal.SIGTERM)
    calls['n'] += 1
    return step_fn(state, batch)

  return step


def _step(tag, nan_at=()):
  """A tiny model: ``w += mean(x)``; loss = mean(x); ``tag`` names the
  phase; at steps in ``nan_at`` the loss is NaN and the step is skipped."""

  def step(state, batch):
    x = jnp.mean(batch['source']['x'])
    bad = jnp.isin(state['step'], jnp.asarray(nan_at or (-1,)))
    new = {
        'step': state['step'] + 1,
        'w': jnp.where(bad, state['w'], state['w'] + x),
    }
    metrics = {
        'loss': jnp.where(bad, jnp.nan, x),
        'grad_norm': jnp.float32(1.0),
        'skipped': bad.astype(jnp.float32),
        f'phase_{tag}': jnp.float32(1.0),
    }
    return new, metrics

  return jax.jit(step, donate_argnums=(0,))


def _run(tmp_path, config, steps, it=None):
  mesh = jax.make_mesh((1,), ('data',), devices=jax.devices()[:1])
  ckpt = checkpointing.Checkpointer(
      tmp_path / 'checkpoints', max_to_keep=100, async_save=False
  )
  return _FakeRun(
      config,
      tmp_path,
      '',
      it or _batches(),
      steps,
      None,
      sharding_lib.data_sharding(mesh),
      ckpt,
      _Writer(),
      _Report(),
  )


def _config(**train_kw):
  c = synthetic.get_config('smoke')
  c.method = 'source_only'
  c.train.update(
      num_steps=7,
      log_every=3,
      checkpoint_every=2,
      eval_every=0,
      source_only_steps=0,
  )
  c.train.update(train_kw)
  return c


def _state():
  return {'step': jnp.int32(0), 'w': jnp.float32(0.0)}


def test_log_windows_checkpoints_and_evals(tmp_path):
  c = _config(eval_every=4)
  run = _run(tmp_path, c, [(0, _step('a'))])
  state = train._train_loop(run, _state(), 0)  # pylint: disable=protected-access
  run.ckpt.close()
  assert int(state['step']) == 7 and float(state['w']) == sum(range(7))
  # Logs at every 3rd step and the last; each is the mean of its window.
  tag = 'loss/source_only'  # each phase's loss under its own tag
  assert sorted(s for s, v in run.writer.scalars.items() if tag in v) == [
      3,
      6,
      7,
  ]
  assert [run.writer.scalars[s][tag] for s in (3, 6, 7)] == [1.0, 4.0, 6.0]
  assert run.writer.scalars[7]['skipped_total'] == 0
  # Checkpoints at every 2nd step and the last; periodic evals (not at the
  # end: the final evaluation is train_and_evaluate's).
  assert run.ckpt.all_steps() == [2, 4, 6, 7]
  assert run.evaluated == [4]


def test_phase_switch_and_resume_position(tmp_path):
  c = _config()
  c.method, c.train.source_only_steps = 'dastc', 3
  run = _run(tmp_path, c, [(0, _step('warm')), (3, _step('adapt'))])
  train._train_loop(run, _state(), 0)  # pylint: disable=protected-access
  run.ckpt.close()
  log = run.writer.scalars
  assert log[3]['phase_warm'] == 1 and 'phase_adapt' not in log[3]
  assert log[6]['phase_adapt'] == 1 and 'phase_warm' not in log[6]
  assert 'loss/warm_start' in log[3] and 'loss/dastc' not in log[3]
  assert 'loss/dastc' in log[6] and 'loss' not in log[6]
  # Resuming at a checkpoint continues with the saved iterator position.
  it = _batches()
  ckpt = checkpointing.Checkpointer(
      tmp_path / 'checkpoints', async_save=False, read_only=True
  )
  state = ckpt.restore(4, jax.eval_shape(_state), it)
  ckpt.close()
  assert float(state['w']) == 0 + 1 + 2 + 3
  assert float(next(it)['source']['x'][0, 0]) == 4


def test_skipped_steps_leave_the_means_finite_and_are_counted(tmp_path):
  c = _config(nonfinite='skip', log_every=7)
  run = _run(tmp_path, c, [(0, _step('a', nan_at=(2, 3)))])
  state = train._train_loop(run, _state(), 0)  # pylint: disable=protected-access
  run.ckpt.close()
  assert float(state['w']) == 0 + 1 + 4 + 5 + 6
  s = run.writer.scalars[7]
  assert s['loss/source_only'] == np.mean([0, 1, 4, 5, 6])
  assert s['skipped_total'] == 2
  # Too many skips in a row stop the run.
  c = _config(nonfinite='skip', max_consecutive_skips=1)
  run = _run(tmp_path / 'limit', c, [(0, _step('a', nan_at=(1, 2, 3)))])
  with pytest.raises(
      train.NonFiniteLossError, match='2 consecutive skipped steps'
  ):
    train._train_loop(run, _state(), 0)  # pylint: disable=protected-access
  run.ckpt.close()
  # 'stop' ends the run at the first non-finite step, before saving it.
  run = _run(tmp_path / 'stop', _config(), [(0, _step('a', nan_at=(2,)))])
  with pytest.raises(train.NonFiniteLossError, match='step 3'):
    train._train_loop(run, _state(), 0)  # pylint: disable=protected-access
  assert max(run.ckpt.all_steps()) <= 2
  run.ckpt.close()


def test_bad_records_are_counted(tmp_path):
  c = _config(log_every=7)
  c.data.on_error = 'skip'
  run = _run(tmp_path, c, [(0, _step('a'))], it=_batches(bad_every=3))
  train._train_loop(run, _state(), 0)  # pylint: disable=protected-access
  run.ckpt.close()
  # Batches 0, 3 and 6 each carry 4 bad records.
  assert run.writer.scalars[7]['data/bad_records_total'] == 12


def test_preemption_saves_the_step_and_stops(tmp_path, monkeypatch):
  monkeypatch.setattr(
      preemption.Preemption, 'reached', lambda self, step: step == 3
  )
  run = _run(tmp_path, _config(), [(0, _step('a'))])
  with pytest.raises(preemption.Preempted, match='saved checkpoint step 3'):
    train._train_loop(run, _state(), 0)  # pylint: disable=protected-access
  assert run.ckpt.all_steps() == [2, 3]
  run.ckpt.close()


def test_sigterm_saves_stops_and_resumes_exactly(tmp_path):
  """A real SIGTERM while step 2 runs: the run saves the step it is on,
  stops with ``Preempted`` (main.py exits 75), uninstalls its handler,
  and resuming from that checkpoint ends exactly like the run that was
  never interrupted."""
  c = _config(checkpoint_every=100)  # saves only at the preemption and end
  ref = _run(tmp_path / 'ref', c, [(0, _step('a'))])
  a = jax.device_get(train._train_loop(ref, _state(), 0))  # pylint: disable=protected-access
  ref.ckpt.close()
  run = _run(tmp_path / 'part', c, [(0, _sigterm_at(_step('a'), 2))])
  with pytest.raises(preemption.Preempted, match='saved checkpoint step') as e:
    train._train_loop(run, _state(), 0)  # pylint: disable=protected-access
  # Step 2 (the third) finishes, is saved as checkpoint 3, and the run
  # stops.
  assert e.value.step == 3
  assert run.ckpt.all_steps() == [3]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # uninstalled
  run.ckpt.close()
  it = _batches()
  ckpt = checkpointing.Checkpointer(
      tmp_path / 'part' / 'checkpoints', async_save=False
  )
  state = ckpt.restore(e.value.step, jax.eval_shape(_state), it)
  rerun = _run(tmp_path / 'part', c, [(0, _step('a'))], it=it)
  ckpt.close()
  b = jax.device_get(train._train_loop(rerun, state, e.value.step))  # pylint: disable=protected-access
  rerun.ckpt.close()
  chex.assert_trees_all_equal(a, b)


def test_progress_line_eta_covers_both_phases():
  """The console line: phase, loss, seconds per step without the compile,
  and an ETA that adds the later phase at the FLOPs ratio, with its
  compilation scaled the same way."""
  from dastc_jax.runtime import progress  # pylint: disable=g-import-not-at-top

  p = progress.Progress([(0, 'warm_start'), (100, 'dastc')], 200, 0)
  assert p.before_step(0, now=0.0)
  p.after_step(0, now=31.0)  # 30 s of compile + a 1 s step
  p.ratio['dastc'] = 3.0
  assert not p.before_step(1, now=31.0)
  assert p.seconds_per_step(11, now=41.0) == 1.0
  # 89 warm steps at 1 s + 100 DA-STC steps at 3 s + 3 x 30 s compile.
  assert p.eta(11, now=41.0) == 89 + 300 + 90
  line = p.line(11, 0.25, now=41.0)
  assert line.startswith('step 11/200 [warm_start] loss 0.2500  1.00 s/step')
  assert 'ETA 7m59s (with the dastc phase)' in line
  # In the last phase only its own steps are left.
  assert p.before_step(100, now=200.0)
  p.after_step(100, now=250.0)
  assert p.eta(111, now=280.0) == 89 * 3.0  # 10 steps in 30 s
  assert progress.duration(3725) == '1h02m' and progress.duration(38) == '38s'


def test_metrics_file_appends_json_lines(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import metrics_file  # pylint: disable=g-import-not-at-top

  f = metrics_file.MetricsFile(tmp_path / 'metrics.jsonl')
  f.write_scalars(3, {'loss/dastc': np.float32(0.5), 'grad_norm': 2})
  metrics_file.MetricsFile(tmp_path / 'metrics.jsonl').write_scalars(
      6, {'a': 1}
  )
  rows = [
      json.loads(row)
      for row in (tmp_path / 'metrics.jsonl').read_text().splitlines()
  ]
  assert rows == [
      {'step': 3, 'loss/dastc': 0.5, 'grad_norm': 2.0},
      {'step': 6, 'a': 1.0},
  ]
