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
RESUMABLE_KEYS = (
    'model.conv_kernel_grad',
    'model.remat',
    'model.scan_blocks',
    'model.scan_recompute',
    'model.scan_min_blocks',
)
# Keys that do not change what is trained: length, logging, checkpointing,
# evaluation, input threads, devices, where things are. Any other difference
# on resume stops the run unless it is allowed (``--allow_config_change``).
OPERATIONAL_KEYS = (
    'train.num_steps',
    'train.log_every',
    'train.checkpoint_every',
    'train.eval_every',
    'train.max_checkpoints',
    'train.nonfinite',
    'train.max_consecutive_skips',
    'train.init_from',
    'eval.',
    'mesh.',
    'data.data_dir',
    'data.num_workers',
    'data.num_threads',
    'data.prefetch',
    'data.on_error',
    'data.synthetic.cache_dir',
    'data.synthetic.num_workers',
)


def _flat(config_json: str) -> dict[str, object]:
  return traverse_util.flatten_dict(json.loads(config_json), sep='.')


def _added_and_off(key: str, new: dict[str, object]) -> bool:
  """A key absent from an older run's config whose value now does what the
  older code did: a multi-resolution or masked-consistency key with its
  section off, pseudo-label margins of zero, no class-balanced
  selection, source crops without the class rules, no feature distance."""
  if '.rare_class_sampling.' in key:
    section = key[: key.index('.rare_class_sampling.')]
    return new.get(f'{section}.rare_class_sampling.enabled') is False
  if key.endswith('.cat_max_ratio'):
    return new.get(key) == 1.0
  if key.startswith('dastc.feature_distance.'):
    return not new.get('dastc.feature_distance.weight')
  if key.startswith('model.hrda.'):
    return new.get('model.hrda.enabled') is False
  if key.startswith('dastc.mic.'):
    return new.get('dastc.mic.enabled') is False
  if key.endswith('.pseudo_margins'):
    return not any(new.get(key) or ())
  if key == 'dastc.pl_class_balanced':
    return not new.get(key)
  return False


def check_and_write_config(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    allow_changes: bool = False,
) -> list[str]:
  """Checks a resumed run's config against the one it started with, and
  keeps every config a run was started with.

  ``config.json`` is the config of the run's first start and is never
  overwritten. Resuming with another model, class set or method is refused;
  with another value of any key that changes training (not in
  ``OPERATIONAL_KEYS``) it is refused too, naming the keys, unless
  ``allow_changes``. Each start whose config differs from the last one
  writes it beside as ``config.<N>.json`` (N = 1, 2, ...).

  Returns:
    The keys that differ from the last config (empty for a first start).
  """
  first = workdir / 'config.json'
  text = config.to_json_best_effort(indent=2)
  new = _flat(text)
  if not first.exists():
    if jax.process_index() == 0:
      paths.write_atomic(first, text)
    return []
  later = sorted(
      (
          p
          for p in workdir.glob('config.*.json')
          if p.name.split('.')[1].isdigit()
      ),
      key=lambda p: int(p.name.split('.')[1]),
  )
  last = later[-1] if later else first
  old = _flat(last.read_text())
  changed = sorted(
      k
      for k in set(old) | set(new)
      if old.get(k) != new.get(k)
      and not (k not in old and _added_and_off(k, new))
  )
  frozen = [
      k
      for k in changed
      if k.startswith(FROZEN_KEYS) and k not in RESUMABLE_KEYS
  ]
  show = lambda keys: ', '.join(
      f'{k}={old.get(k)!r} (now {new.get(k)!r})' for k in keys
  )
  if frozen:
    raise errors.ConfigError(
        f'{workdir} holds a run with a different config: '
        + show(frozen)
        + '. Use another --workdir or the original values.'
    )
  training = [
      k
      for k in changed
      if not k.startswith(OPERATIONAL_KEYS) and k not in RESUMABLE_KEYS
  ]
  if training and not allow_changes:
    raise errors.ConfigError(
        f'{workdir} was trained with another config: '
        + show(training)
        + '. Resume with the original values, use another --workdir, or pass '
        '--allow_config_change to continue with the new ones (both configs '
        'are kept).'
    )
  if changed and jax.process_index() == 0:
    paths.write_atomic(workdir / f'config.{len(later) + 1}.json', text)
  return changed


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
