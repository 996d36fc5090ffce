"""ACCEL video segmentation model on a DeepLab-v2 ResNet (docs/reference_code.md, "Models").

Both frames of a clip go through the same network: the current frame t with
gradients, the key frame t-1 under ``stop_gradient`` (its BatchNorm still
uses batch statistics in training and updates the running averages, in the
reference order: current frame first). The key-frame scores are warped to
frame t with the flow t->t-1 and fused with the current scores by a 2C->C
1x1 conv initialised to [I | 0], so at init the fused output equals the
current-frame scores.

``deeplabv2`` (the image domain, clip length 1) is the same network without
the key frame, the flow and the fusion layer: its fused scores are the
current frame's.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from dastc_jax import errors
from dastc_jax.models import heads
from dastc_jax.models import layers
from dastc_jax.models import resnet
from dastc_jax.ops import warp as warp_ops


class AccelDeepLab(nnx.Module):
  """ACCEL-DeepLabv2: two-frame segmentation with flow-guided score fusion
  (or, with ``config.name == 'deeplabv2'``, single-frame DeepLabv2)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = layers.compute_dtype(config.dtype)
    c = config.num_classes
    backbone_init = layers.initializer(config.backbone_init, config.init_std)
    head_init = layers.normal(config.init_std)
    self.num_classes = c
    self.per_axis_flow_scale = config.per_axis_flow_scale
    kernel_grad = config.conv_kernel_grad
    self.backbone = resnet.ResNetDeepLab(
        blocks=tuple(config.layers), width=config.width,
        bn_momentum=config.bn_momentum, kernel_init=backbone_init,
        bn_group_size=config.bn_group_size,
        stride_in_1x1=config.stride_in_1x1,
        kernel_grad=kernel_grad, dtype=dtype, rngs=rngs)
    feats = self.backbone.out_features
    # `layer5` of the reference: the aux classifier on layer3.
    self.aux_head = heads.ASPPSum(feats['layer3'], c, config.aspp_dilations,
                                  kernel_init=head_init, dtype=dtype,
                                  kernel_grad=kernel_grad, rngs=rngs)
    head = config.head
    if head == 'proda':
      # `layer7` of the reference: ASPP to a feature, then logits.
      self.head = heads.ProdaHead(feats['layer4'], config.head_features, c,
                                  config.aspp_dilations, config.dropout,
                                  kernel_init=head_init, dtype=dtype,
                                  kernel_grad=kernel_grad, rngs=rngs)
    elif head == 'aspp':
      # `layer6` of DA-VSN/TPS: ASPP straight to the logits.
      self.head = heads.ASPPLogitsHead(feats['layer4'], c,
                                       config.aspp_dilations,
                                       kernel_init=head_init, dtype=dtype,
                                       kernel_grad=kernel_grad, rngs=rngs)
    else:
      raise errors.ConfigError(f"Unknown config.model.head={head!r}; expected "
                       "'proda' (DA-STC layer7) or 'aspp' (TPS layer6).")
    self.clip_length = 1 if config.name == 'deeplabv2' else 2
    if self.clip_length == 2:
      # `sf_layer`: score fusion, initialised to output the current scores.
      self.sf_layer = layers.Conv(2 * c, c, 1,
                                  kernel_init=layers.identity_fusion_init(c),
                                  dtype=dtype, rngs=rngs)

  def heads(self, feats: dict[str, jax.Array], *, train: bool,
            dropout_key: jax.Array | None) -> dict[str, jax.Array]:
    """Aux head on layer3, main head on layer4 (float32 outputs)."""
    logits, feat = self.head(feats['layer4'], dropout_key if train else None)
    aux = self.aux_head(feats['layer3'])
    return {'logits': logits.astype(jnp.float32),
            'aux': aux.astype(jnp.float32), 'feat': feat}

  def single_frame(self, x: jax.Array, *, train: bool,
                   dropout_key: jax.Array | None) -> dict[str, jax.Array]:
    """Per-frame network: logits, aux logits and the pre-logit feature.

    Args:
      x: ``[B, H, W, 3]`` normalised BGR frame.
      train: batch-statistics BN and dropout when True.
      dropout_key: key for Dropout2d (unused at eval).

    Returns:
      dict with ``logits``/``aux`` ``[B, h, w, C]`` and ``feat``
      ``[B, h, w, F]`` at output stride 8.
    """
    return self.heads(self.backbone(x, train), train=train,
                      dropout_key=dropout_key)

  def fuse(self, cur: jax.Array, key: jax.Array, flow: jax.Array, *,
           out_size: tuple[int, int] | None = None,
           lt_mask: jax.Array | None = None) -> jax.Array:
    """Warps key-frame scores to frame t and fuses them with ``cur``.

    Args:
      cur: ``[B, h, w, C]`` current-frame scores.
      key: ``[B, h, w, C]`` key-frame scores.
      flow: ``[B, H, W, 2]`` flow t->t-1 on any grid; it is resized to the
        fusion grid with magnitude rescaling (docs/reference_code.md, "Optical flow").
      out_size: fuse at this size (scores upsampled first, align corners);
        None fuses at the score resolution.
      lt_mask: ``[B, H', W']`` long-tail paste mask at ``out_size``: there
        the warped key-frame scores are replaced by the current ones (the
        pasted patches are static, docs/reference_code.md, "Models").

    Returns:
      Fused scores at the fusion grid.
    """
    if out_size is not None:
      cur = warp_ops.resize_bilinear(cur, out_size)
      key = warp_ops.resize_bilinear(key, out_size)
    flow = warp_ops.resize_flow(flow.astype(jnp.float32), cur.shape[1:3],
                                self.per_axis_flow_scale)
    warped = warp_ops.warp(key, flow)
    if lt_mask is not None:
      m = lt_mask[..., None].astype(warped.dtype)
      warped = warped * (1.0 - m) + cur * m
    fused = self.sf_layer(jnp.concatenate([cur, warped], axis=-1))
    return fused.astype(jnp.float32)

  def _outputs(self, cur, key, flow, out_size, lt_mask):
    if key is None:  # single frame: the scores are the current frame's
      up = ((lambda x: warp_ops.resize_bilinear(x, out_size)) if out_size
            else (lambda x: x))
      return {'pred': up(cur['logits']), 'pred_aux': up(cur['aux']),
              'logits': cur['logits'], 'aux': cur['aux'],
              'feat': cur['feat']}
    key = jax.lax.stop_gradient(key)
    return {
        'pred': self.fuse(cur['logits'], key['logits'], flow,
                          out_size=out_size, lt_mask=lt_mask),
        'pred_aux': self.fuse(cur['aux'], key['aux'], flow,
                              out_size=out_size, lt_mask=lt_mask),
        'logits': cur['logits'],
        'aux': cur['aux'],
        'feat': cur['feat'],
        'key_logits': key['logits'],
        'key_aux': key['aux'],
        'key_feat': key['feat'],
    }

  def __call__(self, frame_cur: jax.Array, frame_key: jax.Array | None,
               flow: jax.Array | None, *, train: bool,
               rng: jax.Array | None = None,
               fuse_at_input: bool = False,
               lt_mask: jax.Array | None = None) -> dict[str, Any]:
    """Two-frame forward pass.

    Args:
      frame_cur: ``[B, H, W, 3]`` normalised frame t.
      frame_key: ``[B, H, W, 3]`` normalised key frame t-1 (None for
        ``deeplabv2``).
      flow: ``[B, H, W, 2]`` flow t->t-1 (pixels of its own grid; None for
        ``deeplabv2``).
      train: training mode (batch-stat BN, dropout).
      rng: dropout key; required when ``train`` and dropout > 0.
      fuse_at_input: fuse at the input resolution (the fusion clips).
      lt_mask: ``[B, H, W]`` long-tail mask (with ``fuse_at_input``).

    Returns:
      dict: ``pred``/``pred_aux`` fused scores (``[B, h, w, C]``, or
      ``[B, H, W, C]`` with ``fuse_at_input``), the current frame's
      ``logits``/``aux``/``feat`` and the key frame's
      ``key_logits``/``key_aux``/``key_feat`` (gradient-free).
    """
    k_cur = k_key = None
    if train and rng is not None:
      k_cur, k_key = jax.random.split(rng)
    cur = self.single_frame(frame_cur, train=train, dropout_key=k_cur)
    key = None
    if self.clip_length == 2:
      key = self.single_frame(frame_key, train=train, dropout_key=k_key)
    out_size = frame_cur.shape[1:3] if fuse_at_input else None
    return self._outputs(cur, key, flow, out_size, lt_mask)

  def clip(self, frames: jax.Array, flow: jax.Array | None, *, train: bool,
           rng: jax.Array | None = None, **kw) -> dict[str, Any]:
    """Forward of a clip ``[B, T, H, W, 3]`` (t, t-1, ...; T >= clip
    length) with its flow t->t-1 (None for ``deeplabv2``)."""
    if self.clip_length == 1:
      return self(frames[:, 0], None, None, train=train, rng=rng, **kw)
    return self(frames[:, 0], frames[:, 1], flow, train=train, rng=rng, **kw)

  def mixed_pair(self, clip_s: tuple[jax.Array, ...],
                 clip_t: tuple[jax.Array, ...], masks: jax.Array, *,
                 layer: str | None, mix_fn: Callable[..., Any] | None,
                 train: bool, rng: jax.Array | None,
                 lt_mask: jax.Array | None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Forwards the source- and target-context clips, mixing their shallow
    features after ``layer`` inside ``masks`` (shallow-feature fusion).

    Args:
      clip_s: ``(cur, key, flow)`` of the source-context clip (``(cur,)``
        for ``deeplabv2``).
      clip_t: ``(cur, key, flow)`` of the target-context clip.
      masks: a pytree of ``[B, T, H, W]`` masks (frame t, and frame t-1);
        ``mix_fn`` receives frame f's slice ``[:, f]`` of every leaf.
      layer: backbone stage after which features are mixed (``stem``,
        ``layer1``, ...); None disables the feature-level fusion.
      mix_fn: ``(feat_s, feat_t, masks_f) -> (feat_s, feat_t, info)``;
        ``info`` is a dict of scalars, returned per frame in the source
        clip's output under ``mix_info`` (``{name}_f{f}``).
      train: training mode.
      rng: dropout key.
      lt_mask: ``[B, H, W]`` long-tail mask for the score swap.

    Returns:
      The two clips' outputs, fused at the input resolution.
    """
    keys = (list(jax.random.split(rng, 4)) if train and rng is not None
            else [None] * 4)
    frames = []
    info = {}
    for f in range(self.clip_length):
      xs, xt = clip_s[f], clip_t[f]
      if layer is None:
        fs, ft = self.backbone(xs, train), self.backbone(xt, train)
      else:
        s1 = self.backbone(xs, train, last=layer)
        t1 = self.backbone(xt, train, last=layer)
        ms, mt, frame_info = mix_fn(s1[layer], t1[layer],
                                    jax.tree.map(lambda m: m[:, f], masks))
        info.update({f'{k}_f{f}': v for k, v in frame_info.items()})
        nxt = resnet.ResNetDeepLab.STAGES[
            resnet.ResNetDeepLab.STAGES.index(layer) + 1]
        # The mixed feature replaces the stage output (an aux head on it
        # sees the mixed feature too).
        fs = {**s1, layer: ms, **self.backbone(ms, train, first=nxt)}
        ft = {**t1, layer: mt, **self.backbone(mt, train, first=nxt)}
      frames.append((self.heads(fs, train=train, dropout_key=keys[2 * f]),
                     self.heads(ft, train=train,
                                dropout_key=keys[2 * f + 1])))
    (cur_s, cur_t), (key_s, key_t) = (frames if self.clip_length == 2 else
                                      (frames[0], (None, None)))
    size = clip_s[0].shape[1:3]
    flow_s = clip_s[2] if self.clip_length == 2 else None
    flow_t = clip_t[2] if self.clip_length == 2 else None
    out_s = self._outputs(cur_s, key_s, flow_s, size, lt_mask)
    out_s['mix_info'] = info
    return out_s, self._outputs(cur_t, key_t, flow_t, size, lt_mask)
