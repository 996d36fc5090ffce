"""The transformer video model (QuadMix-ViT): MiT encoder, DAFormer head,
flow-guided score fusion at output stride 4.

The same two-frame scheme as the DeepLab model (``video.FlowFusionModel``):
frame t with gradients, the key frame t-1 through the same encoder and
decoder under ``stop_gradient``, its scores warped with the flow t->t-1 and
fused by ``sf_layer`` (a bias-free 2C -> C 1x1 conv initialised [I | 0]).
There is no auxiliary head: ``aux`` aliases the main scores (the ViT configs
set every auxiliary loss weight to 0). ``daformer`` is the single-frame
network of the image domain. docs/vit.md describes the model and its
weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from dastc_jax import errors
from dastc_jax.models import daformer
from dastc_jax.models import hrda
from dastc_jax.models import layers
from dastc_jax.models import mit
from dastc_jax.models import video


class AccelDAFormer(video.FlowFusionModel):
  """MiT + DAFormer head, two frames fused by flow (or one frame)."""

  backbone_rng = True

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if config.mit_variant not in mit.VARIANTS:
      raise errors.ConfigError(
          f'Unknown config.model.mit_variant={config.mit_variant!r}; '
          f'expected one of {sorted(mit.VARIANTS)}.'
      )
    dtype = layers.compute_dtype(config.dtype)
    spec = mit.VARIANTS[config.mit_variant]
    c = config.num_classes
    self.num_classes = c
    self.per_axis_flow_scale = config.per_axis_flow_scale
    self.backbone = mit.MiT(
        spec,
        drop_path_rate=config.drop_path_rate,
        caffe_input=True,
        remat=config.remat,
        scan_blocks=config.scan_blocks,
        scan_recompute=config.scan_recompute,
        scan_min_blocks=config.scan_min_blocks,
        dtype=dtype,
        rngs=rngs,
    )
    self.head = daformer.DAFormerHead(
        spec.dims,
        c,
        embed=config.head_features,
        dilations=tuple(config.daformer_dilations),
        dropout=config.dropout,
        bn_group_size=config.bn_group_size,
        dtype=dtype,
        rngs=rngs,
    )
    self.clip_length = video.clip_length(config.name)
    if self.clip_length == 2:
      self.sf_layer = self.fusion_layer(c, dtype=dtype, rngs=rngs)
    self.hrda = hrda.Spec.from_config(config)
    if self.hrda is not None:
      # HRDA's attention head: the DAFormer head with a 1x1 conv fusion.
      self.scale_attention = daformer.DAFormerHead(
          spec.dims,
          c if config.hrda.classwise_attention else 1,
          embed=config.hrda.attention_features,
          fusion='conv',
          dropout=config.dropout,
          bn_group_size=config.bn_group_size,
          dtype=dtype,
          rngs=rngs,
      )

  def attention(
      self,
      feats: dict[str, jax.Array],
      *,
      train: bool,
      dropout_key: jax.Array | None,
  ) -> jax.Array:
    """Scale-attention logits from the context pass's c1..c4."""
    logits, _ = self.scale_attention(
        [feats[s] for s in mit.MiT.STAGES], train=train, dropout_key=dropout_key
    )
    return logits

  def heads(
      self,
      feats: dict[str, jax.Array],
      *,
      train: bool,
      dropout_key: jax.Array | None,
  ) -> dict[str, jax.Array]:
    """DAFormer head on c1..c4 (float32 scores at stride 4)."""
    logits, feat = self.head(
        [feats[s] for s in mit.MiT.STAGES], train=train, dropout_key=dropout_key
    )
    logits = logits.astype(jnp.float32)
    return {'logits': logits, 'aux': logits, 'feat': feat}
