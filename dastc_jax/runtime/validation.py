"""Config checks that run before anything is built or compiled."""

from __future__ import annotations

from absl import logging
import ml_collections

from dastc_jax import errors
from dastc_jax.data import checked_source
from dastc_jax.data import labels as labels_lib
from dastc_jax.method import dastc_step
from dastc_jax import models
from dastc_jax.runtime import divergence

METHODS = ('dastc', 'source_only', 'source_only_hm', 'target_only')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails early, with the key, on config values that cannot work."""
  cs = labels_lib.get_class_set(config.data.class_set)
  if cs.num_classes != config.model.num_classes:
    raise errors.ConfigError(
        f'config.model.num_classes={config.model.num_classes} but '
        f'config.data.class_set={cs.name!r} has {cs.num_classes} classes.')
  if config.method not in METHODS:
    raise errors.ConfigError(f'Unknown config.method={config.method!r}; expected one '
                     f'of {METHODS}.')
  if (config.method == 'dastc' and
      config.train.source_only_steps >= config.train.num_steps):
    logging.warning('config.train.source_only_steps=%d >= num_steps=%d: no '
                    'adaptation step will run.',
                    config.train.source_only_steps, config.train.num_steps)
  if config.method == 'dastc':
    dastc_step.check_config(config)
  if config.method == 'source_only_hm' and not config.data.histogram_match:
    raise errors.ConfigError("config.method='source_only_hm' needs "
                     'config.data.histogram_match=True.')
  if config.method == 'dastc' and config.model.head != 'proda':
    raise errors.ConfigError(
        f"config.model.head={config.model.head!r}: DA-STC's feature "
        "alignment needs the 'proda' head (a 256-d pre-logit feature); "
        "'aspp' is for evaluating DA-VSN/TPS checkpoints.")
  for key, allowed in (('train.nonfinite', divergence.POLICIES),
                       ('data.on_error', checked_source.POLICIES),
                       ('model.conv_kernel_grad', models.KERNEL_GRADS)):
    section, name = key.split('.')
    value = config[section].get(name)
    if value not in allowed:
      raise errors.ConfigError(f'config.{key}={value!r}; expected one of {allowed}.')
  for key in ('source', 'target'):
    d = config.data.get(key)
    crop, size = (d.get('crop_size'), d.get('image_size')) if d else (
        None, None)
    if crop and size and (crop[0] > size[0] or crop[1] > size[1]):
      raise errors.ConfigError(f'config.data.{key}.crop_size={tuple(crop)} is larger '
                       f'than config.data.{key}.image_size={tuple(size)} '
                       '(H, W).')
  for split in config.eval.splits:
    if split not in config.data:
      raise errors.ConfigError(f'config.eval.splits names {split!r}, which is not a '
                       'section of config.data.')
