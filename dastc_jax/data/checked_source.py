"""Random access to prepared records with a policy for undecodable ones.

A record whose bytes cannot be decoded at run time (a corrupted or replaced
ArrayRecord file after preparation) either stops the run with an error that
names the record (index and id), the dataset and its folder (``'fail'``, the
default), or is replaced by the next decodable record (``'skip'``). A
replaced example carries ``bad_records`` (how many records were passed over
for it; 0 otherwise), which the train loop sums into the metrics. Both are
deterministic functions of the index, so the grain iterator state stays
exact either way.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

from absl import logging
import numpy as np

from dastc_jax import errors
from dastc_jax.data import io

POLICIES = ('fail', 'skip')


def shard_of(shards: Sequence[tuple[str, int]], index: int) -> str:
  """``, record j of shard FILE`` for a global record index, given the
  shard files and their record counts in index order ('' when unknown)."""
  starts = np.cumsum([0] + [n for _, n in shards])
  k = bisect.bisect_right(starts, index) - 1
  if not shards or not 0 <= k < len(shards):
    return ''
  return f', record {index - starts[k]} of shard {shards[k][0]}'


class CheckedSource:
  """Wraps a random-access source (``len``, ``[]``) with an error policy."""

  def __init__(
      self,
      source: Any,
      *,
      name: str,
      data_dir: str,
      policy: str = 'fail',
      id_source: Any = None,
      shards: Sequence[tuple[str, int]] = (),
  ):
    if policy not in POLICIES:
      raise errors.ConfigError(
          f'Unknown config.data.on_error={policy!r}; expected '
          f'one of {POLICIES}.'
      )
    self._source = source
    self._ids = id_source
    self._name = name
    self._data_dir = data_dir
    self._policy = policy
    self._shards = shards

  def shard_of(self, index: int) -> str:
    return shard_of(self._shards, index)

  def __len__(self) -> int:
    return len(self._source)

  def _id(self, index: int) -> str:
    if self._ids is None:
      return '?'
    try:
      rid = self._ids[index]['id']
      return rid.decode() if isinstance(rid, bytes) else str(rid)
    except Exception:  # pylint: disable=broad-except
      return '?'

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self._source)
    for passed in range(n):
      i = (index + passed) % n
      try:
        rec = self._source[i]
      except Exception as e:  # decoders raise many types
        msg = (
            f'Record {i} (id {self._id(i)!r}{self.shard_of(i)}) of '
            f'{self._name} in {self._data_dir} cannot be decoded: '
            f'{type(e).__name__}: {str(e)[:300]}'
        )
        if self._policy == 'fail':
          raise io.DataError(
              msg + '. Its data was corrupted or replaced after preparation: '
              'prepare the dataset again into a new --data_dir, or set '
              "config.data.on_error='skip' to skip such records."
          ) from e
        logging.warning('%s; skipped (config.data.on_error=skip).', msg)
        continue
      if self._policy == 'skip':
        rec = {**rec, 'bad_records': passed}
      return rec
    raise io.DataError(
        f'No record of {self._name} in {self._data_dir} can be decoded.'
    )
