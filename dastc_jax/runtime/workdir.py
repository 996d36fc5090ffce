"""The run's workdir: the config it was trained with."""

from __future__ import annotations

import json

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


def check_and_write_config(config: ml_collections.ConfigDict,
                            workdir: epath.Path) -> None:
  """Refuses to resume a workdir trained with another model or class set."""
  path = workdir / 'config.json'
  new = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()),
                                   sep='.')
  if path.exists():
    old = traverse_util.flatten_dict(json.loads(path.read_text()), sep='.')
    diff = sorted(k for k in set(old) | set(new)
                  if k.startswith(FROZEN_KEYS) and k not in RESUMABLE_KEYS
                  and old.get(k) != new.get(k))
    if diff:
      raise errors.ConfigError(
          f'{workdir} holds a run with a different config: '
          + ', '.join(f'{k}={old.get(k)!r} (now {new.get(k)!r})'
                      for k in diff)
          + '. Use another --workdir or the original values.')
  if jax.process_index() == 0:
    paths.write_atomic(path, config.to_json_best_effort(indent=2))
