"""DeepLab-v2 ASPP heads (docs/reference_code.md, "Models")."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from dastc_jax.models import layers


class ASPPSum(nnx.Module):
  """Sum of parallel dilated 3x3 convs (DeepLab-v2 ASPP), with bias."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      dilations: Sequence[int],
      *,
      kernel_init: layers.Initializer,
      dtype,
      rngs: nnx.Rngs,
      kernel_grad: str = 'auto',
  ):
    self.branches = nnx.List(
        [
            layers.Conv(
                in_features,
                out_features,
                3,
                dilation=d,
                use_bias=True,
                kernel_init=kernel_init,
                dtype=dtype,
                rngs=rngs,
                kernel_grad=kernel_grad,
            )
            for d in dilations
        ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.branches[0](x)
    for branch in self.branches[1:]:
      out = out + branch(x)
    return out


class ProdaHead(nnx.Module):
  """Main head: ASPP-sum to a feature, Dropout2d, then a 1x1 classifier.

  Returns the class logits and the pre-logit feature (no nonlinearity
  between them, as in the reference ``ClassifierModule_proda``).
  """

  def __init__(
      self,
      in_features: int,
      features: int,
      num_classes: int,
      dilations: Sequence[int],
      dropout: float,
      *,
      kernel_init: layers.Initializer,
      dtype,
      rngs: nnx.Rngs,
      kernel_grad: str = 'auto',
  ):
    self.aspp = ASPPSum(
        in_features,
        features,
        dilations,
        kernel_init=kernel_init,
        dtype=dtype,
        rngs=rngs,
        kernel_grad=kernel_grad,
    )
    self.classifier = layers.Conv(
        features,
        num_classes,
        1,
        kernel_init=kernel_init,
        dtype=dtype,
        rngs=rngs,
    )
    self.dropout = dropout

  def __call__(
      self, x: jax.Array, dropout_key: jax.Array | None
  ) -> tuple[jax.Array, jax.Array]:
    feat = self.aspp(x)  # [B, h, w, F]
    logits = self.classifier(
        layers.channel_dropout(feat, self.dropout, dropout_key)
    )
    return logits, feat


class ASPPLogitsHead(nnx.Module):
  """DA-VSN/TPS main head (``layer6``): an ASPP sum straight to the logits.

  Returns the logits and, as the "feature", the layer4 map it read (this
  head has no pre-logit feature; DA-STC's alignment needs ``ProdaHead``).
  """

  def __init__(
      self,
      in_features: int,
      num_classes: int,
      dilations: Sequence[int],
      *,
      kernel_init: layers.Initializer,
      dtype,
      rngs: nnx.Rngs,
      kernel_grad: str = 'auto',
  ):
    self.aspp = ASPPSum(
        in_features,
        num_classes,
        dilations,
        kernel_init=kernel_init,
        dtype=dtype,
        rngs=rngs,
        kernel_grad=kernel_grad,
    )

  def __call__(
      self, x: jax.Array, dropout_key: jax.Array | None
  ) -> tuple[jax.Array, jax.Array]:
    del dropout_key
    return self.aspp(x), x
