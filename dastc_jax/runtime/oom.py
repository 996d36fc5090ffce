"""Out-of-memory is a user error: one line with what was asked for and the
knobs that reduce it, instead of XLA's traceback.

XLA reports a failed allocation as ``RESOURCE_EXHAUSTED: Out of memory
allocating N bytes`` (CPU and accelerators alike). :func:`reported` turns
that into an ``errors.UserError`` naming the stage, the request, the memory
of the device (or host), and the config keys that shrink the step.
``benchmarks/memory.md`` lists what the real configs' steps need.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

import jax

from dastc_jax import errors

_ASKED = re.compile(
    r'Out of memory (?:while trying to )?allocat\w*\s+' r'([0-9]+)\s*bytes',
    re.IGNORECASE,
)
KNOBS = (
    'config.model.scan_blocks=True with config.model.remat=True '
    '(blocks recomputed in the backward pass; on its own remat does not '
    "shrink an unrolled step on CPU), config.model.dtype='bfloat16' "
    '(on accelerators), smaller config.data.source/target.image_size '
    'or crop_size, a smaller config.train.batch_size, or more devices '
    'with config.mesh.fsdp > 1 (parameters and optimizer state '
    'sharded)'
)


def is_oom(e: BaseException) -> bool:
  """Whether ``e`` is XLA's failed allocation."""
  text = str(e)
  return (
      isinstance(e, jax.errors.JaxRuntimeError)
      and 'RESOURCE_EXHAUSTED' in text
      and 'memory' in text.lower()
  )


def _device_memory() -> str:
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  limit = stats.get('bytes_limit')
  if limit:
    return f'{dev.device_kind} has {limit / 1e9:.1f} GB'
  try:
    host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError):
    return f'on {dev.platform}'
  return f'this host has {host / 1e9:.1f} GB'


def _size(n: int) -> str:
  return f'{n / 1e9:.1f} GB' if n >= 1e9 else f'{n / 1e6:.0f} MB'


def message(stage: str, e: BaseException) -> str:
  """The one-line message of an out-of-memory error ``e`` in ``stage``."""
  asked = _ASKED.search(str(e))
  what = (
      f'an allocation of {_size(int(asked.group(1)))}'
      if asked
      else ('an allocation')
  )
  return (
      f'Out of memory in {stage}: {what} failed ({_device_memory()}). '
      f'Reduce it with {KNOBS}; benchmarks/memory.md lists what the '
      "real configs' steps need."
  )


@contextlib.contextmanager
def reported(stage: str) -> Iterator[None]:
  """Raises an ``errors.UserError`` instead of XLA's out-of-memory error."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if is_oom(e):
      raise errors.UserError(message(stage, e)) from None
    raise
