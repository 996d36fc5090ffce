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
allocated (first thing in ``main.py``). ``DASTC_MALLOC_DEFAULTS=0`` turns
them off; ``=1`` forces them.
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

SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
            (M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))

# Packages whose presence means JAX will pick an accelerator by default.
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                        'jax_rocm60_plugin', 'jax_rocm7_plugin', 'libtpu')


def _will_use_cpu(env) -> bool:
  platforms = env.get('JAX_PLATFORMS', '') or env.get('JAX_PLATFORM_NAME', '')
  if platforms:
    return {p.strip() for p in platforms.split(',') if p.strip()} == {'cpu'}
  return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def configure(environ: dict[str, str] | None = None) -> str:
  """Applies :data:`SETTINGS` where they help (see the module doc).

  Args:
    environ: the environment to read (default ``os.environ``).

  Returns:
    What was done: ``'applied'``, or ``'skipped: <reason>'``.
  """
  env = os.environ if environ is None else environ
  choice = env.get('DASTC_MALLOC_DEFAULTS', '')
  if choice == '0':
    return 'skipped: DASTC_MALLOC_DEFAULTS=0'
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
