"""Confusion-matrix mIoU on hand-built cases and against cityscapesscripts."""

import importlib
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from dastc_jax.data import labels
from dastc_jax.evaluation import metrics


def test_confusion_matrix_hand_built():
  label = jnp.asarray([[[0, 0, 1, 1, 2, 255]]])
  pred = jnp.asarray([[[0, 1, 1, 1, 0, 2]]])
  cm = np.asarray(metrics.confusion_matrix(pred, label, 3))
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
  iou = metrics.iou_per_class(cm)
  # class 0: TP 1, FP 1 (gt 2), FN 1 -> 1/3; class 1: 2/3; class 2: 0/1.
  np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 0.0])
  np.testing.assert_allclose(metrics.mean_iou(cm), (1 / 3 + 2 / 3) / 3)


def test_absent_classes_are_nan_and_skipped():
  cm = np.zeros((4, 4), np.int64)
  cm[0, 0], cm[1, 1], cm[1, 0] = 5, 3, 1
  iou = metrics.iou_per_class(cm)
  assert np.isnan(iou[2]) and np.isnan(iou[3])
  np.testing.assert_allclose(metrics.mean_iou(cm), (5 / 6 + 3 / 4) / 2)


def test_padding_mask_excludes_examples():
  label = jnp.zeros((2, 2, 2), jnp.int32)
  pred = jnp.zeros((2, 2, 2), jnp.int32).at[1].set(1)
  cm = np.asarray(
      metrics.confusion_matrix(pred, label, 2, jnp.asarray([True, False]))
  )
  np.testing.assert_array_equal(cm, [[4, 0], [0, 0]])


def test_synthia_trains_12_and_scores_11():
  cs = labels.SYNTHIA12
  assert cs.num_classes == 12 and len(cs.scored) == 11
  assert 3 not in cs.scored and cs.classes[3] == 'fence'
  cm = np.eye(12, dtype=np.int64) * 10
  cm[3, 3] = 0
  cm[3, 0] = 10  # fence always wrong: IoU 0, but not scored
  # road: TP 10, FP 10 -> 0.5; fence: 0; the other 10 classes: 1.
  np.testing.assert_allclose(metrics.mean_iou(cm), 10.5 / 12)
  np.testing.assert_allclose(metrics.mean_iou(cm, cs.scored), 10.5 / 11)


def test_miou_matches_cityscapesscripts_on_label_pngs(tmp_path, monkeypatch):
  monkeypatch.setenv('CITYSCAPES_DATASET', str(tmp_path))
  monkeypatch.setenv('CITYSCAPES_RESULTS', str(tmp_path / 'results'))
  # cityscapesscripts 2.3.0 still calls np.in1d, removed in NumPy 2.4; give
  # it the documented equivalent so the reference itself runs unchanged.
  monkeypatch.setattr(
      np,
      'in1d',
      lambda a, b, invert=False: np.isin(np.ravel(a), b, invert=invert),
      raising=False,
  )
  ev = importlib.import_module(
      'cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling'
  )
  rng = np.random.default_rng(0)
  ids = np.array(labels.CITYSCAPES19.cityscapes_ids + (0, 1, 4))
  gt_files, pred_files = [], []
  cm = np.zeros((19, 19), np.int64)
  for i in range(3):
    gt = rng.choice(ids, size=(64, 128)).astype(np.uint8)
    # Predictions: 60% correct, the rest random evaluated classes.
    pred = np.where(
        rng.random((64, 128)) < 0.6, gt, rng.choice(ids[:19], size=(64, 128))
    ).astype(np.uint8)
    pred = np.where(np.isin(pred, ids[:19]), pred, 7).astype(np.uint8)
    city = 'testcity'
    gdir = tmp_path / 'gtFine' / 'val' / city
    pdir = tmp_path / 'pred'
    os.makedirs(gdir, exist_ok=True)
    os.makedirs(pdir, exist_ok=True)
    g = gdir / f'{city}_000000_{i:06d}_gtFine_labelIds.png'
    p = pdir / f'{city}_000000_{i:06d}_pred.png'
    Image.fromarray(gt).save(g)
    Image.fromarray(pred).save(p)
    gt_files.append(str(g))
    pred_files.append(str(p))
    lut = labels.CITYSCAPES_TO_19
    cm += np.asarray(
        metrics.confusion_matrix(
            jnp.asarray(lut[pred])[None], jnp.asarray(lut[gt])[None], 19
        )
    )
  args = ev.args
  args.evalInstLevelScore = False
  args.quiet = True
  args.JSONOutput = False
  args.evalPixelAccuracy = True
  result = ev.evaluateImgLists(pred_files, gt_files, args)
  ours = metrics.mean_iou(cm)
  np.testing.assert_allclose(ours, result['averageScoreClasses'], rtol=1e-9)
  from cityscapesscripts.helpers import labels as cs_labels  # pylint: disable=g-import-not-at-top

  iou = metrics.iou_per_class(cm)
  compared = 0
  for name, score in result['classScores'].items():
    train_id = cs_labels.name2label[name].trainId
    if 0 <= train_id < 19:
      np.testing.assert_allclose(iou[train_id], score, rtol=1e-9)
      compared += 1
  assert compared == 19


def test_synthia16_reports_miou13_beside_miou16():
  from dastc_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

  cs = labels.get_class_set('synthia16')
  cm = np.zeros((16, 16), np.int64)
  for i in range(16):
    cm[i, i] = 10
  cm[3, 4] = 10  # wall predicted as fence: wall IoU 0.5, fence 0.5
  r = evaluate.SplitResult('target_val', cm, 1, cs)
  iou = [1.0] * 16
  iou[3] = iou[4] = 0.5
  np.testing.assert_allclose(r.miou, np.mean(iou))
  # mIoU13 leaves out wall, fence and pole.
  np.testing.assert_allclose(r.extra()['miou13'], 1.0)
  assert r.to_json()['miou13'] == 100.0
  assert '| miou13 | 100.0 |' in evaluate.format_table([r])
