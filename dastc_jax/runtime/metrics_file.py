"""The run's scalars as JSON lines (``metrics.jsonl``).

Imported where the writers are built (``train.py``), not at package
import: ``clu`` loads TensorFlow, which must not precede other native
libraries in processes that only import the package.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from clu import metric_writers
from etils import epath

from dastc_jax import paths


class MetricsFile(metric_writers.MetricWriter):
  """Scalars as JSON lines (``{"step": N, "tag": value, ...}``), appended
  at every write (a resumed run appends to the same file). Object stores
  (``gs://...``) have no append: there the file is rewritten atomically."""

  def __init__(self, path: epath.Path):
    self._path = epath.Path(path)
    self._local = '://' not in os.fspath(self._path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    line = json.dumps(row, sort_keys=True) + '\n'
    if self._local:
      with open(os.fspath(self._path), 'a') as f:
        f.write(line)
      return
    old = self._path.read_text() if self._path.exists() else ''
    paths.write_atomic(self._path, old + line)

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass
