"""The run's workdir: the config it was trained with, and its logged
scalars read back."""

from __future__ import annotations

import glob
import json
import os

from etils import epath
from flax import traverse_util
import jax
import ml_collections

from dastc_jax import errors
from dastc_jax import paths

# Config keys a run cannot change when it resumes from a workdir.
FROZEN_KEYS = ('model.', 'data.class_set', 'method')
# model.* keys that change speed, not the function: a run may resume under
# another value.
RESUMABLE_KEYS = ('model.conv_kernel_grad',)


def check_and_write_config(
    config: ml_collections.ConfigDict, workdir: epath.Path
) -> None:
  """Refuses to resume a workdir trained with another model or class set."""
  path = workdir / 'config.json'
  new = traverse_util.flatten_dict(
      json.loads(config.to_json_best_effort()), sep='.'
  )
  if path.exists():
    old = traverse_util.flatten_dict(json.loads(path.read_text()), sep='.')
    diff = sorted(
        k
        for k in set(old) | set(new)
        if k.startswith(FROZEN_KEYS)
        and k not in RESUMABLE_KEYS
        and old.get(k) != new.get(k)
    )
    if diff:
      raise errors.ConfigError(
          f'{workdir} holds a run with a different config: '
          + ', '.join(f'{k}={old.get(k)!r} (now {new.get(k)!r})' for k in diff)
          + '. Use another --workdir or the original values.'
      )
  if jax.process_index() == 0:
    paths.write_atomic(path, config.to_json_best_effort(indent=2))


def read_scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
  """``(step, value)`` of one TensorBoard scalar ``tag`` in the event files
  of ``log_dir`` (the run's workdir; ``eval/`` for the eval job), by step."""
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  out = {}
  for path in glob.glob(os.path.join(log_dir, 'events.out.tfevents.*')):
    for raw in tf.data.TFRecordDataset(path):
      ev = event_pb2.Event.FromString(raw.numpy())
      for v in ev.summary.value:
        if v.tag == tag:
          out[ev.step] = (
              float(tf.make_ndarray(v.tensor))
              if v.HasField('tensor')
              else v.simple_value
          )
  return sorted(out.items())
