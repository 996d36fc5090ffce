"""Errors a user can fix end in one line on stderr, without a traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run(
      [sys.executable, '-m', 'dastc_jax.main', *args],
      capture_output=True,
      text=True,
      cwd=REPO,
      env=env,
      timeout=300,
  )


@pytest.mark.parametrize(
    'override,expected',
    [
        (
            (
                '--config.data.synthetic.enabled=False',
                '--config.data.data_dir={tmp}/nothing_here',
            ),
            'is not prepared in',
        ),
        (
            ('--config.dastc.feature_layer=layer9',),
            'config.dastc.feature_layer',
        ),
        (
            ('--config.train.source_only_steps=0',),
            'config.train.source_only_steps (a head warm-up',
        ),
        (('--config.dastc.strong_aug.enabled=False',), 'sees no perturbation'),
        (
            ('--config.data.data_dir={tmp}/tfds',),
            'has no effect: config.data.synthetic.enabled=True',
        ),
    ],
)
@pytest.mark.integration
def test_user_errors_print_one_line_and_exit_2(tmp_path, override, expected):
  args = [a.format(tmp=tmp_path) for a in override]
  r = _main(
      '--config=configs/synthetic.py:smoke',
      f'--workdir={tmp_path / "run"}',
      *args,
  )
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  last = [ln for ln in r.stderr.splitlines() if ln.startswith('error: ')]
  assert last and expected in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(
    'config,extra,expected',
    [
        (
            'configs/synthetc.py',
            (),
            "error: --config: no such file 'configs/synthetc.py'; configs has",
        ),
        (
            'configs/synthetic.py:smok',
            (),
            "error: --config: Unknown config variant(s) ['smok']",
        ),
        (
            'configs/synthetic.py:smoke',
            ('--config.train.num_step=3',),
            "error: --config.train.num_step: the config has no key 'num_step'."
            ' Did you mean "num_steps" instead of "num_step"?',
        ),
        (  # no near key: the flag and the key are still named
            'configs/synthetic.py:smoke',
            ('--config.train.nonexistent=3',),
            'error: --config.train.nonexistent: the config has no key'
            " 'nonexistent'. (configs/common.py declares every key)",
        ),
        (
            'configs/synthetic.py:smoke',
            ('--config.train.num_steps=abc',),
            'error: --config.train.num_steps=abc: invalid literal',
        ),
    ],
)
@pytest.mark.integration
def test_flag_errors_print_one_line_and_exit_2(
    tmp_path, config, extra, expected
):
  """A mistyped config path, variant or override: one line, exit 2."""
  r = _main(f'--config={config}', f'--workdir={tmp_path / "run"}', *extra)
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr, r.stderr[-2000:]
  lines = [ln for ln in r.stderr.splitlines() if ln.startswith('error: ')]
  assert len(lines) == 1 and lines[0].startswith(expected), r.stderr[-2000:]


@pytest.mark.parametrize(
    'module,args,expected',
    [
        (
            'dastc_jax.prepare',
            ('--dataset=vipr', '--manual_dir={tmp}', '--data_dir={tmp}/d'),
            'error: --dataset=vipr: value should be one of',
        ),
        (
            'dastc_jax.prepare',
            (
                '--dataset=viper',
                '--manual_dir={tmp}/none',
                '--data_dir={tmp}/d',
            ),
            'error: --manual_dir=',
        ),
        ('dastc_jax.flow', ('--dataset=vipr',), 'error: --dataset=vipr'),
        (
            'dastc_jax.convert',
            ('--config=configs/vipr.py', '--source=x.pth', '--output={tmp}/o'),
            "error: --config: no such file 'configs/vipr.py'",
        ),
        (
            'dastc_jax.main',
            ('--config=configs/synthetic.py:smoke', '--workdirr={tmp}'),
            "error: Unknown command line flag 'workdirr'",
        ),
    ],
)
@pytest.mark.integration
def test_every_command_reports_bad_input_in_one_line(
    tmp_path, module, args, expected
):
  """prepare, flow, convert and main: bad flags and inputs, exit 2."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  r = subprocess.run(
      [sys.executable, '-m', module, *(a.format(tmp=tmp_path) for a in args)],
      capture_output=True,
      text=True,
      cwd=REPO,
      env=env,
      timeout=300,
  )
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr, r.stderr[-2000:]
  lines = [ln for ln in r.stderr.splitlines() if ln.startswith('error: ')]
  assert len(lines) == 1 and lines[0].startswith(expected), r.stderr[-2000:]


def test_out_of_memory_is_one_line_with_the_knobs():
  """XLA's failed allocation becomes a UserError that names the stage, the
  request and the config keys that reduce it; other errors pass through."""
  import jax  # pylint: disable=g-import-not-at-top
  from dastc_jax import errors  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import oom  # pylint: disable=g-import-not-at-top

  xla = jax.errors.JaxRuntimeError(
      'RESOURCE_EXHAUSTED: Out of memory allocating 29410057664 bytes.'
  )
  with pytest.raises(errors.UserError) as e:
    with oom.reported('training'):
      raise xla
  msg = str(e.value)
  assert '\n' not in msg and 'Out of memory in training' in msg
  assert 'an allocation of 29.4 GB failed' in msg and 'GB)' in msg
  for knob in (
      'config.model.scan_blocks=True',
      'config.model.remat=True',
      'config.mesh.fsdp',
      'benchmarks/memory.md',
  ):
    assert knob in msg
  assert 'of 12 MB' in oom.message(
      'x',
      jax.errors.JaxRuntimeError(
          'RESOURCE_EXHAUSTED: Out of memory allocating 12000000 bytes'
      ),
  )
  for other in (
      ValueError('not memory'),
      jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: quota'),
  ):
    with pytest.raises(type(other)) as e:
      with oom.reported('training'):
        raise other
    assert e.value is other  # passed on as it was


@pytest.mark.integration
def test_weight_file_errors_say_what_to_do(tmp_path):
  """A weight file where a checkpoint folder is expected names the
  conversion command; a garbage weight file is reported without PyTorch's
  advice to load it unsafely."""
  garbage = tmp_path / 'model.pth'
  # A pickle header of an unknown protocol (78), on which PyTorch warns
  # before it fails, then noise.
  garbage.write_bytes(b'\x80\x4e' + np.random.default_rng(0).bytes(1000))
  r = _main(
      '--config=configs/synthetic.py:smoke',
      f'--workdir={tmp_path / "run"}',
      '--mode=eval',
      f'--checkpoint={garbage}',
  )
  assert r.returncode == 2 and 'Traceback' not in r.stderr
  assert 'is a file; it takes a checkpoint folder' in r.stderr
  assert 'python -m dastc_jax.convert' in r.stderr
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'dastc_jax.convert',
          '--config=configs/viper.py',
          f'--source={garbage}',
          f'--output={tmp_path / "out"}',
      ],
      capture_output=True,
      text=True,
      cwd=REPO,
      env=env,
      timeout=300,
  )
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
  assert 'not a plain tensor state_dict' in r.stderr
  assert 'weights_only' not in r.stderr
  assert not (tmp_path / 'out').exists()  # nothing written
