"""host_malloc: when the settings apply, and that they stop the page faults."""

import os
import subprocess
import sys

import pytest

from dastc_jax.runtime import host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_skipped_off_cpu_or_when_turned_off():
  # No mallopt call is made on these paths (this process is not changed).
  assert host_malloc.configure({'DASTC_MALLOC_DEFAULTS': '0'}) == (
      'skipped: DASTC_MALLOC_DEFAULTS=0'
  )
  for platforms in ('cuda', 'tpu', 'cuda,cpu'):
    assert host_malloc.configure({'JAX_PLATFORMS': platforms}) == (
        'skipped: JAX will not compute on the CPU'
    )


# Allocates a fresh 64 MiB output per call (above glibc's largest mmap
# threshold) and prints the fewest minor page faults seen in a window of 8
# calls (of 4 windows: with the settings the heap may still grow by a block
# now and then, when JAX frees a buffer late or alignment leaves a freed
# block a little too small).
_FAULTS = r"""
import resource, sys
sys.path.insert(0, {repo!r})
from dastc_jax.runtime import host_malloc
print('STATE', host_malloc.configure())
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x + 1.0)
x = jnp.zeros((16 * 2**20,), jnp.float32)
for _ in range(4):
  f(x).block_until_ready()
windows = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(8):
    f(x).block_until_ready()
  windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print('FAULTS', min(windows))
"""


def _faults(setting: str) -> tuple[str, int]:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'DASTC_MALLOC_DEFAULTS': setting}
  proc = subprocess.run(
      [sys.executable, '-c', _FAULTS.format(repo=REPO)],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = dict(
      ln.split(' ', 1)
      for ln in proc.stdout.splitlines()
      if ln.startswith(('STATE', 'FAULTS'))
  )
  return out['STATE'], int(out['FAULTS'])


@pytest.mark.integration
@pytest.mark.skipif(sys.platform != 'linux', reason='glibc only')
def test_settings_stop_page_faults_of_repeated_large_buffers():
  state_on, on = _faults('1')
  state_off, off = _faults('0')
  assert state_on == 'applied'
  assert state_off == 'skipped: DASTC_MALLOC_DEFAULTS=0'
  # glibc defaults: every 64 MiB output is a fresh mmap, 8 x 16384 pages
  # faulted in per window; with the settings freed blocks are reused (at
  # most one new block per window, usually none).
  assert off >= 8 * 16384 * 0.9, off
  assert on <= 16384 + 512, (on, off)


def test_settings_are_chosen_by_the_configs_frame_size():
  """main.py reads the --config file's largest training frame before absl
  parses the flags: the real configs' multi-GB step blocks get glibc's
  defaults, the small ones the reuse settings."""
  argv = ['--config=configs/viper.py', '--workdir=/tmp/x']
  assert host_malloc.pixels_from_argv(argv) == 720 * 1280
  assert (
      host_malloc.pixels_from_argv(['--config', 'configs/viper.py:smoke'])
      <= host_malloc.MAX_PIXELS
  )
  assert host_malloc.pixels_from_argv(['--config=missing.py']) is None
  assert host_malloc.configure({}, pixels=720 * 1280).startswith(
      'skipped: training frames of 921600 pixels'
  )
