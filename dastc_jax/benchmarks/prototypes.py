r"""Class prototypes of trained runs: what the alignment loss acts on.

For video runs of the adaptation benchmark (same flags: ``--world``,
``--model``, ``--workdir``, ``--seeds``, ``--variants``; ``--domain=video``),
this reads each run's final checkpoint and measures, on the labelled
source-val and target-val splits, the 256-d feature the alignment uses
(``out['feat']``, frame t, eval mode):

* ``uncentred cos(s, t)``: cosine of each class's source and target
  prototype (the per-class mean feature, ground-truth labels), averaged over
  classes seen in both. The mean feature shared by all classes inflates it
  (two unrelated classes often score above 0.5), so a high value does not
  show that the classes agree;
* ``uncentred cos(s, t) predicted``: the same with the target prototypes
  taken over the model's own predicted classes (as a training step's are,
  over pseudo-labels);
* ``cos(t, t')``: the mean cosine between the target prototypes of two
  different classes (lower = better separated; uncentred too);
* target-val mIoU at the feature grid of the head (``head``), of the nearest
  source prototype (``nearest src``: classify each target pixel by the
  source prototype it is closest to, in cosine), and of the nearest target
  prototype (``nearest tgt``: the same with the target's own ground-truth
  prototypes, an upper bound of what class means alone can separate).

What the alignment can act on (``class_gaps``, ``batch_diagnostics``):

* ``centred cos(s, t)``: the per-class cosine after subtracting the mean
  feature of the two domains, over all classes and over the small ones
  (under 2% of the target-val pixels);
* ``classifier gap``: ``||W^T (mu_s,k - mu_t,k)||`` with ``W`` the last
  layer, in units of the median distance between two source classes' mean
  logits: the part of a class's domain gap that the classifier reads
  (0 = none, 1 = as far as two classes are apart);
* ``classes / batch``: how many classes reach ``alignment.min_pixels`` in
  both domains in a batch of 4 val images at the feature grid, and the mean
  of the ``align_classes`` the run logged in training;
* ``|grad align| / |grad CE|``: the alignment loss's gradient (times its
  weight) at the source features next to the cross-entropy's through the
  last layer, median over those batches.

Example::

  python -m dastc_jax.benchmarks.prototypes --world=default --domain=video \
      --workdir=runs/adaptation_v2 --seeds=0,1,2 \
      --variants=dastc,no_alignment --output=benchmarks/prototypes_default.md
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dastc_jax import models
from dastc_jax.benchmarks import adaptation
from dastc_jax.benchmarks import logged
from dastc_jax.benchmarks import provenance
from dastc_jax.data import labels as labels_lib
from dastc_jax.data import pipeline
from dastc_jax.evaluation import metrics as metrics_lib
from dastc_jax.evaluation import predict
from dastc_jax.method import alignment
from dastc_jax.ops import image as image_ops
from dastc_jax.ops import warp as warp_ops
from dastc_jax.runtime import state as state_lib
from dastc_jax import train

FLAGS = flags.FLAGS


def _nearest_labels(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """``[B, H, W]`` labels at the pixels of an ``hw`` feature grid, placed
  as the evaluation's upsampling places them (corners aligned: feature
  ``i`` sits at label row ``i (H - 1) / (h - 1)``), nearest."""

  def at(n_out, n_in):
    if n_out == 1:
      return np.zeros((1,), int)
    return np.round(np.arange(n_out) * (n_in - 1) / (n_out - 1)).astype(int)

  rows, cols = at(hw[0], label.shape[1]), at(hw[1], label.shape[2])
  return label[:, rows][:, :, cols]


def split_features(
    config: ml_collections.ConfigDict,
    forward,
    params,
    stats,
    split: str,
    data_root: str,
) -> tuple[np.ndarray, ...]:
  """Features ``[N, D]``, head predictions ``[N]``, labels ``[N]`` and the
  image index ``[N]`` of every labelled pixel of ``split`` at the feature
  grid."""
  cs = labels_lib.get_class_set(config.data.class_set)
  ds = pipeline.make_eval_dataset(
      config.data[split], data_root, cs.name, config.model.per_axis_flow_scale
  )
  feats, preds, labels, images = [], [], [], []
  seen = 0
  for batch in pipeline.eval_batches(
      ds, global_batch_size=8, process_index=0, process_count=1
  ):
    feat, pred = forward(params, stats, batch['frames'], batch.get('flow'))
    feat, pred = np.asarray(feat, np.float32), np.asarray(pred)
    keep = np.asarray(batch['mask'])
    label = _nearest_labels(np.asarray(batch['label']), feat.shape[1:3])
    feat, pred, label = feat[keep], pred[keep], label[keep]
    image = np.broadcast_to(
        seen + np.arange(len(label))[:, None, None], label.shape
    )
    seen += len(label)
    valid = label != labels_lib.IGNORE
    feats.append(feat[valid])
    preds.append(pred[valid])
    labels.append(label[valid].astype(np.int64))
    images.append(image[valid])
  return (
      np.concatenate(feats),
      np.concatenate(preds),
      np.concatenate(labels),
      np.concatenate(images),
  )


def prototypes(
    feat: np.ndarray, label: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
  """Per-class mean features ``[C, D]`` and pixel counts ``[C]``."""
  sums = np.zeros((num_classes, feat.shape[1]), np.float64)
  np.add.at(sums, label, feat)
  counts = np.bincount(label, minlength=num_classes)
  return sums / np.maximum(counts, 1)[:, None], counts


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_prototype(
    feat: np.ndarray, protos: np.ndarray, present: np.ndarray
) -> np.ndarray:
  """Index of the most cosine-similar prototype among ``present``."""
  sim = _unit(feat) @ _unit(protos).T  # [N, C]
  sim[:, ~present] = -np.inf
  return np.argmax(sim, axis=1)


def _miou(
    pred: np.ndarray, label: np.ndarray, cs: labels_lib.ClassSet
) -> float:
  """mIoU (%) over the class set's scored classes; rows are labels."""
  n = cs.num_classes
  label, pred = label.astype(np.int64), pred.astype(np.int64)
  cm = np.bincount(label * n + pred, minlength=n**2).reshape(n, n)
  return 100 * metrics_lib.mean_iou(cm, cs.scored)


def make_forward(config: ml_collections.ConfigDict):
  """Jitted ``(params, stats, frames, flow) -> (feat [B, h, w, D], head
  prediction [B, h, w])`` in eval mode, the fused scores resized (corners
  aligned) to the feature grid."""
  graphdef = state_lib.model_graphdef(config)
  dtype = models.compute_dtype(config.model.dtype)

  @jax.jit
  def forward(params, stats, frames, flow):
    model = nnx.merge(graphdef, params, stats)
    out = model.clip(image_ops.normalize(frames, dtype), flow, train=False)
    feat = out['feat']  # [B, h, w, D]
    logits = warp_ops.resize_bilinear(out['pred'], feat.shape[1:3])
    return feat, jnp.argmax(logits, axis=-1)

  return forward


def classifier(
    config: ml_collections.ConfigDict, params, stats
) -> tuple[np.ndarray, np.ndarray] | None:
  """The last layer, ``W [D, C]`` and ``b [C]``, that turns ``out['feat']``
  into logits; None for a head without one (``head='aspp'``, whose
  "feature" is layer4)."""
  model = nnx.merge(state_lib.model_graphdef(config), params, stats)
  layer = getattr(model.head, 'classifier', None) or getattr(
      model.head, 'conv_seg', None
  )
  if layer is None:
    return None
  n = config.model.num_classes
  return (
      np.asarray(layer.kernel[...], np.float64).reshape(-1, n),
      np.zeros(n)
      if layer.bias is None
      else np.asarray(layer.bias[...], np.float64),
  )


def class_gaps(
    ps: np.ndarray,
    pt: np.ndarray,
    fs: np.ndarray,
    ft: np.ndarray,
    both: np.ndarray,
    w: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
  """Per class (NaN where a class is missing in a domain):

  * the centred cosine of the source and target prototypes, both taken
    relative to the mean feature of the two domains (each weighted 1/2),
    so that a shift shared by all classes does not count as agreement;
  * the gap as the classifier sees it, ``||W^T (mu_s,k - mu_t,k)||``,
    divided by the median logit-space distance between two different
    source class means (1 = as far as two classes are apart).
  """
  centre = 0.5 * (fs.mean(0) + ft.mean(0))
  us, ut = _unit(ps - centre), _unit(pt - centre)
  ccos = np.where(both, np.sum(us * ut, axis=1), np.nan)
  if w is None:
    return ccos, np.full(len(ps), np.nan)
  ls, lt = ps @ w, pt @ w  # the bias cancels in differences
  gap = np.linalg.norm(ls - lt, axis=1)
  seen = np.flatnonzero(both)
  pair = np.linalg.norm(ls[seen][:, None] - ls[seen][None], axis=-1)
  scale = np.median(pair[~np.eye(len(seen), dtype=bool)])
  return ccos, np.where(both, gap / scale, np.nan)


def batch_diagnostics(
    config: ml_collections.ConfigDict,
    w_b,
    fs,
    ls,
    img_s,
    ft,
    pt,
    img_t,
    batch_images: int = 4,
) -> dict[str, float]:
  """What the alignment loss sees in a training-sized batch.

  Pairs batches of ``batch_images`` source-val images (ground-truth labels)
  with as many target-val images (the model's own predictions as labels,
  as pseudo-labels would be), and reports the mean number of classes that
  reach ``alignment.min_pixels`` in both at the feature grid, and the
  gradient norm at the source features of the alignment loss (times its
  weight; the default contrastive loss for runs trained without one)
  divided by that of the cross-entropy through the last layer (the
  per-frame classifier; the training step's cross-entropy reads the fused
  two-frame output, so this is the classifier's direct path only).
  """
  a = config.dastc.alignment
  n = config.model.num_classes
  if w_b is None:
    return {'classes': float('nan'), 'grad_ratio': float('nan')}
  w, b = (jnp.asarray(v, jnp.float32) for v in w_b)

  def align(f_s, f_t, l_s, l_t):
    ps, pres_s = alignment.class_prototypes(
        f_s[None, :, None], l_s[None, :, None], n, a.min_pixels
    )
    pt_, pres_t = alignment.class_prototypes(
        f_t[None, :, None], l_t[None, :, None], n, a.min_pixels
    )
    present = pres_s & pres_t
    if a.kind == 'cosine':
      loss = alignment.cosine_pull(ps, pt_, present)
    else:  # the contrastive default (also for runs trained without it)
      loss = alignment.contrastive(
          ps, pt_, present, temperature=a.temperature, margin=a.margin
      )
    return a.weight * loss, jnp.sum(present)

  def ce(f_s, l_s):
    logp = jax.nn.log_softmax(f_s @ w + b, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, l_s[:, None], 1))

  g_align = jax.jit(jax.grad(align, has_aux=True))
  g_ce = jax.jit(jax.grad(ce))
  classes, ratios = [], []
  for i in range((min(img_s.max(), img_t.max()) + 1) // batch_images):
    ms = (img_s >= i * batch_images) & (img_s < (i + 1) * batch_images)
    mt = (img_t >= i * batch_images) & (img_t < (i + 1) * batch_images)
    f_s, l_s = jnp.asarray(fs[ms]), jnp.asarray(ls[ms], jnp.int32)
    f_t, l_t = jnp.asarray(ft[mt]), jnp.asarray(pt[mt], jnp.int32)
    ga, k = g_align(f_s, f_t, l_s, l_t)
    gc = g_ce(f_s, l_s)
    classes.append(float(k))
    ratios.append(float(jnp.linalg.norm(ga) / jnp.linalg.norm(gc)))
  return {
      'classes': float(np.mean(classes)),
      'grad_ratio': float(np.median(ratios)),
  }


def measure(
    config: ml_collections.ConfigDict, run_dir: str, forward
) -> dict[str, float]:
  """The prototype statistics of one run's final checkpoint."""
  root = train.resolve_data_root(config)
  params, stats = predict.load_weights(config, '', run_dir)  # the latest
  cs = labels_lib.get_class_set(config.data.class_set)
  n = cs.num_classes
  fs, _, ls, img_s = split_features(
      config, forward, params, stats, 'source_val', root
  )
  ft, pt, lt, img_t = split_features(
      config, forward, params, stats, 'target_val', root
  )
  ps, cnt_s = prototypes(fs, ls, n)
  pt_gt, cnt_t = prototypes(ft, lt, n)
  both = (cnt_s > 0) & (cnt_t > 0)
  us, ut = _unit(ps), _unit(pt_gt)
  cos_st = float(np.mean(np.sum(us[both] * ut[both], axis=1)))
  # Target prototypes over the model's own predictions (what a training
  # step's prototypes use: predicted, not true, classes).
  pt_pred, cnt_pred = prototypes(ft, pt.astype(np.int64), n)
  both_pred = (cnt_s > 0) & (cnt_pred > 0)
  cos_st_pred = float(
      np.mean(np.sum(us[both_pred] * _unit(pt_pred)[both_pred], axis=1))
  )
  tt = ut[cnt_t > 0] @ ut[cnt_t > 0].T
  off = ~np.eye(len(tt), dtype=bool)
  w_b = classifier(config, params, stats)
  ccos, gap = class_gaps(
      ps, pt_gt, fs, ft, both, None if w_b is None else w_b[0]
  )
  small = both & (cnt_t / cnt_t.sum() < SMALL_SHARE)
  return {
      'ccos': float(np.nanmean(ccos)),
      'ccos_small': float(np.nanmean(ccos[small]))
      if small.any()
      else float('nan'),
      'gap': float(np.nanmean(gap)),
      'gap_small': float(np.nanmean(gap[small]))
      if small.any()
      else float('nan'),
      **batch_diagnostics(config, w_b, fs, ls, img_s, ft, pt, img_t),
      'classes_logged': logged.run_means(run_dir, ['align_classes'], 0)[
          'align_classes'
      ],
      'per_class_ccos': ccos.tolist(),
      'per_class_gap': gap.tolist(),
      'cos_st': cos_st,
      'cos_st_pred': cos_st_pred,
      'cos_tt': float(np.mean(tt[off])),
      'head': _miou(pt, lt, cs),
      'nearest_src': _miou(nearest_prototype(ft, ps, cnt_s > 0), lt, cs),
      'nearest_tgt': _miou(nearest_prototype(ft, pt_gt, cnt_t > 0), lt, cs),
  }


# Classes below this share of the target-val pixels count as small.
SMALL_SHARE = 0.02
COLUMNS = (
    ('cos_st', 'uncentred cos(s, t)', '{:.3f}'),
    ('cos_st_pred', 'uncentred cos(s, t) predicted', '{:.3f}'),
    ('cos_tt', "cos(t, t')", '{:.3f}'),
    ('head', 'head mIoU', '{:.1f}'),
    ('nearest_src', 'nearest src mIoU', '{:.1f}'),
    ('nearest_tgt', 'nearest tgt mIoU', '{:.1f}'),
)
# What the alignment can act on (docs/benchmarks.md, "Reading the
# diagnostics").
DIAGNOSTICS = (
    ('ccos', 'centred cos(s, t)', '{:.3f}'),
    ('ccos_small', 'centred, small classes', '{:.3f}'),
    ('gap', 'classifier gap', '{:.2f}'),
    ('gap_small', 'classifier gap, small', '{:.2f}'),
    ('classes', 'classes / batch (val)', '{:.1f}'),
    ('classes_logged', 'classes / batch (training)', '{:.1f}'),
    ('grad_ratio', '|grad align| / |grad CE|', '{:.3f}'),
)


def table(results: dict[str, list[dict[str, float]]], columns=COLUMNS) -> str:
  """Markdown: each statistic's seed mean ± std per variant."""
  rows = [
      '| run | ' + ' | '.join(c[1] for c in columns) + ' |',
      '|---|' + '---:|' * len(columns),
  ]
  for name, per_seed in results.items():
    cells = []
    for key, _, fmt in columns:
      v = np.array([r[key] for r in per_seed], np.float64)
      if np.isnan(v).all():  # e.g. no logged alignment in a run without it
        cells.append('-')
        continue
      cell = fmt.format(v.mean())
      if len(v) > 1:
        cell += ' ± ' + fmt.format(v.std(ddof=1))
      cells.append(cell)
    rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def per_class_table(
    results: dict[str, list[dict[str, float]]], class_names: tuple[str, ...]
) -> str:
  """Markdown: per class, the seed-mean centred cosine / classifier gap of
  every variant ('-' where the class is missing in a domain)."""
  names = list(results)
  rows = [
      '| class | ' + ' | '.join(names) + ' |',
      '|---|' + '---:|' * len(names),
  ]
  for k, cls in enumerate(class_names):
    cells = []
    for v in names:
      c = np.array([r['per_class_ccos'][k] for r in results[v]], np.float64)
      g = np.array([r['per_class_gap'][k] for r in results[v]], np.float64)
      cells.append(
          '-'
          if np.isnan(c).all()
          else f'{np.nanmean(c):.2f} / {np.nanmean(g):.2f}'
      )
    rows.append(f'| {cls} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def main(argv):
  del argv
  if FLAGS.domain != 'video':
    raise app.UsageError(
        'prototypes needs a labelled source-val split: only '
        '--domain=video has one.'
    )
  start = time.time()
  seeds = [int(s) for s in FLAGS.seeds]
  variants = FLAGS.variants or ['dastc', 'no_alignment']
  results = {}
  forwards = {}  # one compiled forward per model config
  for v in variants:
    results[v] = []
    for seed in seeds:
      base = adaptation.seed_dir(seed)
      warm = adaptation.VARIANTS[v][1]
      config = adaptation.run_config(
          seed, v, warm, os.path.join(base, f'warm_{warm}')
      )
      key = config.model.to_json()
      if key not in forwards:
        forwards[key] = make_forward(config)
      r = measure(config, os.path.join(base, v), forwards[key])
      logging.info('seed %d %s: %s', seed, v, r)
      results[v].append(r)
  cs = labels_lib.get_class_set(config.data.class_set)
  text = (
      table(results)
      + '\n\nWhat the alignment can act on:\n\n'
      + table(results, DIAGNOSTICS)
      + '\n\nPer class, centred cos(s, t) / classifier gap:\n\n'
      + per_class_table(results, cs.classes)
  )
  print(text)
  cmd = (
      'python -m dastc_jax.benchmarks.prototypes '
      f'--world={FLAGS.world} --domain={FLAGS.domain} '
      f'{adaptation.model_flag()}--workdir={FLAGS.workdir} '
      f'--seeds={",".join(map(str, seeds))} '
      f'--variants={",".join(variants)}'
      + (f' --output={FLAGS.output}' if FLAGS.output else '')
  )
  if FLAGS.output:
    with open(FLAGS.output, 'w') as f:
      f.write(
          f'# Class prototypes ({FLAGS.world} world, {FLAGS.domain}, '
          f'{FLAGS.model}, seeds {",".join(map(str, seeds))})\n\n'
          f'Command: `{cmd}`\n\n{text}\n\n'
          f'{time.time() - start:.0f} s, code at commit '
          f'{provenance.commit()}.\n'
      )


if __name__ == '__main__':
  app.run(main)
