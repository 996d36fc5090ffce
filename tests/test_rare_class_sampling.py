"""Rare-class sampling and crops without a dominant class (DAFormer, HRDA):
the class probabilities against a restatement of the released formula, the
draws' frequencies, the crop redraw rules by their exact probabilities, and
the stream through the pipeline (deterministic, resumable, keys)."""

import collections

import chex
import numpy as np
import pytest

from dastc_jax import errors
from dastc_jax.data import pipeline
from dastc_jax.data import rare_class_sampling as rcs
from dastc_jax.data import transforms


def _histogram(seed=0, n=40, classes=6):
  rng = np.random.default_rng(seed)
  hist = np.zeros((n, 256), np.int64)
  # Class k appears in fewer records and with fewer pixels as k grows.
  for k in range(classes):
    rows = rng.random(n) < 0.9 / (k + 1)
    hist[rows, k] = rng.integers(1, 20000 // (k + 1) ** 2, rows.sum())
  hist[:, 255] = 500  # ignored pixels never count
  return hist


def test_class_probabilities_match_the_released_formula():
  """softmax((1 - share) / T) over the present classes, rarest first, as
  the released code computes it (restated with torch, float32)."""
  import torch  # pylint: disable=g-import-not-at-top

  hist = _histogram()
  hist[:, 3] = 0  # absent from the split: not a class to draw
  classes, probs = rcs.class_probabilities(hist, 6, 0.01)
  totals = {c: int(hist[:, c].sum()) for c in range(6) if hist[:, c].sum()}
  ordered = dict(sorted(totals.items(), key=lambda kv: kv[1]))
  freq = torch.tensor(list(ordered.values()))
  freq = freq / torch.sum(freq)
  want = torch.softmax((1 - freq) / 0.01, dim=-1).numpy()
  assert list(classes) == list(ordered) and 3 not in classes
  np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-7)
  # The rarest class is the likeliest draw.
  assert probs[0] == probs.max() and abs(probs.sum() - 1) < 1e-12


def test_table_members_and_the_error_for_a_class_nobody_has_enough_of():
  hist = _histogram()
  table = rcs.build_table(hist, 6, 0.01, min_pixels=100)
  for c, members in zip(table.classes, table.members):
    assert members == tuple(np.flatnonzero(hist[:, c] > 100).tolist())
  top = int(hist[:, 5].max())
  with pytest.raises(ValueError, match='train id 5 .largest: ' + str(top)):
    rcs.build_table(hist, 6, 0.01, min_pixels=top, where='x')
  # Strictly more than min_pixels, as released.
  hist2 = np.zeros((2, 256), np.int64)
  hist2[0, 0], hist2[1, 1] = 10, 11
  with pytest.raises(ValueError, match='train id 0'):
    rcs.build_table(hist2, 2, 0.01, min_pixels=10)


def test_draws_follow_the_class_probabilities_and_the_members():
  hist = _histogram()
  table = rcs.build_table(hist, 6, 0.5, min_pixels=0)
  pick = rcs.PickRareClass(table)
  n = 20000
  draws = [pick.random_map(i, np.random.default_rng(i)) for i in range(n)]
  freq = np.array(
      [sum(d['rcs_class'] == c for d in draws) / n for c in table.classes]
  )
  # Binomial standard error at n = 20000 is below 0.0036.
  np.testing.assert_allclose(freq, table.probs, atol=0.015)
  members = dict(zip(table.classes, table.members))
  assert all(d['index'] in members[d['rcs_class']] for d in draws)
  again = pick.random_map(7, np.random.default_rng(7))
  assert again == draws[7]


def _text(x):
  x = np.asarray(x).item()
  return x.decode() if isinstance(x, bytes) else str(x)


def _windows(label, ch, cw):
  h, w = label.shape
  return [
      label[r : r + ch, c : c + cw]
      for r in range(h - ch + 1)
      for c in range(w - cw + 1)
  ]


def _clip(label):
  return {
      'frames': np.zeros((1,) + label.shape + (3,), np.uint8),
      'labels': label[None].astype(np.uint8),
  }


def test_cat_max_ratio_redraws_crops_with_a_dominant_class():
  """A crop is kept at the first of 11 draws without a dominant class: the
  share of such crops is 1 - (1 - p)^11, p that share among all windows
  (mmseg's RandomCrop); with the ratio at 1 the first draw is kept."""
  label = np.zeros((20, 30), np.uint8)
  label[:, 24:] = 1  # class 1 only in the right fifth
  label[0:2, :] = 255  # ignored rows never count
  ch, cw = 8, 8
  ok = [transforms._no_dominant_class(w, 0.75) for w in _windows(label, ch, cw)]
  p = float(np.mean(ok))
  assert 0.05 < p < 0.3
  crop = transforms.RandomScaleCrop(crop_size=(ch, cw), cat_max_ratio=0.75)
  plain = transforms.RandomScaleCrop(crop_size=(ch, cw))
  n = 4000
  kept = [
      transforms._no_dominant_class(
          crop.random_map(_clip(label), np.random.default_rng(i))['labels'][0],
          0.75,
      )
      for i in range(n)
  ]
  want = 1 - (1 - p) ** 11
  assert abs(np.mean(kept) - want) < 4 * np.sqrt(want * (1 - want) / n)
  # Off: the first draw, exactly as without the rule.
  for i in range(20):
    off = transforms.RandomScaleCrop(crop_size=(ch, cw), cat_max_ratio=1.0)
    chex.assert_trees_all_equal(
        off.random_map(_clip(label), np.random.default_rng(i)),
        plain.random_map(_clip(label), np.random.default_rng(i)),
    )
  # One class alone is a dominant class.
  assert not transforms._no_dominant_class(np.zeros((4, 4), np.uint8), 0.75)


def test_rare_class_crop_is_redrawn_until_it_holds_the_class():
  """With ``rcs_class`` the draw repeats (up to 10 times) until the crop
  has more than the threshold of that class: 1 - (1 - q)^11 of the crops
  do, q the share of windows that have; the key does not reach the
  batch."""
  label = np.zeros((24, 32), np.uint8)
  label[3:7, 20:26] = 4  # 24 pixels of the rare class
  ch, cw, thresh = 10, 10, 12
  q = float(
      np.mean(
          [np.count_nonzero(w == 4) > thresh for w in _windows(label, ch, cw)]
      )
  )
  assert 0.05 < q < 0.3
  crop = transforms.RandomScaleCrop(crop_size=(ch, cw), rcs_min_pixels=thresh)
  n = 4000
  outs = [
      crop.random_map(
          {**_clip(label), 'rcs_class': 4}, np.random.default_rng(i)
      )
      for i in range(n)
  ]
  assert all('rcs_class' not in o for o in outs)
  hit = np.mean([np.count_nonzero(o['labels'][0] == 4) > thresh for o in outs])
  want = 1 - (1 - q) ** 11
  assert abs(hit - want) < 4 * np.sqrt(want * (1 - want) / n)


def test_rcs_stream_is_deterministic_resumes_and_follows_the_table(
    smoke_config, tiny_data
):
  c = smoke_config
  c.data.source.crop_size = (36, 68)
  r = c.data.source.rare_class_sampling
  r.enabled, r.min_pixels, r.min_crop_ratio, r.temperature = True, 0, 2.0, 0.01
  it = iter(pipeline.make_train_dataset(c, tiny_data, local_batch_size=4))
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  expected = next(it)
  again = iter(pipeline.make_train_dataset(c, tiny_data, local_batch_size=4))
  chex.assert_trees_all_equal(first[0], next(again))
  again.set_state(state)
  chex.assert_trees_all_equal(expected, next(again))
  assert 'rcs_class' not in first[0]['source']
  # Records come at the rates the table gives: P(r) = sum over classes k
  # of p_k [r holds k] / (records holding k).
  spec, source = pipeline.data_source(c.data.source, tiny_data)
  table = pipeline.rare_class_table(spec, tiny_data, c.data.source, 'viper15')
  want = np.zeros(len(source))
  for p, members in zip(table.probs, table.members):
    want[list(members)] += p / len(members)
  ids = [_text(source[i]['id']) for i in range(len(source))]
  ds = pipeline.domain_dataset(
      c.data.source,
      tiny_data,
      'viper15',
      seed=3,
      process_index=0,
      process_count=1,
      per_axis_flow_scale=False,
      keep_ids=True,
  )
  n = 600
  got = collections.Counter(_text(ds[i]['id']) for i in range(n))
  freq = np.array([got[x] / n for x in ids])
  np.testing.assert_allclose(freq, want, atol=0.07)
  # Not the plain stream's 1/6 for every record.
  assert freq.max() - freq.min() > 0.1 and want.max() - want.min() > 0.1


def test_rcs_errors_name_the_key(smoke_config, tiny_data):
  from dastc_jax.runtime import validation  # pylint: disable=g-import-not-at-top

  c = smoke_config
  r = c.data.source.rare_class_sampling
  r.enabled, r.min_pixels = True, 10**7
  with pytest.raises(
      errors.ConfigError,
      match=r'config.data.source.rare_class_sampling.min_pixels=10000000: '
      r'rare-class sampling: no record of viper train',
  ):
    pipeline.make_train_dataset(c, tiny_data, local_batch_size=4)
  r.enabled = False
  c.data.target.rare_class_sampling.enabled = True
  with pytest.raises(errors.ConfigError, match='config.data.target.rare_cl'):
    validation.check_config(c)
  c.data.target.rare_class_sampling.enabled = False
  c.data.target.cat_max_ratio = 0.75
  with pytest.raises(errors.ConfigError, match='only the training source'):
    validation.check_config(c)
  c.data.target.cat_max_ratio = 1.0
  c.data.source.cat_max_ratio = 0.0
  with pytest.raises(errors.ConfigError, match=r'expected a share in \(0, 1]'):
    validation.check_config(c)
