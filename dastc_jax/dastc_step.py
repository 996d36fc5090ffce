"""The DA-STC train step (pure; jitted once with shardings in train.py).

One step (method.md §4, with the seed's two fusion levels and the
category-aware alignment):

1. the teacher segments the target pair (t-1, t-2); its probabilities warped
   to t are the pseudo-labels (``pseudo_labels.cross_frame``);
2. the target pair (t, t-1) is strongly augmented with one set of
   parameters (``ops.augment``);
3. image-sequence-level fusion: S', long-tail patches and T' are pasted into
   a source-context and a target-context clip (``fusion``);
4. losses: source CE (+ aux), consistency of the strong clip with the
   pseudo-labels, CE of both fused clips (fused at input resolution, with
   the long-tail score swap and the shallow-feature mixing), and the
   alignment of class prototypes over space and the temporal pairs
   (t, t-1), (t, t-2) (``alignment``):
   ``L = L_src + lambda_T (L_cons + L_tgt_mix) + L_src_mix + w L_align``;
5. the optimizer update, the EMA teacher update, and the roll-over of this
   iteration's clips into the carried state.

The image domain (``model.name='deeplabv2'``, clip length 1) runs the same
step on one frame: the teacher labels frame t itself, nothing is warped,
and the alignment has only the spatial term of frame t.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dastc_jax import alignment
from dastc_jax import divergence
from dastc_jax import fusion
from dastc_jax import losses
from dastc_jax import models
from dastc_jax import optim
from dastc_jax import pseudo_labels
from dastc_jax.data import labels as labels_lib
from dastc_jax.ops import augment
from dastc_jax.ops import image as image_ops
from dastc_jax.ops import warp as warp_ops
from dastc_jax.state import TrainState

Batch = dict[str, Any]


def _teacher_forward(config, graphdef, state, frames, flow,
                     adapt_start: int, rng: jax.Array):
  """The teacher's fused scores of frame t-1 (pair t-1, t-2; ``frames`` is
  that pair), or of frame t in the image domain; no gradient.

  Returns ``(pred, aux, teacher, batch_stats)``: the scores, the (possibly
  reset) teacher, and the BatchNorm averages the student starts from (the
  reference teacher in its student phase updates them, as the released code
  does; otherwise they are the state's).
  """
  d = config.dastc
  first = state.step == adapt_start
  # At the first adaptation step the teacher becomes the warm-started model.
  teacher = jax.tree.map(lambda t, s: jnp.where(first, s, t), state.teacher,
                         {'params': state.params,
                          'batch_stats': state.batch_stats})

  def run(params, stats, train):
    model = nnx.merge(graphdef, params, stats)
    out = model.clip(frames, flow, train=train, rng=rng if train else None)
    new_stats = (nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)) if train
                 else state.batch_stats)
    return out['pred'], out['pred_aux'], new_stats

  if d.teacher == 'ema':
    pred, aux, stats = run(teacher['params'], teacher['batch_stats'], False)
  elif d.teacher == 'reference':
    pred, aux, stats = jax.lax.cond(
        pseudo_labels.use_student(state.step, adapt_start,
                                  d.teacher_switch_steps),
        lambda: run(state.params, state.batch_stats, True),
        lambda: run(teacher['params'], teacher['batch_stats'], False))
  else:
    raise ValueError(f"Unknown config.dastc.teacher={d.teacher!r}; expected "
                     "'ema' or 'reference'.")
  stats = jax.lax.stop_gradient(stats)
  return (jax.lax.stop_gradient(pred), jax.lax.stop_gradient(aux), teacher,
          stats)


def _pseudo_labels(config, graphdef, state, x_tgt, tgt, size, adapt_start,
                   rng):
  """Teacher pass (with the optional random mirror) and cross-frame labels."""
  d = config.dastc
  video = models.clip_length(config.model) == 2
  # The teacher's clip: (t-1, t-2) with the flow t-1 -> t-2, or frame t.
  frames = x_tgt[:, 1:3] if video else x_tgt[:, :1]
  flow = tgt['flow_t1_t2'] if video else None
  flip = None
  if d.teacher_flip > 0:
    flip = jax.random.bernoulli(jax.random.fold_in(rng, 1), d.teacher_flip,
                                (x_tgt.shape[0],))
    frames = pseudo_labels.hflip(frames, flip)  # [B, T, H, W, 3]
    if video:
      flow = pseudo_labels.hflip_flow(flow, flip,
                                      negate_dx=not d.bugs.flip_keep_dx)
  pred, aux, teacher, stats = _teacher_forward(
      config, graphdef, state, frames, flow, adapt_start,
      jax.random.fold_in(rng, 2))
  unflip_first = flip is not None and (not d.bugs.warp_before_unflip or
                                       not video)
  if unflip_first:
    pred, aux = pseudo_labels.hflip(pred, flip), pseudo_labels.hflip(aux, flip)
  if not video:
    return pseudo_labels.same_frame(pred, aux, size), teacher, stats
  pl = pseudo_labels.cross_frame(
      pred, aux, tgt['flow'], size,
      confidence_from_logit=d.bugs.confidence_from_logit)
  if flip is not None and not unflip_first:
    # Reference: the mirrored scores were warped, the maps mirrored after.
    pl = {k: pseudo_labels.hflip_labels(v, flip) for k, v in pl.items()}
  return pl, teacher, stats


def _fusion_inputs(key, config, state, src, tgt_flow, x_src, x_strong, pl,
                   size):
  """Builds both fused clips (frames, labels, flows) and their masks."""
  d = config.dastc
  c = state.carried
  dtype = x_src.dtype
  crop = lambda x, ch: fusion.crop(x, src['crop'], size, ch)
  norm = lambda x: image_ops.normalize(x, dtype)
  masks = fusion.sample_masks(
      key, prev_src_labels=crop(c['src_labels'], False),
      rare_labels=src['rare_labels'], rare_classes=src['rare_classes'],
      prev_tgt_masks=c['tgt_masks'], has_prev=c['has_prev'],
      num_classes=config.model.num_classes,
      num_source_classes=d.num_source_classes,
      rare_class_list=labels_lib.RARE_CLASSES[config.data.class_set],
      clip_lt=not d.bugs.unclipped_lt_mask)
  pastes = dict(prev_src=norm(crop(c['src_frames'], True)),
                prev_src_labels=crop(c['src_labels'], False),
                rare=norm(src['rare_frames']),
                prev_tgt=norm(c['tgt_frames']),
                prev_tgt_labels=c['tgt_labels'], masks=masks)
  xs, ys = fusion.compose(crop(x_src, True), crop(src['labels'], False),
                          **pastes)
  xt, yt = fusion.compose(x_strong, _target_labels(pl), **pastes)
  if tgt_flow is None:  # image domain: no flows to mix
    return masks, (xs, ys, None), (xt, yt, None)
  flows = dict(prev_src_flow=crop(c['src_flow'], True),
               prev_tgt_flow=c['tgt_flow'], masks=masks,
               key_frame_masks=d.bugs.flow_mix_key_masks)
  fs = fusion.mix_flow(crop(src['flow'], True), **flows)
  ft = fusion.mix_flow(tgt_flow, **flows)
  return masks, (xs, ys, fs), (xt, yt, ft)


def _target_labels(pl):
  """``[B, T, H, W]`` pseudo-labels of the target clip (t[, t-1])."""
  keys = ('label_t', 'label_t1') if 'label_t1' in pl else ('label_t',)
  return jnp.stack([pl[k] for k in keys], 1)


def _alignment_loss(config, out_src, label_src, target_outs):
  """Category-aware spatio-temporal alignment of one batch."""
  a = config.dastc.alignment
  num_classes = config.model.num_classes
  key = 'pred' if a.feature == 'logits' else 'feat'
  pred = out_src['pred']
  lab = warp_ops.resize_nearest(label_src[..., None], pred.shape[1:3])[..., 0]
  # Source: pixels whose prediction matches the label (method.md §4.6).
  lab = jnp.where(jnp.argmax(pred, -1) == lab, lab, -1)
  ps, pres_s = alignment.class_prototypes(out_src[key], lab, num_classes,
                                          a.min_pixels)
  protos, present, ents = [], [], []
  for out in target_outs:  # temporal pairs (t, t-1), (t, t-2)
    self_label = jnp.argmax(out['pred'], -1)
    p, m = alignment.class_prototypes(out[key], self_label, num_classes,
                                      a.min_pixels)
    protos.append(p)
    present.append(m)
    ents.append(alignment.mean_entropy(out['pred']))
  w = alignment.temporal_weights(jnp.stack(ents), a.entropy_temperature,
                                 a.temporal == 'entropy')
  pt, pres_t = alignment.aggregate_pairs(
      jnp.stack(protos), jnp.stack(present), w,
      renormalize=not config.dastc.bugs.zero_rows_in_temporal_mean)
  if a.kind == 'mmd':
    loss = alignment.mmd_rbf(ps, pt)
  elif a.kind == 'contrastive':
    if a.detach_source:
      ps = jax.lax.stop_gradient(ps)
    loss = alignment.contrastive(ps, pt, pres_s & pres_t,
                                 temperature=a.temperature, margin=a.margin)
  else:
    raise ValueError(f"Unknown config.dastc.alignment.kind={a.kind!r}; "
                     "expected 'contrastive', 'mmd' or 'none'.")
  return loss, {'align_weight_t1': w[0],
                'align_classes': jnp.sum(pres_s & pres_t).astype(jnp.float32)}


def _next_target_masks(key, config, pl, source_classes):
  """Confident regions of 2 random pseudo-label classes (T' of next step)."""
  d = config.dastc
  keys = jax.random.split(key, pl['label_t'].shape[0])
  k_t = jax.vmap(lambda k, lab, ex: fusion.pick_classes(
      k, lab, d.num_target_classes, config.model.num_classes, ex))(
          keys, pl['label_t'], source_classes)
  masks = [jax.vmap(fusion.class_mask)(pl[f'label_{f}'], k_t) &
           (pl[f'conf_{f}'] > d.confidence)
           for f in ('t', 't1') if f'label_{f}' in pl]
  return jnp.stack(masks, 1)  # [B, T, H, W]: M_d (, M_c)


def make_dastc_step(config: ml_collections.ConfigDict,
                    graphdef: nnx.GraphDef, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, Batch], tuple[TrainState,
                                                             dict[str, Any]]]:
  """Builds ``dastc_step(state, batch) -> (state, metrics)``.

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
  aux_w = d.aux_weight
  lam = d.lambda_t
  dtype = models.compute_dtype(config.model.dtype)
  adapt_start = config.train.source_only_steps
  schedules = optim.group_schedules(config.optim,
                                    optim.adaptation_start(config))
  layer = d.feature_layer if d.feature_fusion else None
  mix_fn = functools.partial(fusion.feature_mix,
                             other_weight=d.feature_other_weight)
  ce = losses.cross_entropy
  ce_up = losses.upsampled_cross_entropy

  def step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_drop, k_aug, k_mix, k_next = jax.random.split(rng, 4)
    src, tgt = batch['source'], batch['target']
    size = tgt['frames'].shape[2:4]
    x_src = image_ops.normalize(src['frames'], dtype)  # [B, T, Hs, Ws, 3]
    y_src = src['labels'][:, 0].astype(jnp.int32)
    x_tgt = image_ops.normalize(tgt['frames'], dtype)  # [B, T+1, Ht, Wt, 3]
    src_flow, tgt_flow = src.get('flow'), tgt.get('flow')

    pl, teacher, stats0 = _pseudo_labels(config, graphdef, state, x_tgt,
                                         tgt, size, adapt_start, rng)
    # Labels used by the losses; the carried T' masks use the raw ones.
    pl_loss = pseudo_labels.ignore_unconfident(pl, d.pl_threshold)
    x_st = augment.strong_augment(k_aug, tgt['frames'][:, :n_frames],
                                  d.strong_aug, dtype)
    if d.image_fusion:
      masks, (xs_m, ys_m, fs_m), (xt_m, yt_m, ft_m) = _fusion_inputs(
          k_mix, config, state, src, tgt_flow, x_src, x_st, pl_loss,
          size)
      clip_sm = (xs_m[:, 0], xs_m[:, 1], fs_m) if video else (xs_m[:, 0],)
      clip_tm = (xt_m[:, 0], xt_m[:, 1], ft_m) if video else (xt_m[:, 0],)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, stats0)
      keys = jax.random.split(k_drop, 4)
      out_s = model.clip(x_src, src_flow, train=True, rng=keys[0])
      l_src = ce_up(out_s['pred'], y_src) + aux_w * ce_up(out_s['pred_aux'],
                                                          y_src)
      out_st = model.clip(x_st, tgt_flow, train=True, rng=keys[1])
      l_cons = ce(out_st['pred'], pl_loss['label_lo']) + aux_w * ce(
          out_st['pred_aux'], pl_loss['label_aux_lo'])
      terms = {'loss_src': l_src, 'loss_cons': l_cons}
      total = l_src + lam * l_cons
      if d.image_fusion:
        out_sm, out_tm = model.mixed_pair(
            clip_sm, clip_tm, fusion.fused_mask(masks), layer=layer, mix_fn=mix_fn,
            train=True, rng=keys[2], lt_mask=masks['lt'])
        terms['loss_src_mix'] = ce(out_sm['pred'], ys_m[:, 0])
        terms['loss_tgt_mix'] = ce(out_tm['pred'], yt_m[:, 0])
        total += terms['loss_src_mix'] + lam * terms['loss_tgt_mix']
      if d.alignment.kind != 'none':
        pairs = [out_st]
        if d.alignment.pairs == 2 and video:
          pairs.append(model(x_tgt[:, 0], x_tgt[:, 2], tgt['flow_t_t2'],
                             train=True, rng=keys[3]))
        l_align, info = _alignment_loss(config, out_s, y_src, pairs)
        terms['loss_align'] = l_align
        terms.update(info)
        total += d.alignment.weight * l_align
      stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      return total, (terms, stats)

    (loss, (terms, stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if d.teacher == 'ema':
      teacher = pseudo_labels.ema_update(
          teacher, {'params': params, 'batch_stats': stats}, d.ema_decay)
    source_classes = (masks['source_classes'] if d.image_fusion else
                      jnp.full((y_src.shape[0], 1), -1, jnp.int32))
    carried = {
        'src_frames': src['frames'], 'src_labels': src['labels'],
        'tgt_frames': tgt['frames'][:, :n_frames],
        'tgt_labels': _target_labels(pl).astype(jnp.uint8),
        'tgt_masks': _next_target_masks(k_next, config, pl, source_classes),
        'has_prev': jnp.asarray(True)}
    if video:
      carried['src_flow'], carried['tgt_flow'] = src_flow, tgt_flow
    metrics = {'loss': loss, **terms,
               'grad_norm': optax.tree.norm(grads),
               'param_norm': optax.tree.norm(params),
               'lr_backbone': schedules['backbone'](state.step),
               'lr_head': schedules['head'](state.step),
               'pl_confident': jnp.mean(pl['conf_t'] > d.confidence)}
    if 'label' in tgt:  # monitoring only: never used by a loss
      lab = tgt['label'].astype(jnp.int32)
      valid = lab < config.model.num_classes
      metrics['pl_accuracy'] = jnp.sum((pl['label_t'] == lab) & valid) / (
          jnp.maximum(jnp.sum(valid), 1))
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=stats, opt_state=opt_state,
                              teacher=teacher, carried=carried)
    return divergence.guard(config.train.get('nonfinite', 'stop'), state,
                            new_state, metrics)

  return step
