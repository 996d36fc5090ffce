"""Config validation: every declared key is checked, with its name."""

import pytest

from configs import gta5
from configs import synthetic
from dastc_jax import errors
from dastc_jax.runtime import validation


def _config():
  return synthetic.get_config('smoke')


def _with(key, value):
  """The smoke config with ``config.{key} = value``."""
  c = _config()
  section, name = key.rsplit('.', 1)
  node = c
  for part in section.split('.'):
    node = node[part]
  node[name] = value
  return c


def test_every_choice_and_range_key_exists_in_every_config():
  for c in (synthetic.get_config(), gta5.get_config('smoke')):
    for key in (*validation.CHOICES, *validation.RANGES):
      validation._get(c, key)  # pylint: disable=protected-access
    validation.check_config(c)


@pytest.mark.parametrize(
    'key,value',
    [
        ('optim.name', 'adam'),
        ('optim.schedule', 'cosine'),
        ('model.dtype', 'float16'),
        ('model.name', 'resnet'),
        ('dastc.teacher', 'frozen'),
        ('dastc.alignment.pairs', 3),
        ('data.synthetic.shift', 'extreme'),
        ('data.class_set', 'coco'),
    ],
)
def test_unknown_values_fail_with_the_key(key, value):
  c = _with(key, value)
  with pytest.raises(errors.ConfigError, match=f'config.{key}={value!r}'):
    validation.check_config(c)


@pytest.mark.parametrize(
    'key,value',
    [
        ('train.batch_size', 0),
        ('optim.lr', 0.0),
        ('dastc.ema_decay', 1.5),
        ('dastc.confidence', -0.1),
        ('model.dropout', float('nan')),
        ('dastc.alignment.temperature', 0.0),
        ('train.log_every', 0),
        ('optim.no_weight_decay', ('norm', 3)),
        ('optim.no_weight_decay', ('',)),
    ],
)
def test_out_of_range_values_fail_with_the_key(key, value):
  c = _with(key, value)
  with pytest.raises(errors.ConfigError, match=f'config.{key}='):
    validation.check_config(c)


def test_mesh_data_accepts_minus_one_only_as_all():
  c = _config()
  c.mesh.data = -1
  validation.check_config(c)
  c.mesh.data = 0
  with pytest.raises(errors.ConfigError, match='config.mesh.data=0'):
    validation.check_config(c)


def test_a_missing_key_is_named():
  c = _config()
  del c.dastc.alignment['margin']
  with pytest.raises(
      errors.ConfigError, match='config.dastc.alignment.margin is missing'
  ):
    validation.check_config(c)


def test_data_sections_are_checked():
  c = _config()
  c.data.target.dataset = 'kitti'
  with pytest.raises(errors.ConfigError, match='config.data.target.dataset='):
    validation.check_config(c)
  c = _config()
  c.data.source.split = 'test'
  with pytest.raises(
      errors.ConfigError, match="config.data.source.split='test'"
  ):
    validation.check_config(c)
  c = _config()
  c.data.source.dataset = 'gta5'  # single images for the video model
  with pytest.raises(errors.ConfigError, match='clips of 1 frame'):
    validation.check_config(c)
  c = _config()
  c.data.source.dataset = 'synthia_seq'  # SYNTHIA labels, VIPER classes
  with pytest.raises(errors.ConfigError, match='labelled with the'):
    validation.check_config(c)
  c = _config()
  c.eval.splits = ('target_val', 'test')
  with pytest.raises(errors.ConfigError, match="names 'test'"):
    validation.check_config(c)


def test_config_errors_name_the_key_and_the_expected_values():
  c = _config()
  c.data.target.crop_size = (64, 512)
  with pytest.raises(
      errors.ConfigError,
      match=r'config.data.target.crop_size=' r'\(64, 512\) is larger than',
  ):
    validation.check_config(c)
  c.data.target.crop_size = None
  for key, value in (
      ('train.nonfinite', 'ignore'),
      ('data.on_error', 'retry'),
      ('model.conv_kernel_grad', 'fft'),
  ):
    section, name = key.split('.')
    old, c[section][name] = c[section][name], value
    with pytest.raises(
        errors.ConfigError, match=rf"config.{key}='{value}'; expected one of"
    ):
      validation.check_config(c)
    c[section][name] = old
  validation.check_config(c)
  from configs import viper  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match=r"Unknown config variant.*'smok'"):
    viper.get_config('smok')


def test_kept_labels_control_needs_the_feature_swap():
  c = _with('dastc.feature_swap_labels', 'kept')
  validation.check_config(c)  # with the default 'swap'
  c.dastc.feature_mode = 'blend'
  with pytest.raises(
      errors.ConfigError, match="feature_swap_labels='kept'.*'blend'"
  ):
    validation.check_config(c)


def test_pseudo_margins_are_checked():
  c = _config()
  c.data.target.pseudo_margins = (1, 2, 3)
  with pytest.raises(
      errors.ConfigError, match='config.data.target.pseudo_margins='
  ):
    validation.check_config(c)
  c = _config()
  c.data.target.pseudo_margins = (1, -2, 0, 0)
  with pytest.raises(errors.ConfigError, match='expected four'):
    validation.check_config(c)
  c = _config()
  c.data.source.pseudo_margins = (1, 1, 0, 0)
  with pytest.raises(errors.ConfigError, match='only the training target'):
    validation.check_config(c)
  c = _config()
  c.data.target.pseudo_margins = (1, 2, 0, 0)
  validation.check_config(c)
