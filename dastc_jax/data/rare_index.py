"""Which source frames contain each long-tail class (for the fusion pastes).

Built once when data is prepared (a pass over the source labels), cached as
JSON, and loaded by the pipeline; never rebuilt per step (method.md §2.2,
``ids2path``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Sequence

from absl import logging
import numpy as np

RareIndex = dict[int, list[int]]


def build(num_records: int, read_label: Callable[[int], np.ndarray],
          classes: Sequence[int], min_pixels: int) -> RareIndex:
  """``{class: [record indices whose frame t has >= min_pixels of it]}``."""
  index = {int(k): [] for k in classes}
  for i in range(num_records):
    counts = np.bincount(read_label(i).ravel(), minlength=256)
    for k in index:
      if counts[k] >= min_pixels:
        index[k].append(i)
  return index


def cache_path(cache_dir: str, record_ids: Sequence[str],
               classes: Sequence[int], min_pixels: int) -> str:
  """A cache file name keyed by the records and the class list."""
  h = hashlib.sha1(json.dumps([list(record_ids), list(classes),
                               min_pixels]).encode()).hexdigest()[:16]
  return os.path.join(os.path.expanduser(cache_dir), f'rare_index_{h}.json')


def load_or_build(path: str, num_records: int,
                  read_label: Callable[[int], np.ndarray],
                  classes: Sequence[int], min_pixels: int) -> RareIndex:
  """Loads the cached index, or builds and writes it atomically."""
  if os.path.exists(path):
    with open(path) as f:
      return {int(k): v for k, v in json.load(f).items()}
  logging.info('Building the rare-class index over %d source frames -> %s',
               num_records, path)
  index = build(num_records, read_label, classes, min_pixels)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump({str(k): v for k, v in index.items()}, f)
  os.replace(tmp, path)
  logging.info('Rare-class frame counts: %s',
               {k: len(v) for k, v in index.items()})
  return index
