"""Multi-host start-up: ``jax.distributed.initialize`` when asked for.

Set DASTC_DISTRIBUTED=1 (the launch/ scripts do). On SLURM and Cloud TPU JAX
finds its peers itself; elsewhere set DASTC_COORDINATOR (host:port),
DASTC_NUM_PROCESSES and DASTC_PROCESS_ID.
"""

from __future__ import annotations

import os

import jax


def initialize_if_requested() -> bool:
  """Initialises the JAX cluster if DASTC_DISTRIBUTED=1; returns whether."""
  if os.environ.get('DASTC_DISTRIBUTED', '0') != '1':
    return False
  kw = {}
  if 'DASTC_COORDINATOR' in os.environ:
    kw = dict(
        coordinator_address=os.environ['DASTC_COORDINATOR'],
        num_processes=int(os.environ['DASTC_NUM_PROCESSES']),
        process_id=int(os.environ['DASTC_PROCESS_ID']),
    )
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    # Cross-process collectives on CPU (tests, debugging).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kw)
  return True
