"""Image-sequence-level and shallow-feature-level fusion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dastc_jax.method import fusion

C = 6


def _labels(key, b, h=8, w=10):
  return jax.random.randint(key, (b, 2, h, w), 0, C)


def test_pick_classes_returns_present_distinct_classes():
  label = jnp.asarray([[0, 0, 3], [3, 5, 255]])
  for seed in range(5):
    picked = np.asarray(fusion.pick_classes(jax.random.key(seed), label, 2, C))
    assert len(set(picked)) == 2 and set(picked) <= {0, 3, 5}
  only = np.asarray(
      fusion.pick_classes(
          jax.random.key(0), label, 4, C, exclude=jnp.asarray([3, -1])
      )
  )
  assert sorted(only[:2]) == [0, 5] and list(only[2:]) == [-1, -1]


def _masks(seed=0, b=3, has_prev=True):
  k = jax.random.split(jax.random.key(seed), 4)
  prev_src_labels = _labels(k[0], b)
  rare_labels = jax.random.randint(k[1], (b, 2, 8, 10), 0, C)
  rare_classes = jnp.asarray([[4, 5], [4, -1], [5, 4]])[:b]
  prev_tgt_masks = jax.random.bernoulli(k[2], 0.2, (b, 2, 8, 10))
  m = fusion.sample_masks(
      k[3],
      prev_src_labels=prev_src_labels,
      rare_labels=rare_labels,
      rare_classes=rare_classes,
      prev_tgt_masks=prev_tgt_masks,
      has_prev=jnp.asarray(has_prev),
      num_classes=C,
      num_source_classes=2,
      rare_class_list=(1,),
  )
  return m, prev_src_labels, rare_labels, rare_classes, prev_tgt_masks


def test_one_class_set_per_clip_applied_to_each_frame():
  m, labels, rare_labels, rare_classes, tgt = _masks()
  for b in range(3):
    classes = set(np.asarray(m['source_classes'][b]).tolist()) | {1}
    for f in range(2):  # the same class set, each frame's own labels
      expected = np.isin(np.asarray(labels[b, f]), list(classes))
      np.testing.assert_array_equal(np.asarray(m['src'][b, f]), expected)
    for k in range(2):
      expected = (np.asarray(rare_labels[b, k]) == int(rare_classes[b, k])) & (
          int(rare_classes[b, k]) >= 0
      )
      np.testing.assert_array_equal(np.asarray(m['rare'][b, k]), expected)
  np.testing.assert_array_equal(np.asarray(m['tgt']), np.asarray(tgt))
  assert float(m['lt'].max()) <= 1.0
  off, *_ = _masks(has_prev=False)  # first adaptation step: no S'/T'
  assert not bool(off['src'].any()) and not bool(off['tgt'].any())
  assert bool(off['rare'].any())


def test_mixed_labels_agree_with_mixed_images_and_flows_share_masks():
  m, labels, _, rare_classes, _ = _masks(seed=1)
  b, h, w = 3, 8, 10
  # Each source is a constant image value: base 0, S' 1, patch k 2+k, T' 9.
  const = lambda v, shape: jnp.full(shape, float(v))
  base_labels = jnp.full((b, 2, h, w), 0)
  tgt_labels = jnp.full((b, 2, h, w), 3)
  x, y = fusion.compose(
      const(0, (b, 2, h, w, 3)),
      base_labels,
      prev_src=const(1, (b, 2, h, w, 3)),
      prev_src_labels=labels,
      rare=jnp.stack([const(2, (b, h, w, 3)), const(3, (b, h, w, 3))], 1),
      prev_tgt=const(9, (b, 2, h, w, 3)),
      prev_tgt_labels=tgt_labels,
      masks=m,
  )
  x, y = np.asarray(x)[..., 0], np.asarray(y)
  for bi in range(b):
    for f in range(2):
      for i in range(h):
        for j in range(w):
          v = x[bi, f, i, j]
          if v == 0:
            assert y[bi, f, i, j] == 0
          elif v == 1:
            assert y[bi, f, i, j] == labels[bi, f, i, j]
          elif v in (2, 3):
            assert y[bi, f, i, j] == rare_classes[bi, int(v) - 2]
          else:
            assert v == 9 and y[bi, f, i, j] == 3
  # Paste order: T' over long-tail patches over S' over the base.
  assert np.all(x[np.asarray(m['tgt'])] == 9)
  flow = fusion.mix_flow(
      jnp.zeros((b, h, w, 2)),
      prev_src_flow=jnp.ones((b, h, w, 2)),
      prev_tgt_flow=jnp.full((b, h, w, 2), 2.0),
      masks=m,
      key_frame_masks=False,
  )
  expected = np.where(
      np.asarray(m['tgt'][:, 0]),
      2.0,
      np.where(np.asarray(m['src'][:, 0]), 1.0, 0.0),
  )
  np.testing.assert_array_equal(np.asarray(flow)[..., 0], expected)
  ref = fusion.mix_flow(
      jnp.zeros((b, h, w, 2)),
      prev_src_flow=jnp.ones((b, h, w, 2)),
      prev_tgt_flow=jnp.full((b, h, w, 2), 2.0),
      masks=m,
      key_frame_masks=True,
  )  # the reference's t-1 masks
  expected = np.where(
      np.asarray(m['tgt'][:, 1]),
      2.0,
      np.where(np.asarray(m['src'][:, 1]), 1.0, 0.0),
  )
  np.testing.assert_array_equal(np.asarray(ref)[..., 0], expected)


def test_feature_mix_is_identity_on_an_empty_mask():
  k = jax.random.split(jax.random.key(0), 2)
  fs = jax.random.normal(k[0], (2, 4, 5, 8))
  ft = jax.random.normal(k[1], (2, 4, 5, 8))
  s2, t2, info = fusion.feature_mix(fs, ft, jnp.zeros((2, 16, 20)), 0.3)
  np.testing.assert_array_equal(np.asarray(s2), np.asarray(fs))
  np.testing.assert_array_equal(np.asarray(t2), np.asarray(ft))
  assert float(info['feat_rel_diff']) == 0.0
  assert float(info['mix_area']) == 0.0
  s3, t3, info = fusion.feature_mix(fs, ft, jnp.ones((2, 16, 20)), 0.3)
  ref = np.linalg.norm(fs - ft) / np.linalg.norm(ft)
  np.testing.assert_allclose(float(info['feat_rel_diff']), ref, rtol=1e-5)
  assert float(info['mix_area']) == 1.0
  np.testing.assert_allclose(np.asarray(s3), 0.7 * fs + 0.3 * ft, atol=1e-6)
  np.testing.assert_allclose(np.asarray(t3), 0.7 * ft + 0.3 * fs, atol=1e-6)


def test_crop_takes_the_window_per_example():
  x = jnp.arange(2 * 2 * 6 * 7).reshape(2, 2, 6, 7)
  out = fusion.crop(x, jnp.asarray([[1, 2], [0, 3]]), (4, 3), False)
  np.testing.assert_array_equal(
      np.asarray(out[0]), np.asarray(x[0, :, 1:5, 2:5])
  )
  np.testing.assert_array_equal(
      np.asarray(out[1]), np.asarray(x[1, :, 0:4, 3:6])
  )


def test_swap_masks_take_current_classes_outside_the_pastes():
  """to_t: the picked current source classes, frame by frame; to_s: picked
  confident pseudo-label classes other than those; pasted pixels never."""
  b, h, w = 3, 6, 8
  rng = np.random.default_rng(0)
  src = jnp.asarray(rng.integers(0, 4, (b, 2, h, w)))
  tgt = jnp.asarray(rng.integers(0, 4, (b, 2, h, w)))
  conf = jnp.asarray(rng.random((b, 2, h, w)) > 0.3)
  pasted = jnp.zeros((b, 2, h, w), bool).at[:, :, :2].set(True)
  m = fusion.swap_masks(
      jax.random.key(1),
      src_labels=src,
      tgt_labels=tgt,
      tgt_confident=conf,
      pasted=pasted,
      num_classes=4,
      num_swap_classes=1,
      directions='both',
  )
  for i in range(b):
    ks, kt = int(m['src_classes'][i, 0]), int(m['tgt_classes'][i, 0])
    assert ks >= 0 and kt >= 0 and ks != kt  # one class set per clip
    np.testing.assert_array_equal(
        np.asarray(m['to_t'][i]),
        (np.asarray(src[i]) == ks) & ~np.asarray(pasted[i]),
    )
    np.testing.assert_array_equal(
        np.asarray(m['to_s'][i]),
        (np.asarray(tgt[i]) == kt)
        & np.asarray(conf[i])
        & ~np.asarray(pasted[i]),
    )
  # Labels follow every frame's mask, flows frame t's (their grid).
  ys, yt = jnp.zeros((b, 2, h, w), int), jnp.ones((b, 2, h, w), int)
  fs, ft = jnp.zeros((b, h, w, 2)), jnp.ones((b, h, w, 2))
  (_, ys2, fs2), (_, yt2, ft2) = fusion.apply_swap(
      m, (None, ys, fs), (None, yt, ft)
  )
  np.testing.assert_array_equal(np.asarray(ys2), np.asarray(m['to_s']))
  np.testing.assert_array_equal(np.asarray(yt2), ~np.asarray(m['to_t']))
  np.testing.assert_array_equal(
      np.asarray(fs2[..., 0]), np.asarray(m['to_s'][:, 0])
  )
  np.testing.assert_array_equal(
      np.asarray(ft2[..., 0]), ~np.asarray(m['to_t'][:, 0])
  )


@pytest.mark.parametrize('directions', ['to_target', 'to_source'])
def test_swap_masks_in_one_direction_leave_the_other_empty(directions):
  rng = np.random.default_rng(0)
  src = jnp.asarray(rng.integers(0, 4, (3, 2, 6, 8)))
  tgt = jnp.asarray(rng.integers(0, 4, (3, 2, 6, 8)))
  kw = dict(
      src_labels=src,
      tgt_labels=tgt,
      tgt_confident=jnp.ones((3, 2, 6, 8), bool),
      pasted=jnp.zeros((3, 2, 6, 8), bool),
      num_classes=4,
      num_swap_classes=1,
  )
  both = fusion.swap_masks(jax.random.key(1), directions='both', **kw)
  one = fusion.swap_masks(jax.random.key(1), directions=directions, **kw)
  kept, emptied = (
      ('to_t', 'to_s') if directions == 'to_target' else ('to_s', 'to_t')
  )
  assert np.asarray(both[emptied]).any() and not np.asarray(one[emptied]).any()
  np.testing.assert_array_equal(np.asarray(one[kept]), np.asarray(both[kept]))


def test_feature_swap_exchanges_inside_the_masks_only():
  k = jax.random.split(jax.random.key(0), 2)
  fs = jax.random.normal(k[0], (1, 4, 5, 3))
  ft = jax.random.normal(k[1], (1, 4, 5, 3))
  to_s = jnp.zeros((1, 8, 10), bool).at[:, :4].set(True)  # rows 0-1 at 1/2
  to_t = jnp.zeros((1, 8, 10), bool).at[:, 6:].set(True)  # row 3
  s2, t2, info = fusion.feature_swap(fs, ft, {'to_s': to_s, 'to_t': to_t})
  np.testing.assert_array_equal(np.asarray(s2[:, :2]), np.asarray(ft[:, :2]))
  np.testing.assert_array_equal(np.asarray(s2[:, 2:]), np.asarray(fs[:, 2:]))
  np.testing.assert_array_equal(np.asarray(t2[:, 3:]), np.asarray(fs[:, 3:]))
  np.testing.assert_array_equal(np.asarray(t2[:, :3]), np.asarray(ft[:, :3]))
  ref = np.linalg.norm(ft[:, :2] - fs[:, :2]) / np.linalg.norm(fs[:, :2])
  np.testing.assert_allclose(float(info['feat_rel_diff_to_s']), ref, rtol=1e-5)
  # The exchanged area on the 4x5 grid: rows 0-1 and row 3.
  assert float(info['swap_area_to_s']) == 2 / 4
  assert float(info['swap_area_to_t']) == 1 / 4
  # One clip per batch: no same-domain baseline to compare with.
  assert 'feat_rel_diff_same_s' not in info


def test_feature_swap_same_domain_baseline():
  """The baseline compares the moving features with the next clip of the
  same domain at the same pixels (built so that the answer is known: the
  second source clip is the first scaled by 1.5)."""
  k = jax.random.split(jax.random.key(1), 2)
  fs0 = jax.random.normal(k[0], (1, 4, 5, 3))
  fs = jnp.concatenate([fs0, 1.5 * fs0])
  ft = jax.random.normal(k[1], (2, 4, 5, 3))
  to_s = jnp.zeros((2, 8, 10), bool).at[:, :4].set(True)
  to_t = jnp.zeros((2, 8, 10), bool).at[:, 6:].set(True)
  _, _, info = fusion.feature_swap(fs, ft, {'to_s': to_s, 'to_t': to_t})
  # Clip 0 against clip 1 (rolled): ||x - 1.5x||^2 / ||1.5x||^2 = 0.25 /
  # 2.25; clip 1 against clip 0: 0.25 / 1; pooled over both clips.
  want = np.sqrt((0.25 + 0.25) / (2.25 + 1.0))
  np.testing.assert_allclose(
      float(info['feat_rel_diff_same_s']), want, rtol=1e-5
  )
  ref = np.linalg.norm(ft[:, :2] - jnp.roll(ft, 1, 0)[:, :2]) / np.linalg.norm(
      jnp.roll(ft, 1, 0)[:, :2]
  )
  np.testing.assert_allclose(
      float(info['feat_rel_diff_same_t']), ref, rtol=1e-5
  )


def test_swap_pixels_moves_the_regions_frame_by_frame():
  """The 'pixel_swap' control: each frame's exchange masks move input
  pixels between the clips; labels and flows are left alone."""
  k = jax.random.split(jax.random.key(1), 2)
  xs = jax.random.normal(k[0], (1, 2, 4, 6, 3))
  xt = jax.random.normal(k[1], (1, 2, 4, 6, 3))
  to_s = jnp.zeros((1, 2, 4, 6), bool).at[:, 0, :2].set(True)  # frame 0
  to_t = jnp.zeros((1, 2, 4, 6), bool).at[:, 1, :, :3].set(True)  # frame 1
  ys, yt = jnp.zeros((1, 2, 4, 6), jnp.int32), jnp.ones((1, 2, 4, 6), jnp.int32)
  (xs2, ys2, fs2), (xt2, yt2, ft2) = fusion.swap_pixels(
      {'to_s': to_s, 'to_t': to_t}, (xs, ys, None), (xt, yt, None)
  )
  np.testing.assert_array_equal(xs2[:, 0, :2], xt[:, 0, :2])
  np.testing.assert_array_equal(xs2[:, 0, 2:], xs[:, 0, 2:])
  np.testing.assert_array_equal(xs2[:, 1], xs[:, 1])
  np.testing.assert_array_equal(xt2[:, 1, :, :3], xs[:, 1, :, :3])
  np.testing.assert_array_equal(xt2[:, 1, :, 3:], xt[:, 1, :, 3:])
  np.testing.assert_array_equal(xt2[:, 0], xt[:, 0])
  assert ys2 is ys and yt2 is yt and fs2 is None and ft2 is None


@pytest.mark.parametrize(
    'mode,labels',
    [('swap', 'exchanged'), ('swap', 'kept'), ('pixel_swap', 'exchanged')],
)
def test_exchange_controls_in_the_fused_clips(smoke_config, mode, labels):
  """The fused clips the DA-STC step trains on, built eagerly from a real
  batch: 'swap' exchanges labels with the features (frames untouched);
  the 'kept' control leaves the receiving clip's labels; 'pixel_swap'
  moves the same regions as pixels with their labels."""
  from dastc_jax import train  # pylint: disable=g-import-not-at-top
  from dastc_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dastc_jax.method import dastc_step  # pylint: disable=g-import-not-at-top
  from dastc_jax.ops import image as image_ops  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import state as state_lib  # pylint: disable=g-import-not-at-top

  c = smoke_config
  c.dastc.feature_mode, c.dastc.feature_swap_labels = mode, labels
  root = train.resolve_data_root(c)
  batch = next(
      iter(
          pipeline.make_train_dataset(
              c, root, local_batch_size=c.train.batch_size
          )
      )
  )
  _, state, _ = state_lib.create_train_state(
      c, sizes=state_lib.carried_sizes(c, root)
  )
  src, tgt = batch['source'], batch['target']
  size = tgt['frames'].shape[2:4]
  x_src = image_ops.normalize(src['frames'], jnp.float32)
  x_st = image_ops.normalize(tgt['frames'][:, :2], jnp.float32)
  b, h, w = tgt['label'].shape
  # Pseudo-labels: every pixel confident, class 1 in frame t, 2 in t-1.
  pl = {
      'label_t': jnp.ones((b, h, w), jnp.int32),
      'label_t1': jnp.full((b, h, w), 2, jnp.int32),
      'conf_t': jnp.ones((b, h, w)),
      'conf_t1': jnp.ones((b, h, w)),
  }
  keys = tuple(jax.random.split(jax.random.key(0), 2))
  run = lambda d: dastc_step._fusion_inputs(  # pylint: disable=protected-access
      keys, c, state, src, tgt['flow'], x_src, x_st, pl, size, (3,)
  )
  masks, swap, (xs, ys, _), (xt, yt, _) = run(c.dastc)
  c.dastc.feature_fusion = False
  _, none, (xs0, ys0, _), (xt0, yt0, _) = run(c.dastc)
  assert none is None and swap is not None
  to_s, to_t = np.asarray(swap['to_s']), np.asarray(swap['to_t'])
  assert to_s.any() and to_t.any()
  moved = lambda new, old, m: (np.asarray(new) != np.asarray(old))[m].mean()
  same = lambda new, old: np.array_equal(np.asarray(new), np.asarray(old))
  if labels == 'exchanged':  # the labels follow the regions
    np.testing.assert_array_equal(np.asarray(ys)[to_s], np.asarray(yt0)[to_s])
    np.testing.assert_array_equal(np.asarray(yt)[to_t], np.asarray(ys0)[to_t])
  else:
    assert same(ys, ys0) and same(yt, yt0)
  if mode == 'pixel_swap':  # the frames hold the other clip's pixels there
    np.testing.assert_array_equal(np.asarray(xs)[to_s], np.asarray(xt0)[to_s])
    np.testing.assert_array_equal(np.asarray(xt)[to_t], np.asarray(xs0)[to_t])
    assert moved(xs, xs0, to_s) > 0.5
  else:  # the exchange happens on features, later
    assert same(xs, xs0) and same(xt, xt0)
  del masks
