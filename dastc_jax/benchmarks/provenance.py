"""Which code a benchmark report was measured with."""

from __future__ import annotations

import os
import subprocess

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def commit() -> str:
  """The checkout's short commit, ``+dirty`` when ``dastc_jax/`` or
  ``configs/`` have uncommitted changes, ``unknown`` outside a git
  checkout."""
  try:
    head = subprocess.run(
        ['git', 'rev-parse', '--short', 'HEAD'],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ['git', 'status', '--porcelain', '--', 'dastc_jax', 'configs'],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return head + ('+dirty' if dirty else '')
