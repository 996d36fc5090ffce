"""glibc allocator settings for JAX on the CPU backend.

XLA:CPU and YNNPACK allocate every step's temporaries and outputs with
``malloc`` from many threads. With glibc's defaults those blocks come from
per-thread arenas (whose heaps are unmapped as soon as they are empty) or,
above the mmap threshold, from fresh ``mmap`` calls, and are handed back to
the kernel when freed. The next step faults every page in again: ~310,000
page faults (1.2 GB of zeroed pages) per ResNet-101 train step at 128x256
on a 2-core CPU, about 18% of the CPU time in the kernel (``getrusage`` and
``perf``, measured when this module was written; the effect on the step
time is the glibc-defaults row of benchmarks/step.md).

:func:`configure` sets, through ``mallopt``, one arena, no ``mmap``-backed
blocks and no trimming, so freed blocks stay in the process and are reused:
the same step then takes 0 page faults. The cost is that the process keeps
its peak heap until it exits, which is what a training job does anyway.

The settings only pay off when JAX computes on the host, so they are applied
only when JAX will use the CPU backend (``JAX_PLATFORMS`` names only
``cpu``, or no GPU/TPU plugin is installed), on glibc, before any thread has
allocated (first thing in ``main.py``), and only for training frames of
at most :data:`MAX_PIXELS` (read from the ``--config`` file).
``DASTC_MALLOC_DEFAULTS=0`` turns them off; ``=1`` forces them.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = (
    (M_ARENA_MAX, 1),
    (M_MMAP_MAX, 0),
    (M_TRIM_THRESHOLD, -1),
)  # -1: never trim (mallopt(3))

# Above this many pixels per training frame (256x512) the settings are not
# applied. At the real sizes XLA:CPU allocates a step's temporaries as one
# block of many GB; in a heap that never maps, unmaps or trims, the block
# freed by one step is split by small allocations before the next step asks
# for it again, and the heap grows by a second block: the VIPER DA-STC
# step (14 GB of temporaries) was killed at 24.6 GB in its second step on
# a 23 GB host (the full-size rehearsal at commit b648dbe). With glibc's
# defaults such blocks are mapped and unmapped per step, and their page
# faults are a small part of a step that takes minutes.
MAX_PIXELS = 256 * 512

# Packages whose presence means JAX will pick an accelerator by default.
_ACCELERATOR_PLUGINS = (
    'jax_cuda12_plugin',
    'jax_cuda13_plugin',
    'jax_rocm60_plugin',
    'jax_rocm7_plugin',
    'libtpu',
)


def _will_use_cpu(env) -> bool:
  platforms = env.get('JAX_PLATFORMS', '') or env.get('JAX_PLATFORM_NAME', '')
  if platforms:
    return {p.strip() for p in platforms.split(',') if p.strip()} == {'cpu'}
  return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def configure(
    environ: dict[str, str] | None = None, pixels: int | None = None
) -> str:
  """Applies :data:`SETTINGS` where they help (see the module doc).

  Args:
    environ: the environment to read (default ``os.environ``).
    pixels: the largest training frame of the run (``xla_cpu.train_pixels``;
      None = unknown); above :data:`MAX_PIXELS` nothing is set.

  Returns:
    What was done: ``'applied'``, or ``'skipped: <reason>'``.
  """
  env = os.environ if environ is None else environ
  choice = env.get('DASTC_MALLOC_DEFAULTS', '')
  if choice == '0':
    return 'skipped: DASTC_MALLOC_DEFAULTS=0'
  if choice != '1' and pixels is not None and pixels > MAX_PIXELS:
    return (
        f'skipped: training frames of {pixels} pixels (above '
        f'{MAX_PIXELS}; see host_malloc.MAX_PIXELS)'
    )
  if choice != '1' and not _will_use_cpu(env):
    return 'skipped: JAX will not compute on the CPU'
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return 'skipped: not glibc'
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError as e:
    return f'skipped: {e}'
  failed = [p for p, v in SETTINGS if libc.mallopt(p, v) != 1]
  if failed:
    return f'skipped: mallopt refused parameters {failed}'
  return 'applied'


def pixels_from_argv(argv: list[str]) -> int | None:
  """The largest training frame of the ``--config=FILE[:variant]`` in
  ``argv``, read before absl parses the flags (the allocator must be set
  before any thread allocates); overrides are not applied. None when there
  is no such flag or the file does not load (the flag parser reports it)."""
  from dastc_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top

  value = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
  if not value:
    return None
  path, _, variant = value.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_dastc_early_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return xla_cpu.train_pixels(module.get_config(variant or None))
  except Exception:  # pylint: disable=broad-except
    return None
