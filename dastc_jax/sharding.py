"""Device mesh, shardings and the host-to-global batch assembly."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType
import ml_collections
import numpy as np

DATA = 'data'


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over ``config.mesh.data`` devices (-1 = all)."""
  n = config.mesh.data
  devices = jax.devices()
  if n == -1:
    n = len(devices)
  if n < 1 or n > len(devices):
    raise ValueError(f'config.mesh.data={config.mesh.data} but {len(devices)}'
                     ' devices are available.')
  return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,),
                       devices=devices[:n])


def replicated(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  return jax.NamedSharding(mesh, jax.P())


def data_sharding(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  """Leading (batch) axis split over ``data``."""
  return jax.NamedSharding(mesh, jax.P(DATA))


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """Replicated parameters; the carried per-example clips split on ``data``."""
  repl, data = replicated(mesh), data_sharding(mesh)

  def pick(path, leaf):
    carried = any(getattr(k, 'name', None) == 'carried' for k in path)
    return data if carried and len(leaf.shape) > 0 else repl

  return jax.tree_util.tree_map_with_path(pick, state)


def local_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """Examples this host loads per step; checks divisibility."""
  n_dev = mesh.devices.size
  if global_batch_size % n_dev:
    raise ValueError(f'Global batch size {global_batch_size} is not divisible'
                     f' by the {n_dev} devices of the mesh.')
  return global_batch_size // jax.process_count()


def shard_batch(batch: Any, sharding: jax.NamedSharding) -> Any:
  """Assembles per-host numpy batches into global sharded arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding,
                                                       np.asarray(x)), batch)


def to_host(x: jax.Array) -> np.ndarray:
  """Host copy of a replicated array (works on every process)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if not x.is_fully_replicated:
    raise ValueError('to_host needs a replicated or fully addressable array; '
                     'use local_rows for batch-sharded outputs.')
  return np.asarray(x.addressable_data(0))


def local_rows(x: jax.Array) -> np.ndarray:
  """This host's rows of a batch-sharded array, in global order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:  # replicas along other mesh axes
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows, axis=0)
