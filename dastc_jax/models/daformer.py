"""The DAFormer decode head ("sepaspp", embed 256) in Flax NNX.

(HRDA's scale-attention head is the same head with ``fusion='conv'``: one
1x1 conv + BN + ReLU in place of the ASPP and bottleneck.)

1. Per encoder stage, a Linear embedding to ``embed`` channels (no norm, no
   activation): ``embed_layers.{i}.proj``.
2. Each embedded map resized bilinearly (half-pixel centres, as
   ``align_corners=False``) to the stride-4 map; concatenated c1..c4.
3. ASPP without pooling (``fuse_layer.aspp_modules``): dilation 1 is a 1x1
   conv + BN + ReLU; dilations 6/12/18 are depthwise-separable (3x3 depthwise
   dilated conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU); convs
   before a BN have no bias.
4. Concatenated, a 3x3 conv + BN + ReLU bottleneck to ``embed``
   (``fuse_layer.bottleneck``): the pre-logit feature.
5. Dropout2d, then the 1x1 classifier ``conv_seg`` (with bias).

Names follow the mmseg state dict (``decode_head.*`` in the released
models), so weights convert key by key. NHWC arrays.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dastc_jax.models import layers

# mmcv's kaiming_init (fan_out, ReLU gain, untruncated normal); torch's
# fan_out is cout * kh * kw for depthwise kernels too. Host-drawn.
_KAIMING_FAN_OUT = layers.he_normal()


class ConvModule(nnx.Module):
  """mmcv's ``ConvModule``: conv (no bias), BatchNorm, ReLU."""

  def __init__(
      self,
      cin: int,
      cout: int,
      kernel: int,
      *,
      dilation: int = 1,
      groups: int = 1,
      bn_group_size: int = 0,
      dtype,
      rngs: nnx.Rngs,
  ):
    pad = dilation * (kernel // 2)
    # mmcv's ConvModule init: Kaiming normal, fan_out, ReLU gain.
    if groups > 1:  # depthwise (groups == cin == cout)
      self.conv = layers.DepthwiseConv(
          cin,
          kernel,
          dilation=dilation,
          use_bias=False,
          kernel_init=_KAIMING_FAN_OUT,
          dtype=dtype,
          rngs=rngs,
      )
    elif kernel == 1:  # a matmul: XLA:CPU's 1x1 convolution is slower
      self.conv = layers.Conv(
          cin,
          cout,
          1,
          use_bias=False,
          kernel_init=_KAIMING_FAN_OUT,
          dtype=dtype or jnp.float32,
          rngs=rngs,
      )
    else:
      self.conv = nnx.Conv(
          cin,
          cout,
          (kernel, kernel),
          padding=((pad, pad), (pad, pad)),
          kernel_dilation=dilation,
          use_bias=False,
          kernel_init=_KAIMING_FAN_OUT,
          dtype=dtype,
          rngs=rngs,
      )
    self.bn = layers.BatchNorm(cout, group_size=bn_group_size)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x), train))


class SeparableConvModule(nnx.Module):
  """Depthwise 3x3 (dilated) ConvModule, then a pointwise 1x1 ConvModule."""

  def __init__(
      self,
      cin: int,
      cout: int,
      dilation: int,
      *,
      bn_group_size: int,
      dtype,
      rngs: nnx.Rngs,
  ):
    self.depthwise_conv = ConvModule(
        cin,
        cin,
        3,
        dilation=dilation,
        groups=cin,
        bn_group_size=bn_group_size,
        dtype=dtype,
        rngs=rngs,
    )
    self.pointwise_conv = ConvModule(
        cin, cout, 1, bn_group_size=bn_group_size, dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.pointwise_conv(self.depthwise_conv(x, train), train)


class SepASPP(nnx.Module):
  """ASPP context fusion without image pooling, then the bottleneck."""

  def __init__(
      self,
      cin: int,
      cout: int,
      dilations: Sequence[int],
      *,
      bn_group_size: int,
      dtype,
      rngs: nnx.Rngs,
  ):
    mods = []
    for d in dilations:
      if d == 1:
        mods.append(
            ConvModule(
                cin,
                cout,
                1,
                bn_group_size=bn_group_size,
                dtype=dtype,
                rngs=rngs,
            )
        )
      else:
        mods.append(
            SeparableConvModule(
                cin,
                cout,
                d,
                bn_group_size=bn_group_size,
                dtype=dtype,
                rngs=rngs,
            )
        )
    self.aspp_modules = nnx.List(mods)
    self.bottleneck = ConvModule(
        len(mods) * cout,
        cout,
        3,
        bn_group_size=bn_group_size,
        dtype=dtype,
        rngs=rngs,
    )

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    branches = [m(x, train) for m in self.aspp_modules]
    return self.bottleneck(jnp.concatenate(branches, axis=-1), train)


class Embedding(nnx.Module):
  """``embed_layers.{i}``: one Linear ``proj``."""

  def __init__(self, cin: int, cout: int, *, dtype, rngs: nnx.Rngs):
    # PyTorch's default nn.Linear init (mmseg leaves it as it is).
    self.proj = nnx.Linear(
        cin,
        cout,
        kernel_init=layers.torch_linear(cin),
        bias_init=layers.torch_linear(cin),
        dtype=dtype,
        rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


def resize_half_pixel(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize with half-pixel centres (``align_corners=False``,
  no antialiasing), as ``F.interpolate`` does."""
  if x.shape[1:3] == tuple(hw):
    return x
  return jax.image.scale_and_translate(
      x,
      (x.shape[0], hw[0], hw[1], x.shape[3]),
      (1, 2),
      jnp.array([hw[0] / x.shape[1], hw[1] / x.shape[2]], jnp.float32),
      jnp.zeros((2,), jnp.float32),
      'linear',
      antialias=False,
  )


class DAFormerHead(nnx.Module):
  """Embeddings, resize to stride 4, separable ASPP, dropout, classifier."""

  def __init__(
      self,
      in_features: Sequence[int],
      num_classes: int,
      *,
      embed: int = 256,
      dilations: Sequence[int] = (1, 6, 12, 18),
      dropout: float = 0.1,
      bn_group_size: int = 0,
      fusion: str = 'sepaspp',
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.embed_layers = nnx.List(
        [Embedding(c, embed, dtype=dtype, rngs=rngs) for c in in_features]
    )
    if fusion == 'sepaspp':
      self.fuse_layer = SepASPP(
          len(in_features) * embed,
          embed,
          dilations,
          bn_group_size=bn_group_size,
          dtype=dtype,
          rngs=rngs,
      )
    elif fusion == 'conv':  # HRDA's scale-attention head: a 1x1 ConvModule
      self.fuse_layer = ConvModule(
          len(in_features) * embed,
          embed,
          1,
          bn_group_size=bn_group_size,
          dtype=dtype,
          rngs=rngs,
      )
    else:
      raise ValueError(f'Unknown DAFormer fusion {fusion!r}.')
    # mmseg's classifier init: N(0, 0.01), zero bias.
    self.conv_seg = nnx.Conv(
        embed,
        num_classes,
        (1, 1),
        use_bias=True,
        kernel_init=layers.normal(0.01),
        bias_init=layers.zeros(),
        dtype=dtype,
        rngs=rngs,
    )
    self.dropout = dropout
    self.out_features = embed

  def __call__(
      self,
      feats: Sequence[jax.Array],
      *,
      train: bool,
      dropout_key: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """``feats``: the four encoder maps (strides 4..32) -> ``(logits, feat)``
    at stride 4 (``feat``: the bottleneck output, before dropout)."""
    hw = feats[0].shape[1:3]
    embedded = [
        resize_half_pixel(layer(f), hw)
        for layer, f in zip(self.embed_layers, feats)
    ]
    # [B, H/4, W/4, 4 * embed]; its gradient computed once (on CPU).
    fused = layers.materialise_grad(jnp.concatenate(embedded, axis=-1))
    feat = self.fuse_layer(fused, train)
    x = layers.channel_dropout(
        feat, self.dropout, dropout_key if train else None
    )
    return self.conv_seg(x), feat
