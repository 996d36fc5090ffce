"""Every config and variant loads, and its data sections name prepared
datasets whose label spaces fit its class set."""

import importlib
import pathlib

import jax
import numpy as np
import pytest

from dastc_jax.data.datasets import builders
from dastc_jax.data import labels
from dastc_jax import models
from dastc_jax import train
from dastc_jax.ops import augment
from dastc_jax.ops import image as image_ops

# Every config file in configs/ (a new one is covered without an edit).
CONFIGS = tuple(
    sorted(
        p.stem
        for p in (pathlib.Path(__file__).parent.parent / 'configs').glob('*.py')
        if p.stem not in ('__init__', 'common')
    )
)
# The demo has no reference variant.
CASES = [
    (n, v)
    for n in CONFIGS
    for v in ('', 'smoke', 'reference', 'reference,smoke')
    if not (n == 'synthetic' and 'reference' in v)
]


@pytest.mark.parametrize('name,variant', CASES)
def test_config_loads_and_is_consistent(name, variant):
  module = importlib.import_module(f'configs.{name}')
  c = module.get_config(variant)
  train.check_config(c)
  cs = labels.get_class_set(c.data.class_set)
  assert c.model.num_classes == cs.num_classes
  for key in ('source', 'target', 'source_val', 'target_val'):
    if key not in c.data:
      continue
    spec = builders.get_spec(c.data[key].dataset)
    assert c.data[key].split in spec.splits
    assert spec.label_space in ('cityscapes_ids', cs.name), (key, spec.name)
    # Video datasets feed the video model, image datasets the image model.
    if key in ('source', 'target'):
      assert spec.clip_length >= models.clip_length(c.model)
      assert (spec.clip_length == 1) == (models.clip_length(c.model) == 1)
  for split in c.eval.splits:
    assert split in c.data


def test_reference_hyper_parameters():
  from configs import gta5, synthia, synthia_seq, viper  # pylint: disable=g-import-not-at-top

  v, s = viper.get_config(), synthia_seq.get_config()
  assert (v.optim.lr, v.dastc.lambda_t, v.dastc.num_rare_classes) == (
      1e-4,
      0.2,
      3,
  )
  assert (s.optim.lr, s.dastc.lambda_t, s.dastc.num_rare_classes) == (
      2.5e-4,
      1.0,
      2,
  )
  assert s.data.class_set == 'synthia12' and s.model.num_classes == 12
  assert labels.SYNTHIA12.scored == tuple(i for i in range(12) if i != 3)
  assert v.data.source.image_size == (720, 1280)
  assert s.data.source.image_size == (640, 1280)
  for c, n in ((gta5.get_config(), 19), (synthia.get_config(), 16)):
    assert c.model.name == 'deeplabv2' and c.model.num_classes == n
    assert c.data.target.dataset == 'cityscapes'
    assert c.optim.name == 'adamw' and c.optim.lr == 6e-5


@pytest.mark.parametrize('name,variant', CASES)
def test_strong_clip_differs_from_the_clean_clip(name, variant):
  """Wherever the consistency loss is on, the strong target clip is a
  perturbation of the clean one: measured on 8 random clips of the config's
  target crop (the blur scales with the resized frame), through the step's
  function."""
  c = importlib.import_module(f'configs.{name}').get_config(variant)
  if c.method != 'dastc' or c.dastc.lambda_t == 0:
    pytest.skip('no consistency loss')
  d = c.data.target
  h, w = d.crop_size or d.image_size or (64, 128)
  h = min(h, 64)  # a band of rows: the blur's scale follows the width
  width = d.image_size[1] if d.image_size else None
  t = models.clip_length(c.model)
  n = 8
  rgb = np.random.default_rng(0).integers(0, 256, (n, t, h, w, 3), np.uint8)
  a = c.dastc.strong_aug
  strong = np.asarray(
      jax.jit(lambda k, x: augment.strong_augment(k, x, a, image_width=width))(
          jax.random.key(0), rgb
      )
  )
  clean = np.asarray(image_ops.normalize(rgb))
  if a.wrap_normalized_bug:  # the released range: [0, 1], not normalised
    wrapped = np.mod(np.trunc(clean * 255), 256) / 255  # the wrap alone
    assert strong.min() >= 0 and strong.max() <= 1 and clean.min() < -50
    if not a.enabled:
      np.testing.assert_allclose(strong, wrapped, atol=1e-6)
    else:  # and the perturbation on top of it
      moved = np.abs(strong - wrapped).reshape(n, -1).mean(-1) > 1 / 255
      assert moved.any()
    return
  changed = np.abs(strong - clean).reshape(n, -1).mean(-1) > 1.0
  # Each clip is left as it is with probability (1 - p_blur)(1 - p_jitter)
  # (1 - p_gray) (6.4% with the defaults); one clip in 8 must change.
  assert a.enabled
  assert (1 - a.p_blur) * (1 - a.p_jitter) * (1 - a.p_gray) < 0.1
  assert changed.any(), (name, variant)
