"""No DA-STC start with pseudo-labels from an initialised head.

A TPS file converted with ``--head_from_tps`` predicts exactly what the
PyTorch TPS model predicts (so the EMA teacher, reset to the student at the
first adaptation step, labels with TPS); the same file converted with
``--allow_missing=head/`` (layer7 initialised), ImageNet weights or no
weights at all are refused before training unless a head warm-up or a
trained frozen teacher labels the first steps.
"""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import viper
from dastc_jax import convert
from dastc_jax import errors
from dastc_jax.method import dastc_step
from dastc_jax.method import train_state
from dastc_jax.ops import image as image_ops
from dastc_jax.runtime import state as state_lib
from dastc_jax.runtime import teacher_start
from tests import test_configs
from tests import test_convert as tc

torch.set_num_threads(1)


def _tps_file():
  mc = tc._model_config('aspp')  # pylint: disable=protected-access
  tm = tc._torch_model(mc)  # pylint: disable=protected-access
  return tm, {k: v.numpy() for k, v in tm.state_dict().items()}


def test_head_from_tps_predicts_what_tps_predicts():
  tm, sd = _tps_file()
  mc = tc._model_config('proda')  # pylint: disable=protected-access
  params, stats, report = convert.convert_state_dict(
      dict(sd), mc, head_from_tps=True
  )
  assert not report.missing_initialised  # nothing is left untrained
  assert 'layer6.conv2d_list.0.weight' in report.converted
  assert not any(k.startswith('layer7.') for k in report.converted)
  frames, flow = tc._inputs()  # pylint: disable=protected-access

  def fused(p):  # jitted below: eagerly it compiles ~300 primitives
    m = tc._flax_model(mc, p, stats)  # pylint: disable=protected-access
    return m.clip(jnp.asarray(frames), jnp.asarray(flow), train=False)['pred']

  out = {'pred': jax.jit(fused)(params)}
  with torch.no_grad():
    pred, _ = tm(
        tc._nchw(frames[:, 0]),
        tc._nchw(frames[:, 1]),  # pylint: disable=protected-access
        tc._nchw(flow),
    )  # pylint: disable=protected-access
  tps = np.moveaxis(pred.numpy(), 1, -1)
  assert tc._rel(np.asarray(out['pred']), tps) < 1e-4  # pylint: disable=protected-access
  assert np.array_equal(
      np.argmax(np.asarray(out['pred']), -1), np.argmax(tps, -1)
  )
  # The features beyond the class channels are live (initialised, not
  # zero), so the zero classifier columns get gradients: the head trains.
  c = mc.num_classes
  w = np.asarray(params['head']['classifier']['kernel'])[0, 0]  # [F, C]
  assert np.array_equal(w[:c], np.eye(c)) and not w[c:].any()
  extra = np.asarray(params['head']['aspp']['branches'][0]['kernel'])
  assert np.count_nonzero(extra[..., c:]) > 0.9 * extra[..., c:].size

  # ...and the zero classifier rows get a gradient from them.
  loss = lambda p: jnp.sum(jnp.tanh(fused(p)))
  grad = jax.jit(jax.grad(loss))(params)['head']['classifier']['kernel']
  grad = np.asarray(grad)
  assert np.abs(grad[0, 0, c:]).max() > 0


def test_pseudo_labels_of_the_first_step_are_the_tps_models():
  """At the first adaptation step the EMA teacher is the student, whose
  weights come from --head_from_tps: its pseudo-labels are the argmax of
  TPS's own fused prediction of frame t-1 (warped to t)."""
  tm, sd = _tps_file()
  c = viper.get_config()
  c.model = tc._model_config('proda')  # pylint: disable=protected-access
  c.dastc.pl_distribution_alignment = False
  params, stats, _ = convert.convert_state_dict(
      dict(sd), c.model, head_from_tps=True
  )
  graphdef = state_lib.model_graphdef(c)
  h, w = 40, 56
  stale = jax.tree.map(jnp.zeros_like, {'params': params, 'batch_stats': stats})
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=stats,
      opt_state=None,
      rng=None,
      teacher=stale,
      carried=train_state.empty_carried(1, (h, w), (h, w), 2, 5),
  )
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (1, 3, h, w, 3), dtype=np.uint8)
  x = jnp.asarray(image_ops.normalize(rgb))  # frames t, t-1, t-2
  zero = jnp.zeros((1, h, w, 2), jnp.float32)
  # Jitted: eagerly it compiles ~150 primitives one by one.
  pl, teacher = jax.jit(
      lambda state, x: dastc_step._pseudo_labels(  # pylint: disable=protected-access
          c,
          graphdef,
          None,
          state,
          x,
          {'flow': zero, 'flow_t1_t2': zero},
          (h, w),
          0,
          jax.random.key(0),
          jax.random.key(1),
      )[
          :2
      ]
  )(state, x)
  assert jax.tree.all(
      jax.tree.map(
          lambda a, b: bool(jnp.array_equal(a, b)), teacher['params'], params
      )
  )
  with torch.no_grad():
    pred, _ = tm(
        tc._nchw(np.asarray(x[:, 1])),
        tc._nchw(np.asarray(x[:, 2])),  # pylint: disable=protected-access
        tc._nchw(np.zeros((1, h, w, 2), np.float32)),
    )  # pylint: disable=protected-access
  want = np.argmax(np.moveaxis(pred.numpy(), 1, -1), -1)  # [1, h, w]
  got = np.asarray(pl['label_lo'])
  assert got.shape == want.shape
  assert np.array_equal(got, want)


def _converted(tmp_path, **kw):
  _, sd = _tps_file()
  mc = tc._model_config('proda')  # pylint: disable=protected-access
  tmp_path.mkdir(parents=True, exist_ok=True)
  path = str(tmp_path / 'tps_init')
  torch.save(
      {k: torch.from_numpy(v) for k, v in sd.items()}, str(tmp_path / 'tps.pth')
  )
  convert.convert_file(str(tmp_path / 'tps.pth'), path, mc, **kw)
  return path


def _dastc(init_from='', warm=0, **dastc):
  c = viper.get_config()
  c.train.init_from = init_from
  c.train.source_only_steps = warm
  c.dastc.update(dastc)
  return c


def test_untrained_heads_are_refused_with_the_keys_to_set(tmp_path):
  bad = _converted(
      tmp_path, allow_missing=('head/',), allow_unexpected=(r'layer6\.',)
  )
  with pytest.raises(errors.ConfigError) as e:
    teacher_start.check(_dastc(bad))
  msg = str(e.value)
  assert '\n' not in msg and bad in msg and 'conversion.json' in msg
  for key in (
      'config.train.source_only_steps',
      '--head_from_tps',
      'config.dastc.allow_untrained_teacher',
  ):
    assert key in msg
  with pytest.raises(errors.ConfigError, match="init_from=''"):
    teacher_start.check(_dastc())  # from scratch
  # The 'reference' teacher labels with its frozen model: that one counts,
  # and a head warm-up of the student does not help it.
  for warm in (0, 1000):
    with pytest.raises(
        errors.ConfigError, match='frozen_teacher.weights=.*initialised'
    ) as e:
      teacher_start.check(
          _dastc(
              '',
              warm=warm,
              teacher='reference',
              frozen_teacher=dict(weights=bad),
          )
      )
    assert 'source_only_steps' not in str(e.value)
  with pytest.raises(
      errors.ConfigError, match='config.dastc.frozen_teacher.weights, as the'
  ):
    teacher_start.check(_dastc(bad, teacher='reference'))
  # What makes it acceptable: a head warm-up, a trained head, an opt-in.
  teacher_start.check(_dastc(bad, warm=1000))
  good = os.path.join(str(tmp_path), 'good')
  os.rename(_converted(tmp_path / 'b', head_from_tps=True), good)
  teacher_start.check(_dastc(good))
  with open(os.path.join(good, 'conversion.json')) as f:
    assert not json.load(f)['missing_initialised']
  teacher_start.check(_dastc(bad, allow_untrained_teacher=True))
  teacher_start.check(
      _dastc(bad, teacher='reference', frozen_teacher=dict(weights=good))
  )


@pytest.mark.parametrize('name', test_configs.CONFIGS)
def test_every_real_config_starts_with_a_trained_labeller(name):
  """As documented: the CNN video configs from TPS converted with
  --head_from_tps (a trained head); the configs that start from ImageNet
  weights warm the head up on source labels; the demo warms up too."""
  module = importlib.import_module(f'configs.{name}')
  c = module.get_config()
  if c.train.source_only_steps == 0:
    assert c.model.name in ('accel_deeplabv2',) and c.dastc.teacher == 'ema'
    with pytest.raises(errors.ConfigError, match='init_from|frozen_teacher'):
      teacher_start.check(c)  # the user must give the TPS weights
  else:
    teacher_start.check(c)
  ref = module.get_config('reference') if name != 'synthetic' else None
  if ref is not None and ref.train.source_only_steps == 0:
    assert ref.dastc.teacher == 'reference'
    with pytest.raises(errors.ConfigError, match='frozen_teacher|init_from'):
      teacher_start.check(ref)


def test_export_writes_the_released_tps_layout_and_converts_back():
  """A stand-in for a released file: our weights exported to the reference
  keys (641 for a full-size TPS model) and converted back unchanged."""
  mc = tc._model_config('aspp')  # pylint: disable=protected-access
  _, sd = _tps_file()
  params, stats, _ = convert.convert_state_dict(dict(sd), mc)
  out = convert.export_state_dict(params, stats, mc)
  assert set(out) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(out[k], v, err_msg=k)
  full = viper.get_config().model
  full.head = 'aspp'
  abstract = jax.eval_shape(
      lambda: state_lib.init_model(
          type(viper.get_config())({'model': full}), 0
      )[1:]
  )
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract)
  keys = convert.export_state_dict(*zeros, full)
  assert set(keys) == set(tc._released_keys('aspp', 15))  # pylint: disable=protected-access
