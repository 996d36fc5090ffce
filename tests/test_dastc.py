"""The whole DA-STC step: sharding invariance and the carried state."""

import chex
import jax
from jax.sharding import AxisType
import numpy as np
import pytest

from configs import common
from dastc_jax.data import pipeline
from dastc_jax.method import dastc_step
from dastc_jax.ops import image as image_ops
from dastc_jax.runtime import sharding as sharding_lib
from dastc_jax.runtime import state as state_lib
from dastc_jax.runtime import steps
from dastc_jax import train

# One worker runs these in order, so steps compiled by one test (same
# config) come from the compilation cache in the next.
pytestmark = pytest.mark.xdist_group('dastc_steps')


def jitted_step(config, root, n_devices, fsdp=1):
  """The DA-STC step jitted on the first n devices (``fsdp`` of them
  sharding the parameters), a fresh state, and the state and batch
  shardings."""
  mesh = jax.make_mesh(
      (n_devices // fsdp, fsdp),
      sharding_lib.BATCH_AXES,
      axis_types=(AxisType.Auto,) * 2,
      devices=jax.devices()[:n_devices],
  )
  data = sharding_lib.data_sharding(mesh)
  graphdef, state, tx = state_lib.create_train_state(
      config, sizes=state_lib.carried_sizes(config, root)
  )
  st_sh = sharding_lib.state_shardings(state, mesh)
  fn = jax.jit(
      steps.make_dastc_step(config, graphdef, tx),
      in_shardings=(st_sh, data),
      out_shardings=(st_sh, sharding_lib.replicated(mesh)),
  )
  return fn, state, st_sh, data


def _step_fn(config, root, n_devices, fsdp=1):
  """``jitted_step`` as a host-to-host function, and the fresh state."""
  fn, state, st_sh, data = jitted_step(config, root, n_devices, fsdp)

  def run(st, batch):
    st, m = fn(jax.device_put(st, st_sh), sharding_lib.shard_batch(batch, data))
    return jax.device_get(st), jax.device_get(m)

  return run, jax.device_get(state)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _assert_same_metrics(a, b):
  assert set(a) == set(b)
  for k in (
      'loss',
      'loss_src',
      'loss_cons',
      'loss_src_mix',
      'loss_tgt_mix',
      'loss_align',
      'grad_norm',
      'pl_accuracy',
  ):
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_dastc_step_is_the_same_on_1_device_and_4_fsdp_devices(smoke_config):
  """Each step is the same function of (state, batch) on 1 device and on 4
  devices that split the batch and shard the parameters, teacher and
  optimizer state (fsdp=4).

  Both steps start from the same state on both meshes: chaining the two
  runs separately would let float32 reduction-order noise flip argmax ties
  of the barely trained model (pseudo-labels, prototype membership), which
  says nothing about the sharding.
  """
  c = smoke_config
  c.train.source_only_steps = 0
  c.optim.name, c.optim.lr, c.optim.momentum = 'sgd', 0.01, 0.9
  root = train.resolve_data_root(c)
  it = iter(pipeline.make_train_dataset(c, root, local_batch_size=4))
  batches = [next(it), next(it)]
  run1, init = _step_fn(c, root, 1)
  run4, _ = _step_fn(c, root, 4, fsdp=4)
  s1, m1 = run1(init, batches[0])
  s4, m4 = run4(init, batches[0])
  _assert_same_metrics(m1, m4)
  # The total is the documented combination of the logged terms.
  d = c.dastc
  total = (
      m1['loss_src']
      + m1['loss_src_mix']
      + d.lambda_t * (m1['loss_cons'] + m1['loss_tgt_mix'])
      + d.alignment.weight * m1['loss_align']
  )
  np.testing.assert_allclose(m1['loss'], total, rtol=1e-6)
  assert m1['feat_rel_diff_to_s_f0'] > 0 or m1['feat_rel_diff_to_t_f0'] > 0
  # First adaptation step: the teacher is reset to the warm-started model,
  # then takes one EMA step towards the updated student.
  a = d.ema_decay
  ema = lambda p0, p1: a * p0 + (1 - a) * p1
  chex.assert_trees_all_close(
      s1.teacher['params'],
      jax.tree.map(ema, init.params, s1.params),
      rtol=1e-5,
      atol=1e-7,
  )
  for k in ('tgt_labels', 'tgt_masks', 'src_frames'):
    np.testing.assert_array_equal(
        np.asarray(s1.carried[k]), np.asarray(s4.carried[k])
    )
  # Parameters agree to float32 noise. The *updates* of the convolutions
  # under a train-mode BatchNorm are small differences (the BN backward
  # subtracts two batch means from the incoming gradient), so reduction-order
  # noise is ~1e-3 of them (measured 5e-4 overall); a wrong sharding (e.g.
  # per-device BN statistics) changes them at O(1).
  p1, p4, p0 = _flat(s1.params), _flat(s4.params), _flat(init.params)
  assert np.linalg.norm(p4 - p1) / np.linalg.norm(p1) < 1e-6
  u1, u4 = p1 - p0, p4 - p0
  assert np.linalg.norm(u1) > 1e-3
  assert np.linalg.norm(u4 - u1) / np.linalg.norm(u1) < 5e-3
  # The second step pastes from the carried state of the first.
  t1, m1 = run1(s1, batches[1])
  t4, m4 = run4(s1, batches[1])
  _assert_same_metrics(m1, m4)
  # Second step: no reset, one more EMA step from the first step's teacher.
  chex.assert_trees_all_close(
      t1.teacher['params'],
      jax.tree.map(ema, s1.teacher['params'], t1.params),
      rtol=1e-5,
      atol=1e-7,
  )
  assert bool(t1.carried['has_prev']) and bool(t4.carried['has_prev'])
  np.testing.assert_array_equal(
      np.asarray(t1.carried['src_frames']), batches[1]['source']['frames']
  )
  np.testing.assert_array_equal(
      np.asarray(t4.carried['src_frames']), batches[1]['source']['frames']
  )
  chex.assert_trees_all_close(t4.teacher, t1.teacher, rtol=1e-5, atol=1e-6)


def test_reference_preset_trains_and_its_self_teacher_updates_bn(smoke_config):
  """The released code's training: frozen teacher, then the student itself
  in train mode (its pass updates the BN averages), mirrored teacher input,
  MMD, every bug flag."""
  c = smoke_config
  common.reference(c)
  c.dastc.teacher_switch_steps = 1
  c.dastc.teacher_flip = 1.0
  c.train.source_only_steps = 0
  root = train.resolve_data_root(c)
  it = iter(pipeline.make_train_dataset(c, root, local_batch_size=4))
  batches = [next(it), next(it)]
  run, init = _step_fn(c, root, 1)
  s, m = run(init, batches[0])
  t, m2 = run(s, batches[1])
  for metrics in (m, m2):
    for k in (
        'loss',
        'loss_src',
        'loss_cons',
        'loss_src_mix',
        'loss_tgt_mix',
        'loss_align',
    ):
      assert np.isfinite(metrics[k]), k
  # The reference's per-pair aggregation with uniform weights.
  assert m['loss_align'] > 0 and m['align_w/strong'] == 0.5
  assert m['align_w/clean'] == 0.5
  graphdef, _, _ = state_lib.create_train_state(
      c, sizes=state_lib.carried_sizes(c, root)
  )
  tgt = batches[1]['target']

  @jax.jit
  def teacher_stats(state):
    x = image_ops.normalize(tgt['frames'])
    _, _, stats, _ = dastc_step._pseudo_labels(  # pylint: disable=protected-access
        c,
        graphdef,
        None,
        state,
        x,
        tgt,
        x.shape[2:4],
        0,
        jax.random.key(0),
        jax.random.key(1),
    )
    return stats

  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert same(teacher_stats(init), init.batch_stats)  # frozen teacher
  assert not same(teacher_stats(s), s.batch_stats)  # student, train mode


def test_image_domain_dastc_step_has_no_flow_and_no_temporal_terms(world_cache):
  """DA-STC with clip length 1 (configs/gta5.py): single frames, no flows,
  the teacher labels frame t itself, one alignment pair."""
  from configs import gta5  # pylint: disable=g-import-not-at-top

  c = gta5.get_config('smoke')
  c.data.synthetic.cache_dir = world_cache
  c.train.source_only_steps = 0
  c.dastc.teacher_flip = 1.0  # the mirrored teacher input, unmirrored back
  root = train.resolve_data_root(c)
  it = iter(pipeline.make_train_dataset(c, root, local_batch_size=4))
  batches = [next(it), next(it)]
  src, tgt = batches[0]['source'], batches[0]['target']
  assert src['frames'].shape == (4, 1, 32, 48, 3)  # random 32x48 crops
  assert src['labels'].shape == (4, 1, 32, 48)
  assert tgt['frames'].shape == (4, 1, 32, 48, 3)
  assert not any(k.startswith('flow') for k in (*src, *tgt))
  assert set(np.unique(src['labels'])) <= set(range(19)) | {255}
  run, init = _step_fn(c, root, 1)
  assert 'sf_layer' not in init.params  # no score fusion in DeepLabv2
  assert 'src_flow' not in init.carried
  assert init.carried['tgt_masks'].shape == (4, 1, 32, 48)
  s, m = run(init, batches[0])
  s, m2 = run(s, batches[1])  # pastes from the carried single frames
  for metrics in (m, m2):
    for k in (
        'loss',
        'loss_src',
        'loss_cons',
        'loss_src_mix',
        'loss_tgt_mix',
        'loss_align',
    ):
      assert np.isfinite(metrics[k]), k
  # Frame t of the strong pass is the only target view (no key frames).
  assert [k for k in m2 if k.startswith('align_w/')] == ['align_w/t_strong']
  assert bool(s.carried['has_prev'])
  np.testing.assert_array_equal(
      s.carried['src_frames'], batches[1]['source']['frames']
  )


def test_ablations_share_the_batchnorm_running_averages(smoke_config):
  """With ``bn_update='fixed'`` the running averages come from the source
  and strong target passes only: turning fusion and alignment off (five
  passes fewer) leaves them bitwise unchanged."""
  c = smoke_config
  c.train.source_only_steps = 0
  # The sharding test's optimizer: its 1-device step is this full one.
  c.optim.name, c.optim.lr, c.optim.momentum = 'sgd', 0.01, 0.9
  root = train.resolve_data_root(c)
  batch = next(iter(pipeline.make_train_dataset(c, root, local_batch_size=4)))
  run, init = _step_fn(c, root, 1)
  full, _ = run(init, batch)
  c2 = c.copy_and_resolve_references()
  c2.dastc.image_fusion = c2.dastc.feature_fusion = False
  c2.dastc.alignment.kind = 'none'
  run2, _ = _step_fn(c2, root, 1)
  bare, _ = run2(init, batch)
  chex.assert_trees_all_equal(full.batch_stats, bare.batch_stats)
  assert not jax.tree.all(
      jax.tree.map(np.array_equal, full.batch_stats, init.batch_stats)
  )


def test_quality_weighting_scales_the_pseudo_label_losses(world_cache):
  """``pl_weighting='quality'``: a threshold no probability reaches
  weights the consistency and target-context losses to zero and leaves the
  source losses (weight 1 equals the plain loss: tests/test_losses.py);
  class-balanced selection keeps about half the labels. On the image-domain
  step (the weighting is the same code for clips), whose
  plain program the test above has compiled."""
  from configs import gta5  # pylint: disable=g-import-not-at-top

  c = gta5.get_config('smoke')
  c.data.synthetic.cache_dir = world_cache
  c.train.source_only_steps = 0
  c.dastc.teacher_flip = 1.0
  root = train.resolve_data_root(c)
  batch = next(iter(pipeline.make_train_dataset(c, root, local_batch_size=4)))
  out = {}
  for name, weighting, threshold in (
      ('plain', 'none', 0.968),
      ('none', 'quality', 1.0),
  ):
    c2 = c.copy_and_resolve_references()
    c2.dastc.pl_weighting = weighting
    c2.dastc.pl_quality_threshold = threshold
    # The weighted run also selects class-balanced (CBST) labels: half of
    # each class's pixels stay (one compiled program for both options).
    c2.dastc.pl_class_balanced = 0.5 if weighting == 'quality' else 0.0
    run, init = _step_fn(c2, root, 1)
    out[name] = run(init, batch)[1]
  assert float(out['none']['pl_quality']) == 0.0
  assert 'pl_quality' not in out['plain']
  assert 0.4 <= float(out['none']['pl_kept']) <= 0.6
  assert 'pl_kept' not in out['plain']
  assert float(out['plain']['loss_cons']) > 0.1
  assert float(out['none']['loss_cons']) == 0.0
  assert float(out['none']['loss_tgt_mix']) == 0.0
  np.testing.assert_allclose(
      out['none']['loss_src'], out['plain']['loss_src'], rtol=1e-5
  )
