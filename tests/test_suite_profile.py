"""The suite profiler's report (tests/suite_profile.py)."""

import json

from tests import suite_profile


def _row(test, cpu, child, compile_s, misses, functions):
  return dict(
      test=test,
      wall=cpu + 1,
      cpu=cpu,
      child_cpu=child,
      compile=compile_s,
      trace=1.0,
      lower=0.5,
      saved=0.0,
      hits=1,
      misses=misses,
      functions=functions,
  )


def test_summary_adds_workers_and_orders_tests_by_cpu(tmp_path):
  with open(tmp_path / 'gw0.json', 'w') as f:
    json.dump([_row('a.py::small', 2.0, 0.0, 1.0, 0, {'jit(f)': 1.0})], f)
  with open(tmp_path / 'gw1.json', 'w') as f:
    json.dump(
        [
            _row(
                'b.py::big',
                30.0,
                12.0,
                20.0,
                2,
                {'jit(run)': 18.0, 'jit(f)': 2.0},
            )
        ],
        f,
    )
  text = suite_profile.summary(str(tmp_path), top=5)
  assert text.startswith(
      '2 tests. CPU: test processes 32 s, their ' 'subprocesses 12 s.'
  )
  assert 'XLA compile 21 s, tracing 2 s, lowering 1 s' in text
  assert '2 hits (saved 0 s), 2 misses' in text
  assert 'worker gw0: 1 tests, 3 s' in text
  assert 'worker gw1: 1 tests, 31 s' in text
  assert text.index('b.py::big') < text.index('a.py::small')
  assert text.splitlines()[-2:] == ['      18  jit(run)', '       3  jit(f)']


def test_summary_of_an_empty_folder_says_how_to_record(tmp_path):
  assert '-p tests.suite_profile' in suite_profile.summary(str(tmp_path))
