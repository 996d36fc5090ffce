"""Teachers, cross-frame pseudo-labels, strong augmentation, histograms."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from dastc_jax.data import transforms
from dastc_jax.method import pseudo_labels
from dastc_jax.ops import augment
from dastc_jax.ops import warp


def test_ema_update_arithmetic():
  teacher = {'w': jnp.asarray([1.0, 2.0]), 'b': {'v': jnp.asarray(4.0)}}
  student = {'w': jnp.asarray([3.0, 0.0]), 'b': {'v': jnp.asarray(0.0)}}
  out = pseudo_labels.ema_update(teacher, student, 0.9)
  np.testing.assert_allclose(np.asarray(out['w']), [1.2, 1.8], rtol=1e-6)
  np.testing.assert_allclose(float(out['b']['v']), 3.6, rtol=1e-6)


def test_teacher_scores_of_t_minus_1_are_warped_to_t():
  # Teacher scores of frame t-1: class = column // 4 (4 classes, 16 cols).
  h, w, c = 8, 16, 4
  cls = np.repeat(np.arange(w) // 4, 1)[None, :].repeat(h, 0)
  pred = jnp.asarray(np.eye(c)[cls][None] * 10.0, jnp.float32)
  # Frame t content is frame t-1 shifted right by 4 px: flow t->t-1 = -4.
  flow = jnp.zeros((1, h, w, 2)).at[..., 0].set(-4.0)
  pl = pseudo_labels.cross_frame(pred, pred, flow, (h, w))
  expected = np.maximum(np.arange(w) - 4, 0) // 4
  np.testing.assert_array_equal(np.asarray(pl['label_t'][0, 3]), expected)
  np.testing.assert_array_equal(
      np.asarray(pl['label_t1'][0, 3]), np.arange(w) // 4
  )
  assert float(pl['conf_t'].max()) <= 1.0  # a probability
  logit_conf = pseudo_labels.cross_frame(
      pred, pred, flow, (h, w), confidence_from_logit=True
  )
  np.testing.assert_allclose(float(logit_conf['conf_t1'].max()), 10.0)


def test_reference_teacher_switch():
  assert not bool(pseudo_labels.use_student(jnp.asarray(8099), 100, 8000))
  assert bool(pseudo_labels.use_student(jnp.asarray(8100), 100, 8000))


def _aug_cfg(**kw):
  c = common.dastc_config().strong_aug
  for k, v in kw.items():
    c[k] = v
  return c


def test_strong_augmentation_uses_one_parameter_set_per_clip():
  frame = jax.random.randint(jax.random.key(0), (3, 1, 16, 20, 3), 0, 255)
  clip = jnp.concatenate([frame, frame], 1).astype(jnp.uint8)
  out = np.asarray(
      augment.strong_augment(
          jax.random.key(1), clip, _aug_cfg(p_blur=1.0, p_jitter=1.0)
      )
  )
  np.testing.assert_allclose(out[:, 0], out[:, 1], atol=1e-4)
  assert not np.allclose(out[0, 0], out[1, 0])  # clips differ
  gray = np.asarray(
      augment.strong_augment(
          jax.random.key(2),
          clip,
          _aug_cfg(p_blur=0.0, p_jitter=0.0, p_gray=1.0),
      )
  )
  rgb = (
      gray[..., ::-1]
      + np.asarray([104.00698793, 116.66876762, 122.67891434])[::-1]
  )
  np.testing.assert_allclose(rgb[..., 0], rgb[..., 1], atol=1e-3)
  off = np.asarray(
      augment.strong_augment(jax.random.key(3), clip, _aug_cfg(enabled=False))
  )
  bgr = np.asarray(clip, np.float64)[..., ::-1] - [
      104.00698793,
      116.66876762,
      122.67891434,
  ]
  np.testing.assert_allclose(off, bgr, atol=1e-3)


def test_blur_follows_the_input_width():
  """sigma is stated at blur_reference_width and scales with the clip's
  width; the kernel holds 3 sigma; the blur is a normalised Gaussian
  (scipy's, away from the border)."""
  import scipy.ndimage  # pylint: disable=g-import-not-at-top

  cfg = _aug_cfg()  # (5, 9) px at 1024 wide, blur_kernel=0
  assert augment.blur_params(cfg, 512, 1024) == (5.0, 9.0, 55)
  assert augment.blur_params(cfg, 256, 512) == (2.5, 4.5, 29)
  lo, hi, taps = augment.blur_params(cfg, 32, 64)
  assert (lo, hi, taps) == (5 / 16, 9 / 16, 5)
  # Never wider than the reflect padding of a small clip allows.
  assert augment.blur_params(_aug_cfg(blur_kernel=0), 8, 1024)[2] == 15
  assert augment.blur_params(_aug_cfg(blur_kernel=9), 512, 1024)[2] == 9
  # A 512x512 crop of a 512x1024 frame keeps the frame's scale.
  assert augment.blur_params(cfg, 512, 512, image_width=1024) == (5.0, 9.0, 55)
  x = np.random.default_rng(0).uniform(0, 1, (1, 40, 48, 3)).astype('f')
  got = np.asarray(
      augment._gaussian_blur(  # pylint: disable=protected-access
          jnp.asarray(x), jnp.float32(2.0), 13
      )
  )
  want = scipy.ndimage.gaussian_filter(
      x, (0, 2.0, 2.0, 0), truncate=3.0, mode='mirror'
  )
  np.testing.assert_allclose(got[:, 8:-8, 8:-8], want[:, 8:-8, 8:-8], atol=1e-5)


def test_histogram_matching_takes_the_reference_distribution():
  rng = np.random.default_rng(0)
  ref = (2 * rng.integers(0, 128, (20, 30, 3))).astype(np.uint8)
  # An image with the same (even) values in another order, halved (an
  # injective, monotonic change): the match must restore the reference
  # histogram exactly.
  perm = rng.permutation(ref.reshape(-1, 3))
  img = (perm // 2).reshape(20, 30, 3).astype(np.uint8)
  out = transforms.match_histograms(img, ref)
  for c in range(3):
    np.testing.assert_array_equal(
        np.sort(out[..., c].ravel()), np.sort(ref[..., c].ravel())
    )
  # The order of pixels follows the input (monotonic mapping).
  order = np.argsort(img[..., 0].ravel(), kind='stable')
  assert np.all(np.diff(out[..., 0].ravel()[order].astype(int)) >= 0)


def test_reference_preset_sets_the_reference_choices():
  c = common.base_config()
  common.reference(c)
  assert c.dastc.alignment.kind == 'mmd' and c.dastc.alignment.weight == 0.01
  assert not c.dastc.feature_fusion and c.dastc.teacher == 'reference'
  assert all(c.dastc.bugs.values()) and c.dastc.strong_aug.wrap_normalized_bug
  assert c.dastc.teacher_flip == 0.5
  assert c.optim.constant_head_lr and not c.data.source.flip_negate_dx
  assert isinstance(c, ml_collections.ConfigDict)


def test_mirrored_flow_negates_dx():
  """warp(mirror(I), mirror(F)) == mirror(warp(I, F)) only when dx flips."""
  k = jax.random.split(jax.random.key(5), 2)
  img = jax.random.normal(k[0], (2, 9, 12, 3))
  flow = jax.random.uniform(k[1], (2, 9, 12, 2), minval=-2.0, maxval=2.0)
  flip = jnp.asarray([True, False])
  want = pseudo_labels.hflip(warp.warp(img, flow), flip)
  got = warp.warp(
      pseudo_labels.hflip(img, flip), pseudo_labels.hflip_flow(flow, flip)
  )
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  bug = warp.warp(
      pseudo_labels.hflip(img, flip),
      pseudo_labels.hflip_flow(flow, flip, negate_dx=False),
  )
  assert float(jnp.abs(bug[0] - want[0]).max()) > 0.1
  np.testing.assert_allclose(
      np.asarray(bug[1]), np.asarray(want[1]), atol=1e-5
  )  # not mirrored: unchanged
  np.testing.assert_array_equal(
      np.asarray(
          pseudo_labels.hflip_labels(
              jnp.arange(6).reshape(1, 2, 3), jnp.asarray([True])
          )
      ),
      [[[2, 1, 0], [5, 4, 3]]],
  )


def test_labels_outside_the_margins_are_ignored_on_every_grid():
  valid = np.zeros((2, 8, 12), np.uint8)
  valid[:, 2:6, 3:12] = 1  # margins: top 2, bottom 2, left 3
  valid[1] = 1  # the second clip's crop sees no margin
  pl = {
      'label_t': jnp.full((2, 8, 12), 4, jnp.int32),
      'label_lo': jnp.full((2, 4, 6), 4, jnp.int32),
      'conf_lo': jnp.ones((2, 4, 6)),
  }
  out = pseudo_labels.ignore_outside(pl, jnp.asarray(valid))
  want_t = np.where(valid > 0, 4, 255)
  np.testing.assert_array_equal(out['label_t'], want_t)
  # The 4x6 grid samples the frame at its cells' centres (rows 1, 3, 5, 7;
  # columns 1, 3, ..., 11).
  np.testing.assert_array_equal(out['label_lo'], want_t[:, 1::2, 1::2])
  np.testing.assert_array_equal(out['conf_lo'], pl['conf_lo'])


def test_class_balanced_selection_keeps_each_classes_most_confident_part():
  """CBST's per-class quantile: half of every class survives (its most
  confident half), also a small class the large one outranks everywhere;
  ignored pixels stay ignored; portion 0 changes nothing."""
  rng = np.random.default_rng(0)
  lab = np.zeros((2, 8, 8), np.uint8)  # class 0: large, confident
  conf = rng.uniform(0.9, 1.0, (2, 8, 8)).astype(np.float32)
  lab[:, :2, :4] = 3  # class 3: 16 pixels, all less confident
  conf[:, :2, :4] = rng.uniform(0.3, 0.5, (2, 2, 4))
  lab[0, 7, 7] = 255  # already ignored (a margin)
  pl = {'label_lo': jnp.asarray(lab), 'conf_lo': jnp.asarray(conf)}
  out = np.asarray(pseudo_labels.keep_class_top(pl, 0.5, 5)['label_lo'])
  for c in (0, 3):
    have = (lab == c).sum()
    kept = (out == c).sum()
    assert kept in (have // 2, (have + 1) // 2), (c, kept, have)
    # The kept ones are the most confident of their class.
    assert conf[out == c].min() >= conf[(lab == c) & (out == 255)].max()
  assert out[0, 7, 7] == 255
  # A global threshold that keeps as many pixels drops class 3 entirely.
  t = np.quantile(conf[lab != 255], 1 - (out != 255).mean())
  assert not ((lab == 3) & (conf >= t)).any()
  same = pseudo_labels.keep_class_top(pl, 0.0, 5)
  assert same['label_lo'] is pl['label_lo']


def test_class_balanced_thresholds_are_numpys_per_class_quantiles():
  """The one-sort selection keeps exactly the pixels at or above numpy's
  (linear) quantile of their class, on random labels with ignored pixels
  and an absent class."""
  rng = np.random.default_rng(1)
  lab = rng.integers(0, 6, (3, 9, 17)).astype(np.uint8)  # class 6 absent
  lab[rng.uniform(size=lab.shape) < 0.2] = 255
  conf = rng.uniform(0, 1, lab.shape).astype(np.float32)
  for portion in (0.3, 0.5, 0.9):
    got = np.asarray(
        pseudo_labels.keep_class_top(
            {'label_t': jnp.asarray(lab), 'conf_t': jnp.asarray(conf)},
            portion,
            7,
        )['label_t']
    )
    want = np.full_like(lab, 255)
    for c in range(7):
      m = lab == c
      if m.any():
        t = np.quantile(conf[m], 1 - portion)
        want[m & (conf >= t)] = c
    np.testing.assert_array_equal(got, want)
