"""ACCEL video segmentation model on a DeepLab-v2 ResNet
(docs/reference_code.md, "Models").

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


import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from dastc_jax import errors
from dastc_jax.models import heads
from dastc_jax.models import hrda
from dastc_jax.models import layers
from dastc_jax.models import resnet
from dastc_jax.models import video

# config.model.head of the DeepLab models.
HEADS = ('proda', 'aspp')


class AccelDeepLab(video.FlowFusionModel):
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
        blocks=tuple(config.layers),
        width=config.width,
        bn_momentum=config.bn_momentum,
        kernel_init=backbone_init,
        bn_group_size=config.bn_group_size,
        stride_in_1x1=config.stride_in_1x1,
        kernel_grad=kernel_grad,
        remat=config.remat,
        scan_blocks=config.scan_blocks,
        scan_recompute=config.scan_recompute,
        scan_min_blocks=config.scan_min_blocks,
        dtype=dtype,
        rngs=rngs,
    )
    feats = self.backbone.out_features
    # `layer5` of the reference: the aux classifier on layer3.
    self.aux_head = heads.ASPPSum(
        feats['layer3'],
        c,
        config.aspp_dilations,
        kernel_init=head_init,
        dtype=dtype,
        kernel_grad=kernel_grad,
        rngs=rngs,
    )
    head = config.head
    if head == 'proda':
      # `layer7` of the reference: ASPP to a feature, then logits.
      self.head = heads.ProdaHead(
          feats['layer4'],
          config.head_features,
          c,
          config.aspp_dilations,
          config.dropout,
          kernel_init=head_init,
          dtype=dtype,
          kernel_grad=kernel_grad,
          rngs=rngs,
      )
    elif head == 'aspp':
      # `layer6` of DA-VSN/TPS: ASPP straight to the logits.
      self.head = heads.ASPPLogitsHead(
          feats['layer4'],
          c,
          config.aspp_dilations,
          kernel_init=head_init,
          dtype=dtype,
          kernel_grad=kernel_grad,
          rngs=rngs,
      )
    else:
      raise errors.ConfigError(
          f'Unknown config.model.head={head!r}; expected one of {HEADS}: '
          "'proda' (DA-STC layer7) or 'aspp' (TPS layer6)."
      )
    self.clip_length = video.clip_length(config.name)
    if self.clip_length == 2:
      self.sf_layer = self.fusion_layer(c, dtype=dtype, rngs=rngs)
    self.hrda = hrda.Spec.from_config(config)
    if self.hrda is not None:
      # HRDA's attention head for DeepLab-v2: the ASPP sum to the classes.
      self.scale_attention = heads.ASPPSum(
          feats['layer4'],
          c if config.hrda.classwise_attention else 1,
          config.aspp_dilations,
          kernel_init=head_init,
          dtype=dtype,
          kernel_grad=kernel_grad,
          rngs=rngs,
      )

  def attention(
      self,
      feats: dict[str, jax.Array],
      *,
      train: bool,
      dropout_key: jax.Array | None,
  ) -> jax.Array:
    """Scale-attention logits from the context pass's layer4."""
    del train, dropout_key
    return self.scale_attention(feats['layer4'])

  def heads(
      self,
      feats: dict[str, jax.Array],
      *,
      train: bool,
      dropout_key: jax.Array | None,
  ) -> dict[str, jax.Array]:
    """Aux head on layer3, main head on layer4 (float32 outputs)."""
    logits, feat = self.head(feats['layer4'], dropout_key if train else None)
    aux = self.aux_head(feats['layer3'])
    return {
        'logits': logits.astype(jnp.float32),
        'aux': aux.astype(jnp.float32),
        'feat': feat,
    }
