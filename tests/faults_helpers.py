"""Fault injection shared by the loop and fault tests."""

import numpy as np

from dastc_jax import train
from dastc_jax.data import pipeline


def poison_batches(monkeypatch, is_bad) -> None:
  """Makes the training pipeline give batches whose source flow is NaN:
  the n-th batch drawn (from 1, over every pipeline the run builds) is
  poisoned where ``is_bad(n)``."""
  make = pipeline.make_train_dataset
  calls = {'n': 0}

  def poisoned(*args, **kw):
    def poison(batch):
      calls['n'] += 1
      if is_bad(calls['n']):
        batch['source']['flow'] = np.full_like(batch['source']['flow'], np.nan)
      return batch

    return make(*args, **kw).map(poison)

  monkeypatch.setattr(train.pipeline, 'make_train_dataset', poisoned)
