"""``--help`` of every command lists that command's own flags."""

import re
import subprocess
import sys

import pytest

# Each command and flags it must document (not necessarily all of them).
COMMANDS = {
    'main': (
        'config',
        'workdir',
        'mode',
        'checkpoint',
        'input',
        'output',
        'flows',
        'flow_weights',
    ),
    'prepare': (
        'dataset',
        'manual_dir',
        'data_dir',
        'train_flow_dir',
        'val_flow_dir',
        'splits',
        'compute_flows',
    ),
    'flow': (
        'dataset',
        'manual_dir',
        'weights',
        'variant',
        'iterations',
        'splits',
        'train_flow_dir',
        'val_flow_dir',
        'size',
        'batch_size',
    ),
    'convert': ('config', 'source', 'output', 'layout', 'overwrite'),
    'benchmarks.adaptation': (
        'world',
        'domain',
        'seeds',
        'variants',
        'report_only',
    ),
    'benchmarks.step': ('batch', 'steps', 'output'),
    'benchmarks.input': ('workers', 'batches', 'output'),
    'benchmarks.faults': ('output', 'world_cache'),
    'benchmarks.pseudo_labels': ('batches', 'seed'),
}


@pytest.mark.integration
@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_help_lists_the_commands_own_flags(command):
  out = subprocess.run(
      [sys.executable, '-m', f'dastc_jax.{command}', '--help'],
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  ).stdout
  listed = set(re.findall(r'^\s+--(?:\[no\])?(\w+)', out, re.M))
  missing = set(COMMANDS[command]) - listed
  assert not missing, f'{command} --help lacks {sorted(missing)}:\n{out}'
