"""The DA-STC train step (pure; jitted once with shardings in train.py).

One step (docs/method.md):

1. the teacher segments the target pair (t-1, t-2); its probabilities warped
   to t are the pseudo-labels (``pseudo_labels.cross_frame``);
2. the target pair (t, t-1) is strongly augmented with one set of
   parameters (``ops.augment``);
3. image-sequence-level fusion: S', long-tail patches and T' are pasted into
   a source-context and a target-context clip (``fusion``); shallow-feature
   fusion exchanges current-iteration class regions between the two clips
   after the shallow stage (``fusion.feature_swap``);
4. losses: source CE (+ aux), consistency of the strong clip with the
   pseudo-labels, CE of both fused clips (fused at input resolution, with
   the long-tail score swap), and the alignment of class prototypes
   aggregated over space and frames t, t-1, t-2 (``alignment``):
   ``L = L_src + lambda_T (L_cons + L_tgt_mix) + L_src_mix + w L_align``;
5. the optimizer update, the EMA teacher update, and the roll-over of this
   iteration's clips into the carried state.

BatchNorm running averages (``dastc.bn_update='fixed'``) come from the
source pass and the strong target pass only, which every variant runs, so
turning a loss off does not change the statistics used at evaluation.

The image domain (``model.name='deeplabv2'``, clip length 1) runs the same
step on one frame: the teacher labels frame t itself, nothing is warped,
and the alignment has only frame t.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dastc_jax import errors
from dastc_jax.method import alignment
from dastc_jax.method import feature_distance as fd_lib
from dastc_jax.method import fusion
from dastc_jax.method import losses
from dastc_jax.method import pseudo_labels
from dastc_jax.method.train_state import TrainState
from dastc_jax import models
from dastc_jax.ops import augment
from dastc_jax.ops import image as image_ops
from dastc_jax.ops import masking
from dastc_jax.ops import warp as warp_ops

Batch = dict[str, Any]


def _teacher_forward(
    config,
    graphdef,
    teacher_graphdef,
    state,
    frames,
    flow,
    adapt_start: int,
    rng: jax.Array,
):
  """The teacher's fused scores of frame t-1 (pair t-1, t-2; ``frames`` is
  that pair), or of frame t in the image domain; no gradient.

  ``teacher_graphdef`` (not None) is a separately trained frozen teacher
  (``dastc.frozen_teacher``) for the 'reference' teacher's first phase: it
  is never reset to the student, and its scores are resized (bilinear) to
  the student's score grid, so that the phases give labels of one shape.

  Returns ``(pred, aux, key, teacher, batch_stats)``: the fused scores of
  the clip's first frame and the key frame's own scores (None for a single
  frame), the (possibly reset) teacher, and the BatchNorm averages the
  student starts from (the reference teacher in its student phase updates
  them, as the released code does; otherwise they are the state's).
  """
  d = config.dastc
  if teacher_graphdef is None:
    first = state.step == adapt_start
    # At the first adaptation step the teacher becomes the warm-started
    # model.
    teacher = jax.tree.map(
        lambda t, s: jnp.where(first, s, t),
        state.teacher,
        {'params': state.params, 'batch_stats': state.batch_stats},
    )
  else:
    teacher = state.teacher

  def run(params, stats, train, gdef=graphdef):
    model = nnx.merge(gdef, params, stats)
    out = model.clip(frames, flow, train=train, rng=rng if train else None)
    new_stats = (
        nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        if train
        else state.batch_stats
    )
    key = out.get('key_logits', jnp.zeros_like(out['pred']))
    return out['pred'], out['pred_aux'], key, new_stats

  def run_student():
    return run(state.params, state.batch_stats, True)

  def run_frozen():
    if teacher_graphdef is None:
      return run(teacher['params'], teacher['batch_stats'], False)
    grid = jax.eval_shape(run_student)[0].shape[1:3]
    pred, aux, key, stats = run(
        teacher['params'], teacher['batch_stats'], False, teacher_graphdef
    )
    up = lambda x: warp_ops.resize_bilinear(x, grid)
    return up(pred), up(aux), up(key), stats

  if d.teacher == 'ema':
    pred, aux, key, stats = run(
        teacher['params'], teacher['batch_stats'], False
    )
  elif d.teacher == 'reference':
    pred, aux, key, stats = jax.lax.cond(
        pseudo_labels.use_student(
            state.step, adapt_start, d.teacher_switch_steps
        ),
        run_student,
        run_frozen,
    )
  else:
    raise errors.ConfigError(
        f'Unknown config.dastc.teacher={d.teacher!r}; expected one of '
        f'{pseudo_labels.TEACHERS}.'
    )
  pred, aux, key, stats = jax.lax.stop_gradient((pred, aux, key, stats))
  return pred, aux, key, teacher, stats


def _class_priors(config, state, src_labels, teacher_logits):
  """Running class frequencies of the source labels and of the teacher's
  (unadjusted) target predictions, and the logit adjustment
  ``log prior_src - log prior_tgt`` of pseudo-label distribution alignment.

  At the first adaptation step the running values start at this batch's.
  """
  d = config.dastc
  c = config.model.num_classes
  lab = src_labels.reshape(-1).astype(jnp.int32)
  src = jnp.sum(jax.nn.one_hot(lab, c), 0)  # ids >= C count nowhere
  src = src / jnp.maximum(jnp.sum(src), 1.0)
  tgt = jnp.mean(
      jax.nn.softmax(teacher_logits.astype(jnp.float32), -1), axis=(0, 1, 2)
  )
  old = state.carried['class_prior']
  first = ~state.carried['has_prev']
  m = d.prior_momentum
  ema = lambda o, n: jnp.where(first, n, m * o + (1.0 - m) * n)
  prior = {'source': ema(old['source'], src), 'target': ema(old['target'], tgt)}
  floor = 1e-4
  adjust = jnp.log(jnp.maximum(prior['source'], floor)) - jnp.log(
      jnp.maximum(prior['target'], floor)
  )
  return prior, jax.lax.stop_gradient(adjust)


def _pseudo_labels(
    config,
    graphdef,
    teacher_graphdef,
    state,
    x_tgt,
    tgt,
    size,
    adapt_start,
    k_flip,
    k_teacher,
    src_labels=None,
):
  """Teacher pass (with the optional random mirror) and cross-frame labels.

  Besides the labels of ``pseudo_labels.cross_frame`` it returns the
  teacher's class probabilities at the score grid, un-mirrored: ``probs_lo``
  (warped to frame t), and for clips ``probs_t1_lo``/``probs_t2_lo`` (frames
  t-1 and t-2, unwarped). The alignment takes class membership and
  reliability from them.

  With ``dastc.pl_distribution_alignment`` the teacher's scores are shifted
  by ``log prior_src - log prior_tgt`` before anything is derived from them,
  so the pseudo-labels' class frequencies follow the source's (``src_labels``
  ``[B, T, H, W]``). Returns ``(pl, teacher, stats, class_prior)``, the last
  the updated running priors (the state's when alignment is off).
  """
  d = config.dastc
  video = models.clip_length(config.model) == 2
  # The teacher's clip: (t-1, t-2) with the flow t-1 -> t-2, or frame t.
  frames = x_tgt[:, 1:3] if video else x_tgt[:, :1]
  flow = tgt['flow_t1_t2'] if video else None
  flip = None
  if d.teacher_flip > 0:
    flip = jax.random.bernoulli(k_flip, d.teacher_flip, (x_tgt.shape[0],))
    frames = pseudo_labels.hflip(frames, flip)  # [B, T, H, W, 3]
    if video:
      flow = pseudo_labels.hflip_flow(
          flow, flip, negate_dx=not d.bugs.flip_keep_dx
      )
  pred, aux, key, teacher, stats = _teacher_forward(
      config,
      graphdef,
      teacher_graphdef,
      state,
      frames,
      flow,
      adapt_start,
      k_teacher,
  )
  prior = state.carried['class_prior']
  if d.pl_distribution_alignment:
    prior, adjust = _class_priors(config, state, src_labels[:, 0], pred)
    pred, aux, key = pred + adjust, aux + adjust, key + adjust
  unflip = (
      (lambda x: pseudo_labels.hflip(x, flip))
      if flip is not None
      else (lambda x: x)
  )
  unflip_first = flip is not None and (
      not d.bugs.warp_before_unflip or not video
  )
  if unflip_first:
    pred, aux = unflip(pred), unflip(aux)
  if not video:
    pl = pseudo_labels.same_frame(pred, aux, size)
    pl['probs_lo'] = jax.nn.softmax(pred, -1)
    return pl, teacher, stats, prior
  pl = pseudo_labels.cross_frame(
      pred,
      aux,
      tgt['flow'],
      size,
      confidence_from_logit=d.bugs.confidence_from_logit,
  )
  if flip is not None and not unflip_first:
    # Reference: the mirrored scores were warped, the maps mirrored after.
    pl = {
        k: (
            pseudo_labels.hflip(v, flip)
            if v.ndim == 4
            else pseudo_labels.hflip_labels(v, flip)
        )
        for k, v in pl.items()
    }
    pred = unflip(pred)
  pl['probs_t1_lo'] = jax.nn.softmax(pred, -1)
  pl['probs_t2_lo'] = jax.nn.softmax(unflip(key), -1)
  return pl, teacher, stats, prior


def _fusion_inputs(
    keys, config, state, src, tgt_flow, x_src, x_strong, pl, size, rare_classes
):
  """Builds both fused clips (frames, labels, flows) and their masks.

  Returns ``(masks, swap, clip_s, clip_t)``: the image-level paste masks,
  the shallow-feature exchange masks (None when that fusion is off or in
  ``'blend'`` mode) and the two clips ``(frames, labels, flow)``, whose
  labels and flows already follow the feature exchange (unless
  ``feature_swap_labels='kept'``) and, for ``'pixel_swap'``, whose frames
  hold the exchanged regions.
  """
  k_paste, k_swap = keys
  d = config.dastc
  c = state.carried
  dtype = x_src.dtype
  crop = lambda x, ch: fusion.crop(x, src['crop'], size, ch)
  norm = lambda x: image_ops.normalize(x, dtype)
  masks = fusion.sample_masks(
      k_paste,
      prev_src_labels=crop(c['src_labels'], False),
      rare_labels=src['rare_labels'],
      rare_classes=src['rare_classes'],
      prev_tgt_masks=c['tgt_masks'],
      has_prev=c['has_prev'],
      num_classes=config.model.num_classes,
      num_source_classes=d.num_source_classes,
      rare_class_list=rare_classes,
      clip_lt=not d.bugs.unclipped_lt_mask,
  )
  pastes = dict(
      prev_src=norm(crop(c['src_frames'], True)),
      prev_src_labels=crop(c['src_labels'], False),
      rare=norm(src['rare_frames']),
      prev_tgt=norm(c['tgt_frames']),
      prev_tgt_labels=c['tgt_labels'],
      masks=masks,
  )
  src_labels = crop(src['labels'], False)
  tgt_labels = _target_labels(pl)
  xs, ys = fusion.compose(crop(x_src, True), src_labels, **pastes)
  xt, yt = fusion.compose(x_strong, tgt_labels, **pastes)
  fs = ft = None
  if tgt_flow is not None:  # the image domain has no flows to mix
    flows = dict(
        prev_src_flow=crop(c['src_flow'], True),
        prev_tgt_flow=c['tgt_flow'],
        masks=masks,
        key_frame_masks=d.bugs.flow_mix_key_masks,
    )
    fs = fusion.mix_flow(crop(src['flow'], True), **flows)
    ft = fusion.mix_flow(tgt_flow, **flows)
  clip_s, clip_t = (xs, ys, fs), (xt, yt, ft)
  swap = None
  if d.feature_fusion and d.feature_mode in ('swap', 'pixel_swap'):
    conf = jnp.stack([pl[k] for k in ('conf_t', 'conf_t1') if k in pl], 1)
    swap = fusion.swap_masks(
        k_swap,
        src_labels=src_labels,
        tgt_labels=tgt_labels,
        tgt_confident=(conf > d.confidence) & (tgt_labels < 255),
        pasted=fusion.fused_mask(masks) > 0,
        num_classes=config.model.num_classes,
        num_swap_classes=d.feature_swap_classes,
        directions=d.feature_swap_directions,
    )
    if d.feature_swap_labels == 'exchanged':
      clip_s, clip_t = fusion.apply_swap(swap, clip_s, clip_t)
    if d.feature_mode == 'pixel_swap':
      clip_s, clip_t = fusion.swap_pixels(swap, clip_s, clip_t)
  return masks, swap, clip_s, clip_t


def _target_labels(pl):
  """``[B, T, H, W]`` pseudo-labels of the target clip (t[, t-1])."""
  keys = ('label_t', 'label_t1') if 'label_t1' in pl else ('label_t',)
  return jnp.stack([pl[k] for k in keys], 1)


def _source_labels(feat, probs, labels):
  """The source rule: the true labels (nearest-resized to the feature grid)
  where the prediction agrees, -1 elsewhere; and each pixel's reliability,
  the predicted probability of its true class."""
  labels = warp_ops.resize_nearest(labels[..., None], feat.shape[1:3])[
      ..., 0
  ].astype(jnp.int32)
  probs = _to_grid(probs, feat.shape[1:3])
  safe = jnp.clip(labels, 0, probs.shape[-1] - 1)
  rel = jnp.take_along_axis(probs, safe[..., None], -1)[..., 0]
  return jnp.where(jnp.argmax(probs, -1) == labels, labels, -1), rel


def _to_grid(probs: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Class probabilities on a feature grid (a multi-resolution model's
  features are the context pass's, coarser than its fused scores)."""
  if probs.shape[1:3] == tuple(grid):
    return probs
  return warp_ops.resize_bilinear(probs, grid)


def _alignment_views(config, out_s, labels_src, target_passes, pl):
  """Source and target views ``{'feat', 'label', 'reliability'}`` with
  names, for the spatio-temporal aggregation (alignment.py)."""
  a = config.dastc.alignment
  cur, key = (
      ('feat', 'key_feat') if a.feature == 'feat' else ('pred', 'key_logits')
  )
  sg = jax.lax.stop_gradient
  probs = lambda logits: jax.nn.softmax(sg(logits).astype(jnp.float32), -1)
  source = []
  for name, fk, lk, f in (('t', cur, 'pred', 0), ('t1', key, 'key_logits', 1)):
    if fk not in out_s:
      continue
    lab, rel = _source_labels(out_s[fk], probs(out_s[lk]), labels_src[:, f])
    source.append((name, {'feat': out_s[fk], 'label': lab, 'reliability': rel}))
  # Target: frame t of every pass, and each pass's key frame.
  target = []
  for name, out in target_passes:  # ('strong', (t, t-1)), ('clean', (t, t-2))
    frames = [('t', cur, 'pred', 'probs_lo')]
    if key in out:  # the strong pass's key frame is t-1, the clean one's t-2
      k = 't1' if name == 'strong' else 't2'
      frames.append((k, key, 'key_logits', f'probs_{k}_lo'))
    for frame, fk, lk, pk in frames:
      grid = out[fk].shape[1:3]
      teacher = _to_grid(pl[pk], grid)
      own = _to_grid(probs(out[lk]), grid)
      lab = jnp.argmax(teacher if a.target_labels == 'teacher' else own, -1)
      rel = jnp.take_along_axis(teacher, lab[..., None], -1)[..., 0]
      target.append(
          (
              f'{frame}_{name}' if frame == 't' else frame,
              {'feat': out[fk], 'label': lab, 'reliability': rel},
          )
      )
  return source, target


def _alignment_loss(config, out_s, labels_src, target_passes, pl):
  """Category-aware spatio-temporal alignment of one batch.

  Returns the loss and metrics: the classes aligned and, per view, the mean
  weight it gets over the classes present there (``align_w/{view}``).
  """
  a = config.dastc.alignment
  num_classes = config.model.num_classes
  info = {}
  if a.aggregation == 'frames':
    adaptive = a.temporal == 'adaptive'
    views_s, views_t = _alignment_views(
        config, out_s, labels_src, target_passes, pl
    )
    ps, pres_s, _ = alignment.spatio_temporal_prototypes(
        [v for _, v in views_s],
        num_classes,
        a.min_pixels,
        a.temporal_temperature,
        adaptive,
    )
    pt, pres_t, w = alignment.spatio_temporal_prototypes(
        [v for _, v in views_t],
        num_classes,
        a.min_pixels,
        a.temporal_temperature,
        adaptive,
    )
    counted = jnp.maximum(jnp.sum(w > 0, 1), 1)
    for (name, _), wv, n in zip(views_t, w, counted):
      info[f'align_w/{name}'] = jnp.sum(wv) / n
  else:  # 'pairs': the reference's fused pair outputs with self-labels
    key = 'pred' if a.feature == 'logits' else 'feat'
    pred = out_s['pred']
    lab = warp_ops.resize_nearest(labels_src[:, 0][..., None], pred.shape[1:3])[
        ..., 0
    ]
    lab = jnp.where(jnp.argmax(pred, -1) == lab, lab, -1)
    ps, pres_s = alignment.class_prototypes(
        out_s[key], lab, num_classes, a.min_pixels
    )
    protos, present, ents = [], [], []
    for _, out in target_passes:  # (t, t-1), (t, t-2)
      p, m = alignment.class_prototypes(
          out[key], jnp.argmax(out['pred'], -1), num_classes, a.min_pixels
      )
      protos.append(p)
      present.append(m)
      ents.append(alignment.mean_entropy(out['pred']))
    w = alignment.temporal_weights(
        jnp.stack(ents), a.temporal_temperature, a.temporal == 'adaptive'
    )
    pt, pres_t = alignment.aggregate_pairs(
        jnp.stack(protos),
        jnp.stack(present),
        w,
        renormalize=not config.dastc.bugs.zero_rows_in_temporal_mean,
    )
    for (name, _), wv in zip(target_passes, w):
      info[f'align_w/{name}'] = wv
  if a.kind == 'mmd':
    loss = alignment.mmd_rbf(ps, pt)
  else:  # 'contrastive' or 'cosine' (``runtime/validation.py`` checks it)
    if a.detach_source:
      ps = jax.lax.stop_gradient(ps)
    if a.kind == 'cosine':
      loss = alignment.cosine_pull(ps, pt, pres_s & pres_t)
    else:
      loss = alignment.contrastive(
          ps, pt, pres_s & pres_t, temperature=a.temperature, margin=a.margin
      )
  info['align_classes'] = jnp.sum(pres_s & pres_t).astype(jnp.float32)
  return loss, info


def _next_target_masks(key, config, pl, source_classes):
  """Confident regions of 2 random pseudo-label classes (T' of next step)."""
  d = config.dastc
  keys = jax.random.split(key, pl['label_t'].shape[0])
  k_t = jax.vmap(
      lambda k, lab, ex: fusion.pick_classes(
          k, lab, d.num_target_classes, config.model.num_classes, ex
      )
  )(keys, pl['label_t'], source_classes)
  masks = [
      jax.vmap(fusion.class_mask)(pl[f'label_{f}'], k_t)
      & (pl[f'conf_{f}'] > d.confidence)
      for f in ('t', 't1')
      if f'label_{f}' in pl
  ]
  return jnp.stack(masks, 1)  # [B, T, H, W]: M_d (, M_c)


def pseudo_label_metrics(
    pl_label: jax.Array, label: jax.Array, class_names: tuple[str, ...]
) -> dict[str, jax.Array]:
  """Pseudo-label quality against held-out target labels (monitoring).

  All values are shares of the batch's valid pixels, so they average over a
  logging window without NaNs: ``pl_accuracy``, and per class k
  ``pl_share/{k}`` (pixels the pseudo-labels call k), ``pl_true_share/{k}``
  (pixels that are k) and ``pl_correct_share/{k}`` (both). Recall of k is
  correct / true, precision correct / share; a class that swallows others
  shows a share far above its true share.
  """
  c = len(class_names)
  lab = label.astype(jnp.int32)
  valid = lab < c
  n = jnp.maximum(jnp.sum(valid), 1)
  out = {'pl_accuracy': jnp.sum((pl_label == lab) & valid) / n}
  for k, name in enumerate(class_names):
    called = (pl_label == k) & valid
    out[f'pl_share/{name}'] = jnp.sum(called) / n
    out[f'pl_true_share/{name}'] = jnp.sum(lab == k) / n
    out[f'pl_correct_share/{name}'] = jnp.sum(called & (lab == k)) / n
  return out


def make_dastc_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    class_names: tuple[str, ...],
    rare_classes: tuple[int, ...],
    teacher_graphdef: nnx.GraphDef | None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Any]]]:
  """Builds ``dastc_step(state, batch) -> (state, metrics)`` (pure; the
  runtime adds the LR metrics and the non-finite guard, ``runtime/steps.py``).

  ``class_names`` name the trained classes (pseudo-label monitoring);
  ``rare_classes`` are the long-tail class ids that the fusion pastes.
  ``teacher_graphdef``: the graph of a separately trained frozen teacher
  (``dastc.frozen_teacher``; its weights are ``state.teacher``), or None.

  ``batch['source']``: ``frames`` ``[B, 2, Hs, Ws, 3]`` uint8 (histogram
  matched), ``labels`` ``[B, 2, Hs, Ws]``, ``flow`` ``[B, Hs, Ws, 2]``, and
  for the fusion ``crop`` ``[B, 2]``, ``rare_frames`` ``[B, K, Ht, Wt, 3]``,
  ``rare_labels``, ``rare_classes`` ``[B, K]``. ``batch['target']``:
  ``frames`` ``[B, 3, Ht, Wt, 3]`` (t, t-1, t-2), ``flow`` (t->t-1),
  ``flow_t_t2``, ``flow_t1_t2``, and ``label`` (monitoring only). In the
  image domain every clip has one frame and there are no flows.
  """
  d = config.dastc
  video = models.clip_length(config.model) == 2
  n_frames = 2 if video else 1
  aux_w = config.loss.aux_weight
  lam = d.lambda_t
  dtype = models.compute_dtype(config.model.dtype)
  adapt_start = config.train.source_only_steps
  # 'pixel_swap' moves the exchange's regions as pixels (_fusion_inputs).
  layer = (
      d.feature_layer
      if d.feature_fusion and d.feature_mode != 'pixel_swap'
      else None
  )
  if d.feature_mode == 'blend':
    mix_fn = functools.partial(
        fusion.feature_mix, other_weight=d.feature_other_weight
    )
  else:
    mix_fn = fusion.feature_swap
  ce = losses.cross_entropy
  ce_up = losses.upsampled_cross_entropy
  # CE of the fused scores (plus a multi-resolution model's detail term).
  seg = losses.segmentation_loss(config.model)
  fd = d.feature_distance
  fd_ids = tuple(class_names.index(k) for k in fd.classes)

  def step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    # One split per step; every random choice has its own key (MIC adds
    # one, so that runs without it keep their keys).
    k_drop, k_aug, k_paste, k_swap, k_next, k_flip, k_teacher, *k_mic = (
        jax.random.split(rng, 8 if d.mic.enabled else 7)
    )
    src, tgt = batch['source'], batch['target']
    size = tgt['frames'].shape[2:4]
    x_src = image_ops.normalize(src['frames'], dtype)  # [B, T, Hs, Ws, 3]
    y_src = src['labels'].astype(jnp.int32)  # [B, T, Hs, Ws]
    x_tgt = image_ops.normalize(tgt['frames'], dtype)  # [B, T+1, Ht, Wt, 3]
    src_flow, tgt_flow = src.get('flow'), tgt.get('flow')

    pl, teacher, stats0, prior = _pseudo_labels(
        config,
        graphdef,
        teacher_graphdef,
        state,
        x_tgt,
        tgt,
        size,
        adapt_start,
        k_flip,
        k_teacher,
        src_labels=y_src,
    )
    # Labels used by the losses; the carried T' masks use the raw ones.
    pl_loss = pseudo_labels.ignore_unconfident(pl, d.pl_threshold)
    pl_loss = pseudo_labels.keep_class_top(
        pl_loss, d.pl_class_balanced, config.model.num_classes
    )
    if 'pl_valid' in tgt:  # data.target.pseudo_margins
      pl_loss = pseudo_labels.ignore_outside(pl_loss, tgt['pl_valid'])
    # Per-clip weight of the pseudo-labelled losses ([B]; None: 1).
    pl_w = (
        pseudo_labels.quality(pl, d.pl_quality_threshold)
        if d.pl_weighting == 'quality'
        else None
    )
    # The blur follows the resized frame's width, not the crop's.
    resized = config.data.target.image_size
    x_st = augment.strong_augment(
        k_aug,
        tgt['frames'][:, :n_frames],
        d.strong_aug,
        dtype,
        image_width=resized[1] if resized else None,
    )
    if d.image_fusion:
      masks, swap, (xs_m, ys_m, fs_m), (xt_m, yt_m, ft_m) = _fusion_inputs(
          (k_paste, k_swap),
          config,
          state,
          src,
          tgt_flow,
          x_src,
          x_st,
          pl_loss,
          size,
          tuple(rare_classes),
      )
      clip_sm = (xs_m[:, 0], xs_m[:, 1], fs_m) if video else (xs_m[:, 0],)
      clip_tm = (xt_m[:, 0], xt_m[:, 1], ft_m) if video else (xt_m[:, 0],)
      mix_masks = swap if swap is not None else fusion.fused_mask(masks)
    if d.mic.enabled:
      k_mic_aug, k_mask, k_mic_drop = jax.random.split(k_mic[0], 3)
      x_mic = augment.strong_augment(
          k_mic_aug,
          tgt['frames'][:, :n_frames],
          d.mic.augment,
          dtype,
          image_width=resized[1] if resized else None,
      )
      x_mic = masking.mask_clip(
          x_mic,
          masking.block_mask(
              k_mask, x_mic.shape[:1] + size, d.mic.block_size, d.mic.ratio
          ),
      )

    if fd.weight:
      # The frozen start encoder's view of source frame t (no gradient).
      ref = state.imagenet_encoder
      ref_stats = dict(stats0)
      if ref['batch_stats']:
        ref_stats['backbone'] = ref['batch_stats']
      ref_model = nnx.merge(
          graphdef, {**state.params, 'backbone': ref['params']}, ref_stats
      )
      ref_enc = jax.lax.stop_gradient(ref_model.reference_encoding(x_src[:, 0]))

    def loss_fn(params):
      model = nnx.merge(graphdef, params, stats0)
      keys = jax.random.split(k_drop, 4)
      out_s = model.clip(x_src, src_flow, train=True, rng=keys[0])
      l_src = seg(out_s, y_src[:, 0], x_src.shape[2:4]) + aux_w * ce_up(
          out_s['pred_aux'], y_src[:, 0]
      )
      out_st = model.clip(x_st, tgt_flow, train=True, rng=keys[1])
      l_cons = seg(out_st, pl_loss['label_lo'], size, pl_w) + aux_w * ce(
          out_st['pred_aux'], pl_loss['label_aux_lo'], weights=pl_w
      )
      # The running averages every variant shares: these two passes.
      fixed_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      terms = {'loss_src': l_src, 'loss_cons': l_cons}
      total = l_src + lam * l_cons
      if fd.weight:
        terms['loss_fd'], terms['fd_cells'] = fd_lib.feature_distance(
            out_s['enc'],
            ref_enc,
            y_src[:, 0],
            fd_ids,
            fd.min_ratio,
            config.model.num_classes,
        )
        total += fd.weight * terms['loss_fd']
      if d.image_fusion:
        out_sm, out_tm = model.mixed_pair(
            clip_sm,
            clip_tm,
            mix_masks,
            layer=layer,
            mix_fn=mix_fn,
            train=True,
            rng=keys[2],
            lt_mask=masks['lt'],
        )
        terms['loss_src_mix'] = seg(out_sm, ys_m[:, 0], size)
        # The target-context clip: mostly pseudo-labels, weighted as such.
        terms['loss_tgt_mix'] = seg(out_tm, yt_m[:, 0], size, pl_w)
        terms.update(out_sm['mix_info'])
        total += terms['loss_src_mix'] + lam * terms['loss_tgt_mix']
      if d.mic.enabled:
        out_mic = model.clip(x_mic, tgt_flow, train=True, rng=k_mic_drop)
        terms['loss_mic'] = seg(out_mic, pl_loss['label_lo'], size, pl_w)
        total += d.mic.weight * terms['loss_mic']
      if d.alignment.kind != 'none':
        passes = [('strong', out_st)]
        if d.alignment.pairs == 2 and video:
          passes.append(
              (
                  'clean',
                  model(
                      x_tgt[:, 0],
                      x_tgt[:, 2],
                      tgt['flow_t_t2'],
                      train=True,
                      rng=keys[3],
                  ),
              )
          )
        l_align, info = _alignment_loss(config, out_s, y_src, passes, pl)
        terms['loss_align'] = l_align
        terms.update(info)
        total += d.alignment.weight * l_align
      stats = (
          fixed_stats
          if d.bn_update == 'fixed'
          else nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      )
      return total, (terms, stats)

    (loss, (terms, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if d.teacher == 'ema':
      teacher = pseudo_labels.ema_update(
          teacher, {'params': params, 'batch_stats': stats}, d.ema_decay
      )
    source_classes = (
        masks['source_classes']
        if d.image_fusion
        else jnp.full((y_src.shape[0], 1), -1, jnp.int32)
    )
    carried = {
        'src_frames': src['frames'],
        'src_labels': src['labels'],
        'tgt_frames': tgt['frames'][:, :n_frames],
        'tgt_labels': _target_labels(pl).astype(jnp.uint8),
        'tgt_masks': _next_target_masks(k_next, config, pl, source_classes),
        'has_prev': jnp.asarray(True),
        'class_prior': prior,
    }
    if video:
      carried['src_flow'], carried['tgt_flow'] = src_flow, tgt_flow
    metrics = {
        'loss': loss,
        **terms,
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(params),
        'pl_confident': jnp.mean(pl['conf_t'] > d.confidence),
    }
    if pl_w is not None:
      metrics['pl_quality'] = jnp.mean(pl_w)
    if d.pl_class_balanced > 0:  # share of frame t's labels kept
      metrics['pl_kept'] = jnp.mean(pl_loss['label_lo'] != 255)
    if 'pl_valid' in tgt:  # share of the crop inside the margins
      metrics['pl_margin_share'] = 1.0 - jnp.mean(tgt['pl_valid'] > 0)
    if 'label' in tgt:  # monitoring only: never used by a loss
      metrics.update(
          pseudo_label_metrics(pl['label_t'], tgt['label'], class_names)
      )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=stats,
        opt_state=opt_state,
        teacher=teacher,
        carried=carried,
    )
    return new_state, metrics

  return step
