"""The DA-STC step's parts, one by one, on hand-made inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic as synthetic_config
from dastc_jax.data import pipeline
from dastc_jax.method import dastc_step
from dastc_jax.method import pseudo_labels
from dastc_jax.ops import image as image_ops
from dastc_jax.runtime import state as state_lib
from dastc_jax import train


def _config():
  c = synthetic_config.get_config('smoke')
  c.model.num_classes = 15
  return c


def test_alignment_views_take_each_frame_with_its_own_labels():
  """Target views: frame t of both passes with the teacher's warped labels,
  key frame t-1 of the strong pass with the teacher's t-1 labels, key frame
  t-2 of the clean pass with its t-2 labels; reliability = the teacher's
  probability of the label. Source views: t and t-1 with the true labels
  where the prediction agrees."""
  c = _config()
  b, h, w, n = 2, 3, 4, 15
  k = iter(jax.random.split(jax.random.key(0), 16))
  logits = lambda: jax.random.normal(next(k), (b, h, w, n)) * 3
  feat = lambda: jax.random.normal(next(k), (b, h, w, 6))
  pl = {
      name: jax.nn.softmax(logits(), -1)
      for name in ('probs_lo', 'probs_t1_lo', 'probs_t2_lo')
  }
  strong = {
      'pred': logits(),
      'key_logits': logits(),
      'feat': feat(),
      'key_feat': feat(),
  }
  clean = {
      'pred': logits(),
      'key_logits': logits(),
      'feat': feat(),
      'key_feat': feat(),
  }
  src = {
      'pred': logits(),
      'key_logits': logits(),
      'feat': feat(),
      'key_feat': feat(),
  }
  labels_src = jnp.stack(
      [jnp.argmax(src['pred'], -1), jnp.full((b, h, w), 3)], 1
  )
  views_s, views_t = dastc_step._alignment_views(  # pylint: disable=protected-access
      c, src, labels_src, [('strong', strong), ('clean', clean)], pl
  )
  assert [n for n, _ in views_t] == ['t_strong', 't1', 't_clean', 't2']
  expect = [
      (strong['feat'], 'probs_lo'),
      (strong['key_feat'], 'probs_t1_lo'),
      (clean['feat'], 'probs_lo'),
      (clean['key_feat'], 'probs_t2_lo'),
  ]
  for (_, v), (f, probs) in zip(views_t, expect):
    assert v['feat'] is f
    lab = np.argmax(np.asarray(pl[probs]), -1)
    np.testing.assert_array_equal(np.asarray(v['label']), lab)
    np.testing.assert_allclose(
        np.asarray(v['reliability']),
        np.max(np.asarray(pl[probs]), -1),
        rtol=1e-6,
    )
  assert [n for n, _ in views_s] == ['t', 't1']
  (_, vt), (_, vt1) = views_s
  assert vt['feat'] is src['feat'] and vt1['feat'] is src['key_feat']
  # Frame t: the labels are the prediction, so all pixels are kept.
  np.testing.assert_array_equal(
      np.asarray(vt['label']), np.asarray(labels_src[:, 0])
  )
  # Frame t-1: class 3 only where the key frame's prediction says 3.
  agree = np.argmax(np.asarray(src['key_logits']), -1) == 3
  np.testing.assert_array_equal(
      np.asarray(vt1['label']), np.where(agree, 3, -1)
  )
  # The student's labels for membership: the passes' own argmax.
  c.dastc.alignment.target_labels = 'student'
  _, views_t = dastc_step._alignment_views(  # pylint: disable=protected-access
      c, src, labels_src, [('strong', strong), ('clean', clean)], pl
  )
  np.testing.assert_array_equal(
      np.asarray(views_t[1][1]['label']),
      np.argmax(np.asarray(strong['key_logits']), -1),
  )


def test_next_target_masks_use_each_frames_labels_and_skip_source_classes():
  """M_d from frame t's labels, M_c from frame t-1's, one class set per
  clip, confident pixels only, and never a class pasted from S'."""
  c = _config()
  c.dastc.num_target_classes = 2
  lab_t = jnp.asarray([[[1, 2, 3, 4]]])
  lab_t1 = jnp.asarray([[[4, 3, 2, 1]]])
  pl = {
      'label_t': lab_t,
      'label_t1': lab_t1,
      'conf_t': jnp.asarray([[[0.95, 0.95, 0.95, 0.5]]]),
      'conf_t1': jnp.full((1, 1, 4), 0.99),
  }
  for seed in range(8):
    m = dastc_step._next_target_masks(  # pylint: disable=protected-access
        jax.random.key(seed), c, pl, jnp.asarray([[2, -1]])
    )
    m = np.asarray(m)
    assert m.shape == (1, 2, 1, 4)
    # Class 2 (an S' class) is never picked; two of {1, 3, 4} are.
    assert not m[0, 0, 0, 1] and not m[0, 1, 0, 2]
    picked = {int(x) for x in np.asarray(lab_t)[0, 0][m[0, 0, 0]]}
    assert not m[0, 0, 0, 3]  # class 4 at t is not confident
    t1_classes = {int(x) for x in np.asarray(lab_t1)[0, 0][m[0, 1, 0]]}
    assert picked <= t1_classes and 2 not in t1_classes
    assert len(t1_classes) == 2


def test_config_validation_names_the_key():
  c = _config()
  c.dastc.feature_layer = 'layer4'
  with pytest.raises(ValueError, match='config.dastc.feature_layer'):
    train.check_config(c)
  c.dastc.feature_layer = 'lyer1'
  with pytest.raises(ValueError, match='config.dastc.feature_layer'):
    train.check_config(c)
  c = _config()
  c.dastc.alignment.aggregation = 'time'
  with pytest.raises(ValueError, match='config.dastc.alignment.aggregation'):
    train.check_config(c)
  c = _config()
  c.dastc.image_fusion = False
  with pytest.raises(ValueError, match='config.dastc.feature_fusion'):
    train.check_config(c)
  c = _config()
  c.method = 'source_only_hm'
  c.data.histogram_match = False
  with pytest.raises(ValueError, match='histogram_match'):
    train.check_config(c)
  c = _config()
  c.dastc.frozen_teacher.weights = 'weights/tps'  # with the EMA teacher
  with pytest.raises(ValueError, match='config.dastc.frozen_teacher.weights'):
    train.check_config(c)
  c.dastc.teacher = 'reference'
  c.dastc.frozen_teacher.model_name = 'deeplabv2'  # single frames
  with pytest.raises(ValueError, match='frozen_teacher.model_name'):
    train.check_config(c)
  c.dastc.frozen_teacher.model_name = 'accel_deeplabv2'
  c.dastc.frozen_teacher.head = 'layer6'
  with pytest.raises(ValueError, match='config.dastc.frozen_teacher.head'):
    train.check_config(c)


def test_pseudo_label_metrics_show_per_class_shares():
  names = ('a', 'b', 'c')
  pl = jnp.asarray([[0, 0, 0, 1]])
  gt = jnp.asarray([[0, 1, 1, 255]])
  m = dastc_step.pseudo_label_metrics(pl, gt, names)
  np.testing.assert_allclose(float(m['pl_accuracy']), 1 / 3)
  np.testing.assert_allclose(float(m['pl_share/a']), 1.0)  # of valid pixels
  np.testing.assert_allclose(float(m['pl_true_share/a']), 1 / 3)
  np.testing.assert_allclose(float(m['pl_correct_share/a']), 1 / 3)
  np.testing.assert_allclose(float(m['pl_true_share/b']), 2 / 3)
  assert float(m['pl_correct_share/b']) == 0.0
  assert all(np.isfinite(float(v)) for v in m.values())  # c is absent


def test_mirrored_teacher_input_gives_mirrored_pseudo_labels(smoke_config):
  """End to end through the teacher: mirroring the target clip (frames and
  flows, dx negated) and letting the teacher mirror it back
  (``teacher_flip=1``) gives the mirror image of the plain labels."""
  c = smoke_config
  c.train.source_only_steps = 0
  root = train.resolve_data_root(c)
  batch = next(iter(pipeline.make_train_dataset(c, root, local_batch_size=4)))
  tgt, src_labels = batch['target'], batch['source']['labels']
  graphdef, state, _ = state_lib.create_train_state(
      c, sizes=state_lib.carried_sizes(c, root)
  )
  ones = jnp.ones((4,), bool)
  mirrored = {'frames': tgt['frames'][:, :, :, ::-1]}
  for k in ('flow', 'flow_t_t2', 'flow_t1_t2'):
    mirrored[k] = pseudo_labels.hflip_flow(jnp.asarray(tgt[k]), ones)

  def labels(flip, clip):
    c.dastc.teacher_flip = flip
    x = image_ops.normalize(clip['frames'])
    pl, _, _, _ = jax.jit(
        lambda s: dastc_step._pseudo_labels(  # pylint: disable=protected-access
            c,
            graphdef,
            None,
            s,
            x,
            clip,
            x.shape[2:4],
            0,
            jax.random.key(0),
            jax.random.key(1),
            src_labels,
        )
    )(state)
    return jax.device_get(pl)

  plain = labels(0.0, tgt)
  back = labels(1.0, mirrored)
  # The test can tell: the plain result is far from its own mirror image.
  assert np.abs(plain['probs_lo'] - plain['probs_lo'][:, :, ::-1]).max() > 1e-2
  for k in ('probs_lo', 'probs_t1_lo', 'probs_t2_lo'):
    np.testing.assert_allclose(
        back[k], plain[k][:, :, ::-1], atol=2e-4, err_msg=k
    )
  for k in ('label_t', 'label_t1'):
    same = np.mean(back[k] == plain[k][:, :, ::-1])
    assert same > 0.99, (k, same)  # ties of an untrained model aside


def test_frozen_teacher_is_a_separate_model_on_the_student_grid(
    world_cache, tmp_path
):
  """The ViT ``:reference`` run with a frozen TPS teacher
  (``dastc.frozen_teacher``): the teacher is the ACCEL-DeepLab with the
  ``aspp`` head loaded from its own weights folder (not the student, never
  reset), and its scores of frame t-1, resized to the student's 1/4 grid
  from its own 1/8 grid, are the pseudo-label probabilities."""
  from configs import viper_vit  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from dastc_jax.ops import warp as warp_ops  # pylint: disable=g-import-not-at-top

  c = viper_vit.get_config('reference,smoke')
  c.data.synthetic.cache_dir = world_cache
  c.dastc.teacher_flip = 0.0
  c.train.source_only_steps = 0
  c.dastc.frozen_teacher.weights = str(tmp_path / 'tps')
  teacher_cfg = state_lib.frozen_teacher_model(c)
  assert (teacher_cfg.name, teacher_cfg.head) == ('accel_deeplabv2', 'aspp')
  t_graphdef, t_params, t_stats = state_lib.init_model(
      type(c)({'model': teacher_cfg}), seed=7
  )
  ckpt = checkpointing.Checkpointer(
      str(tmp_path / 'tps' / 'checkpoints'), async_save=False
  )
  ckpt.save(0, {'params': t_params, 'batch_stats': t_stats})
  ckpt.close()
  train.check_config(c)
  root = train.resolve_data_root(c)
  batch = next(iter(pipeline.make_train_dataset(c, root, local_batch_size=4)))
  graphdef, state, _ = state_lib.create_train_state(
      c, sizes=state_lib.carried_sizes(c, root)
  )
  # A ResNet teacher beside the MiT student.
  assert 'layer1' in state.teacher['params']['backbone']
  assert 'block1' in state.params['backbone']
  state = state_lib.load_frozen_teacher(c, state)
  chex.assert_trees_all_equal(state.teacher['params'], t_params)
  tgt = batch['target']
  x = image_ops.normalize(tgt['frames'])
  pl, teacher, _, _ = jax.jit(
      lambda s: dastc_step._pseudo_labels(  # pylint: disable=protected-access
          c,
          graphdef,
          state_lib.frozen_teacher_graphdef(c),
          s,
          x,
          tgt,
          x.shape[2:4],
          0,
          jax.random.key(0),
          jax.random.key(1),
          batch['source']['labels'],
      )
  )(state)
  chex.assert_trees_all_equal(teacher, state.teacher)  # not reset
  from flax import nnx  # pylint: disable=g-import-not-at-top

  pred = jax.jit(
      lambda p, st: nnx.merge(t_graphdef, p, st).clip(
          x[:, 1:3], jnp.asarray(tgt['flow_t1_t2']), train=False
      )['pred']
  )(t_params, t_stats)
  grid = pl['probs_t1_lo'].shape[1:3]
  # The student's 1/4 grid; the teacher's is 1/8: a real resize.
  assert grid == (x.shape[2] // 4, x.shape[3] // 4)
  assert pred.shape[1:3] != grid
  want = jax.nn.softmax(warp_ops.resize_bilinear(pred, grid), -1)
  np.testing.assert_allclose(pl['probs_t1_lo'], want, atol=1e-5)


def test_distribution_alignment_shifts_scores_towards_the_source_prior():
  """The adjustment is log(source prior / target prior): a class the teacher
  over-predicts relative to the source is pushed down; the running priors
  start at the first batch and then move by (1 - momentum)."""
  c = _config()
  c.model.num_classes = 3
  c.dastc.prior_momentum = 0.5
  src = jnp.asarray([[[[0, 0, 1, 2]]]])  # source: 1/2, 1/4, 1/4
  logits = jnp.log(jnp.asarray([0.1, 0.8, 0.1]))[None, None, None]
  carried = {
      'class_prior': {'source': jnp.zeros(3), 'target': jnp.zeros(3)},
      'has_prev': jnp.asarray(False),
  }
  state = state_lib.TrainState(
      step=0,
      params=None,
      batch_stats=None,
      opt_state=None,
      rng=None,
      carried=carried,
  )
  prior, adjust = dastc_step._class_priors(c, state, src, logits)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(prior['source']), [0.5, 0.25, 0.25])
  np.testing.assert_allclose(
      np.asarray(prior['target']), [0.1, 0.8, 0.1], rtol=1e-6
  )
  np.testing.assert_allclose(
      np.asarray(adjust), np.log([5.0, 0.3125, 2.5]), rtol=1e-5
  )
  adjusted = jax.nn.softmax(logits + adjust)[0, 0, 0]
  assert int(jnp.argmax(adjusted)) == 0  # class 1 no longer wins
  state = state.replace(
      carried={'class_prior': prior, 'has_prev': jnp.asarray(True)}
  )
  prior2, _ = dastc_step._class_priors(  # pylint: disable=protected-access
      c, state, jnp.asarray([[[[2, 2, 2, 2]]]]), logits
  )
  np.testing.assert_allclose(np.asarray(prior2['source']), [0.25, 0.125, 0.625])
