"""Where the test suite's time goes: a pytest plugin and its report.

    python -m pytest -q -p tests.suite_profile   # records, one file per worker
    python -m tests.suite_profile                # prints the summary

For every test it records the wall time, the CPU time of the test process
and of its subprocesses (``resource.getrusage``), and JAX's own compile
events (``jax.monitoring``): seconds spent tracing to a jaxpr, lowering to
StableHLO and compiling with XLA (per jitted function), and persistent
compilation-cache hits and misses. Files go to ``$DASTC_SUITE_PROFILE``
(default ``.suite_profile/`` in the working directory). Used for
``benchmarks/test_suite.md``; not loaded unless asked for.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import resource
import sys
import time

import pytest

_DIR_ENV = 'DASTC_SUITE_PROFILE'
_COMPILE = '/jax/core/compile/backend_compile_duration'
_TRACE = '/jax/core/compile/jaxpr_trace_duration'
_LOWER = '/jax/core/compile/jaxpr_to_mlir_module_duration'
_SAVED = '/jax/compilation_cache/compile_time_saved_sec'
_HIT = '/jax/compilation_cache/cache_hits'
_MISS = '/jax/compilation_cache/cache_misses'


_KEY = pytest.StashKey['_Recorder']()


def _out_dir() -> str:
  return os.environ.get(_DIR_ENV, '.suite_profile')


class _Recorder:
  """Accumulates JAX's events; one row per test."""

  def __init__(self):
    self.seconds = collections.Counter()
    self.counts = collections.Counter()
    self.by_function = collections.Counter()
    self.rows = []

  def on_duration(self, event: str, duration: float, **kwargs) -> None:
    self.seconds[event] += duration
    if event == _COMPILE:
      self.by_function[kwargs.get('fun_name', '?')] += duration

  def on_event(self, event: str, **kwargs) -> None:
    del kwargs
    self.counts[event] += 1


def _cpu() -> tuple[float, float]:
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return (own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime)


def pytest_configure(config):
  if 'PYTEST_XDIST_WORKER' not in os.environ:  # the run's first process
    for stale in glob.glob(os.path.join(_out_dir(), '*.json')):
      os.remove(stale)  # an earlier run's workers
  import jax.monitoring  # pylint: disable=g-import-not-at-top

  recorder = _Recorder()
  jax.monitoring.register_event_duration_secs_listener(recorder.on_duration)
  jax.monitoring.register_event_listener(recorder.on_event)
  config.stash[_KEY] = recorder


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  rec = item.config.stash[_KEY]
  own0, child0 = _cpu()
  t0 = time.time()
  sec0, cnt0, fn0 = (dict(rec.seconds), dict(rec.counts), dict(rec.by_function))
  yield
  own1, child1 = _cpu()
  delta = lambda new, old, k: new[k] - old.get(k, 0)
  rec.rows.append(
      dict(
          test=item.nodeid,
          wall=time.time() - t0,
          cpu=own1 - own0,
          child_cpu=child1 - child0,
          compile=delta(rec.seconds, sec0, _COMPILE),
          trace=delta(rec.seconds, sec0, _TRACE),
          lower=delta(rec.seconds, sec0, _LOWER),
          saved=delta(rec.seconds, sec0, _SAVED),
          hits=delta(rec.counts, cnt0, _HIT),
          misses=delta(rec.counts, cnt0, _MISS),
          functions={
              k: round(delta(rec.by_function, fn0, k), 2)
              for k in rec.by_function
              if delta(rec.by_function, fn0, k) > 0.5
          },
      )
  )


def pytest_unconfigure(config):
  rec = config.stash.get(_KEY, None)
  if rec is None:
    return
  worker = os.environ.get('PYTEST_XDIST_WORKER', 'main')
  os.makedirs(_out_dir(), exist_ok=True)
  with open(os.path.join(_out_dir(), f'{worker}.json'), 'w') as f:
    json.dump(rec.rows, f)


def summary(folder: str, top: int = 25) -> str:
  """The report: totals, per-worker load, the costliest tests and
  compiled functions."""
  rows = []
  for path in sorted(glob.glob(os.path.join(folder, '*.json'))):
    worker = os.path.basename(path)[: -len('.json')]
    with open(path) as f:
      rows += [dict(r, worker=worker) for r in json.load(f)]
  if not rows:
    return f'No profile in {folder}/ (run pytest with -p tests.suite_profile).'
  total = lambda k: sum(r[k] for r in rows)
  lines = [
      f'{len(rows)} tests. CPU: test processes {total("cpu"):.0f} s, '
      f'their subprocesses {total("child_cpu"):.0f} s.',
      f'In the test processes: XLA compile {total("compile"):.0f} s, '
      f'tracing {total("trace"):.0f} s, lowering {total("lower"):.0f} s; '
      f'persistent cache {total("hits")} hits (saved '
      f'{total("saved"):.0f} s), {total("misses")} misses.',
  ]
  for worker in sorted({r['worker'] for r in rows}):
    mine = [r for r in rows if r['worker'] == worker]
    lines.append(
        f'  worker {worker}: {len(mine)} tests, '
        f'{sum(r["wall"] for r in mine):.0f} s of test wall time'
    )
  lines.append(f'\nCostliest {top} tests (CPU s = own + subprocesses):')
  lines.append('   cpu  child  compile  trace  miss  hit  test')
  for r in sorted(rows, key=lambda r: -(r['cpu'] + r['child_cpu']))[:top]:
    lines.append(
        f'{r["cpu"]:6.0f} {r["child_cpu"]:6.0f} {r["compile"]:8.0f} '
        f'{r["trace"]:6.0f} {r["misses"]:5d} {r["hits"]:4d}  '
        f'{r["test"]}'
    )
  by_fn = collections.Counter()
  for r in rows:
    by_fn.update(r['functions'])
  lines.append('\nXLA compile seconds by jitted function (over 0.5 s each):')
  lines += [f'{v:8.0f}  {k}' for k, v in by_fn.most_common(10)]
  return '\n'.join(lines)


if __name__ == '__main__':
  print(summary(sys.argv[1] if len(sys.argv) > 1 else _out_dir()))
