"""Errors a user can fix end in one line on stderr, without a traceback."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run([sys.executable, '-m', 'dastc_jax.main', *args],
                        capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=300)


@pytest.mark.parametrize('override,expected', [
    (('--config.data.synthetic.enabled=False',
      '--config.data.data_dir={tmp}/nothing_here'),
     'is not prepared in'),
    (('--config.dastc.feature_layer=layer9',), 'config.dastc.feature_layer'),
])
@pytest.mark.integration
def test_user_errors_print_one_line_and_exit_2(tmp_path, override, expected):
  args = [a.format(tmp=tmp_path) for a in override]
  r = _main('--config=configs/synthetic.py:smoke',
            f'--workdir={tmp_path / "run"}', *args)
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  last = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
  assert last and expected in r.stderr, r.stderr[-2000:]
