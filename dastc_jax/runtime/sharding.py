"""Device mesh, shardings and the host-to-global batch assembly."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType
import ml_collections
import numpy as np

from dastc_jax import errors

DATA = 'data'
FSDP = 'fsdp'
# The batch is split over both mesh axes; parameters over ``fsdp`` only.
BATCH_AXES = (DATA, FSDP)
# Smaller leaves (biases, BN vectors) stay replicated under FSDP.
FSDP_MIN_SIZE = 2**12


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A ``(data, fsdp)`` mesh: ``config.mesh.data`` x ``config.mesh.fsdp``.

  ``data=-1`` takes every device not used by ``fsdp``. With ``fsdp=1``
  parameters and optimizer state are replicated (data parallelism); with
  ``fsdp>1`` they are sharded over that axis (each large leaf along its
  largest divisible dimension) and gathered by XLA where a layer needs them.
  """
  n_fsdp = config.mesh.fsdp
  n_data = config.mesh.data
  devices = jax.devices()
  if n_fsdp < 1 or len(devices) % n_fsdp:
    raise errors.ConfigError(
        f'config.mesh.fsdp={n_fsdp} must divide the ' f'{len(devices)} devices.'
    )
  if n_data == -1:
    n_data = len(devices) // n_fsdp
  if n_data < 1 or n_data * n_fsdp > len(devices):
    raise errors.ConfigError(
        f'config.mesh.data={config.mesh.data} x '
        f'config.mesh.fsdp={n_fsdp} but {len(devices)} devices '
        'are available.'
    )
  return jax.make_mesh(
      (n_data, n_fsdp),
      BATCH_AXES,
      axis_types=(AxisType.Auto, AxisType.Auto),
      devices=devices[: n_data * n_fsdp],
  )


def replicated(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  return jax.NamedSharding(mesh, jax.P())


def data_sharding(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return jax.NamedSharding(
      mesh, jax.P(tuple(a for a in BATCH_AXES if a in mesh.axis_names))
  )


def _fsdp_spec(shape: tuple[int, ...], n: int) -> jax.P:
  """Shards the largest dimension divisible by ``n`` (or nothing)."""
  if n <= 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return jax.P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = FSDP
      return jax.P(*spec)
  return jax.P()


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """The carried per-example clips split like the batch (the carried class
  priors replicated); parameters,
  teacher and optimizer state replicated, or FSDP-sharded when the mesh has
  an ``fsdp`` axis of size > 1."""
  data = data_sharding(mesh)
  n = dict(zip(mesh.axis_names, mesh.devices.shape)).get(FSDP, 1)

  def pick(path, leaf):
    carried = any(getattr(k, 'name', None) == 'carried' for k in path)
    # Per-class running priors are small vectors: replicated.
    prior = any(getattr(k, 'key', None) == 'class_prior' for k in path)
    if carried and not prior and len(leaf.shape) > 0:
      return data
    return jax.NamedSharding(mesh, _fsdp_spec(tuple(leaf.shape), n))

  return jax.tree_util.tree_map_with_path(pick, state)


def local_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """Examples this host loads per step; checks divisibility."""
  n_dev = mesh.devices.size
  if global_batch_size % n_dev:
    raise errors.ConfigError(
        f'config.train.batch_size={global_batch_size} (the '
        f'global batch) is not divisible by the {n_dev} devices '
        'of the mesh; use a multiple of it, or fewer devices '
        '(config.mesh.data).'
    )
  return global_batch_size // jax.process_count()


def shard_batch(batch: Any, sharding: jax.NamedSharding) -> Any:
  """Assembles per-host numpy batches into global sharded arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch,
  )


def to_host(x: jax.Array) -> np.ndarray:
  """Host copy of a replicated array (works on every process)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if not x.is_fully_replicated:
    raise ValueError(
        'to_host needs a replicated or fully addressable array; '
        'use local_rows for batch-sharded outputs.'
    )
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
