"""ACCEL video segmentation model on a DeepLab-v2 ResNet (method.md §3.1).

Both frames of a clip go through the same network: the current frame t with
gradients, the key frame t-1 under ``stop_gradient`` (its BatchNorm still
uses batch statistics in training and updates the running averages, in the
reference order: current frame first). The key-frame scores are warped to
frame t with the flow t->t-1 and fused with the current scores by a 2C->C
1x1 conv initialised to [I | 0], so at init the fused output equals the
current-frame scores.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from dastc_jax.models import heads
from dastc_jax.models import layers
from dastc_jax.models import resnet
from dastc_jax.ops import warp as warp_ops

class AccelDeepLab(nnx.Module):
  """ACCEL-DeepLabv2: two-frame segmentation with flow-guided score fusion."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = layers.compute_dtype(config.dtype)
    c = config.num_classes
    backbone_init = layers.initializer(config.backbone_init, config.init_std)
    head_init = layers.normal(config.init_std)
    self.num_classes = c
    self.per_axis_flow_scale = config.per_axis_flow_scale
    self.backbone = resnet.ResNetDeepLab(
        blocks=tuple(config.layers), width=config.width,
        bn_momentum=config.bn_momentum, kernel_init=backbone_init,
        dtype=dtype, rngs=rngs)
    feats = self.backbone.out_features
    # `layer5` of the reference: the aux classifier on layer3.
    self.aux_head = heads.ASPPSum(feats['layer3'], c, config.aspp_dilations,
                                  kernel_init=head_init, dtype=dtype,
                                  rngs=rngs)
    # `layer7` of the reference: ASPP to a feature, then logits.
    self.head = heads.ProdaHead(feats['layer4'], config.head_features, c,
                                config.aspp_dilations, config.dropout,
                                kernel_init=head_init, dtype=dtype, rngs=rngs)
    # `sf_layer`: score fusion, initialised to output the current scores.
    self.sf_layer = layers.Conv(2 * c, c, 1,
                                kernel_init=layers.identity_fusion_init(c),
                                dtype=dtype, rngs=rngs)

  def single_frame(self, x: jax.Array, *, train: bool,
                   dropout_key: jax.Array | None) -> dict[str, jax.Array]:
    """Per-frame network: logits, aux logits and the pre-logit feature.

    Args:
      x: ``[B, H, W, 3]`` normalised BGR frame.
      train: batch-statistics BN and dropout when True.
      dropout_key: key for Dropout2d (unused at eval).

    Returns:
      dict with ``logits``/``aux`` ``[B, h, w, C]`` and ``feat``
      ``[B, h, w, F]`` at output stride 8, plus ``stem`` and ``layer1``.
    """
    feats = self.backbone(x, train)
    logits, feat = self.head(feats['layer4'], dropout_key if train else None)
    aux = self.aux_head(feats['layer3'])
    return {'logits': logits.astype(jnp.float32),
            'aux': aux.astype(jnp.float32), 'feat': feat}

  def fuse(self, cur: jax.Array, key: jax.Array,
           flow: jax.Array) -> jax.Array:
    """Warps key-frame scores to frame t and fuses them with ``cur``.

    Args:
      cur: ``[B, h, w, C]`` current-frame scores.
      key: ``[B, h, w, C]`` key-frame scores.
      flow: ``[B, H, W, 2]`` flow t->t-1 on any grid; it is resized to
        ``(h, w)`` with magnitude rescaling (method.md §2.5).

    Returns:
      ``[B, h, w, C]`` fused scores.
    """
    flow = warp_ops.resize_flow(flow.astype(jnp.float32), cur.shape[1:3],
                                self.per_axis_flow_scale)
    warped = warp_ops.warp(key, flow)
    fused = self.sf_layer(jnp.concatenate([cur, warped], axis=-1))
    return fused.astype(jnp.float32)

  def __call__(self, frame_cur: jax.Array, frame_key: jax.Array,
               flow: jax.Array, *, train: bool,
               rng: jax.Array | None = None) -> dict[str, Any]:
    """Two-frame forward pass.

    Args:
      frame_cur: ``[B, H, W, 3]`` normalised frame t.
      frame_key: ``[B, H, W, 3]`` normalised key frame t-1.
      flow: ``[B, H, W, 2]`` flow t->t-1 (pixels of its own grid).
      train: training mode (batch-stat BN, dropout).
      rng: dropout key; required when ``train`` and dropout > 0.

    Returns:
      dict: ``pred``/``pred_aux`` fused scores ``[B, h, w, C]``, the current
      frame's ``logits``/``aux``/``feat`` and the key frame's
      ``key_logits``/``key_aux`` (gradient-free).
    """
    k_cur = k_key = None
    if train and rng is not None:
      k_cur, k_key = jax.random.split(rng)
    cur = self.single_frame(frame_cur, train=train, dropout_key=k_cur)
    key = self.single_frame(frame_key, train=train, dropout_key=k_key)
    key = jax.lax.stop_gradient(key)
    return {
        'pred': self.fuse(cur['logits'], key['logits'], flow),
        'pred_aux': self.fuse(cur['aux'], key['aux'], flow),
        'logits': cur['logits'],
        'aux': cur['aux'],
        'feat': cur['feat'],
        'key_logits': key['logits'],
        'key_aux': key['aux'],
    }
