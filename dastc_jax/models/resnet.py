"""Caffe-style DeepLab-v2 ResNet backbone (output stride 8).

Layout of the DeepLab-v2 ResNet that DA-VSN/TPS/DA-STC start from
(docs/reference_code.md, "Models"): bottleneck blocks with the stride on the
*first* 1x1 conv,
a 7x7/2 stem followed by a ceil-mode 3x3/2 max-pool, layer2 at stride 2, and
layer3/layer4 at stride 1 with dilation 2/4. Depth and width are config knobs
so that tests and the CPU demo run small variants of the same code.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dastc_jax.models import layers
from dastc_jax.models import scan

EXPANSION = 4


class Bottleneck(nnx.Module):
  """1x1 (stride) -> 3x3 (dilation) -> 1x1 (x4) bottleneck with BN.

  ``stride_in_1x1=False`` moves the stride to the 3x3 conv (torchvision).
  """

  def __init__(
      self,
      in_features: int,
      planes: int,
      *,
      stride: int,
      dilation: int,
      downsample: bool,
      bn_momentum: float,
      kernel_init: layers.Initializer,
      dtype,
      rngs: nnx.Rngs,
      bn_group_size: int = 0,
      stride_in_1x1: bool = True,
      kernel_grad: str = 'auto',
  ):
    conv = lambda i, o, k, **kw: layers.Conv(
        i,
        o,
        k,
        kernel_init=kernel_init,
        dtype=dtype,
        rngs=rngs,
        kernel_grad=kernel_grad,
        **kw,
    )
    bn = lambda c: layers.BatchNorm(
        c, momentum=bn_momentum, group_size=bn_group_size
    )
    # Caffe/DeepLab put the stride on the first 1x1 conv; torchvision
    # ("ResNet v1.5") on the 3x3 conv.
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    self.conv1 = conv(in_features, planes, 1, stride=s1)
    self.bn1 = bn(planes)
    self.conv2 = conv(planes, planes, 3, stride=s3, dilation=dilation)
    self.bn2 = bn(planes)
    self.conv3 = conv(planes, planes * EXPANSION, 1)
    self.bn3 = bn(planes * EXPANSION)
    if downsample:
      self.downsample_conv = conv(
          in_features, planes * EXPANSION, 1, stride=stride
      )
      self.downsample_bn = bn(planes * EXPANSION)
    else:
      self.downsample_conv = None
      self.downsample_bn = None

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = jax.nn.relu(self.bn1(self.conv1(x), train))
    out = jax.nn.relu(self.bn2(self.conv2(out), train))
    out = self.bn3(self.conv3(out), train)
    if self.downsample_conv is not None:
      x = self.downsample_bn(self.downsample_conv(x), train)
    return jax.nn.relu(out + x)


@functools.partial(nnx.remat, static_argnums=(2,))
def _remat_block(block: Bottleneck, x: jax.Array, train: bool) -> jax.Array:
  """A bottleneck whose activations are recomputed in the backward pass."""
  return block(x, train)


class ResNetDeepLab(nnx.Module):
  """Dilated ResNet trunk; returns the stem, layer1..layer4 feature maps."""

  STAGES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4')

  def __init__(
      self,
      *,
      blocks: Sequence[int],
      width: int,
      bn_momentum: float,
      kernel_init: layers.Initializer,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
      bn_group_size: int = 0,
      stride_in_1x1: bool = True,
      kernel_grad: str = 'auto',
      remat: bool = False,
      scan_blocks: bool = False,
      scan_recompute: bool = True,
      scan_min_blocks: int = 2,
  ):
    if len(blocks) != 4:
      raise ValueError(f'model.layers must have 4 entries, got {blocks}')
    self.conv1 = layers.Conv(
        3,
        width,
        7,
        stride=2,
        kernel_init=kernel_init,
        dtype=dtype,
        rngs=rngs,
        kernel_grad=kernel_grad,
    )
    self.bn1 = layers.BatchNorm(
        width, momentum=bn_momentum, group_size=bn_group_size
    )
    in_features = width
    stage_cfg = ((1, 1), (2, 1), (1, 2), (1, 4))  # (stride, dilation)
    for i, (n, (stride, dilation)) in enumerate(zip(blocks, stage_cfg)):
      planes = width * 2**i
      stage = []
      for j in range(n):
        stage.append(
            Bottleneck(
                in_features,
                planes,
                stride=stride if j == 0 else 1,
                dilation=dilation,
                downsample=(j == 0),
                bn_momentum=bn_momentum,
                kernel_init=kernel_init,
                dtype=dtype,
                rngs=rngs,
                bn_group_size=bn_group_size,
                stride_in_1x1=stride_in_1x1,
                kernel_grad=kernel_grad,
            )
        )
        in_features = planes * EXPANSION
      setattr(self, f'layer{i + 1}', nnx.List(stage))
    self.out_features = {
        f'layer{i + 1}': width * 2**i * EXPANSION for i in range(4)
    }
    self.out_features['stem'] = width
    # Recompute each bottleneck's activations in the backward pass instead
    # of keeping them (memory for compute; same values).
    self.remat = remat
    # Run the identical blocks after each stage's first as one scan,
    # recomputing its body in the backward pass or not.
    self.scan_blocks = scan_blocks
    self.scan_recompute = scan_recompute
    self.scan_min_blocks = scan_min_blocks

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    # x: [B, H, W, 3] normalised BGR -> [B, H/4, W/4, width] (ceil)
    x = jax.nn.relu(self.bn1(self.conv1(x), train))
    return layers.max_pool_ceil(x, 3, 2, 1)

  def stage(self, name: str, x: jax.Array, train: bool) -> jax.Array:
    """Runs one named stage of ``STAGES`` on the previous stage's output."""
    if name == 'stem':
      return self.stem(x, train)
    blocks = getattr(self, name)
    if self.scan_blocks and len(blocks) - 1 >= self.scan_min_blocks:
      first = blocks[0]
      x = _remat_block(first, x, train) if self.remat else first(x, train)
      return scan.scan_blocks(
          list(blocks)[1:],
          x,
          lambda b, h, _: b(h, train),
          recompute=self.scan_recompute,
      )
    for block in blocks:
      x = _remat_block(block, x, train) if self.remat else block(x, train)
    return x

  def __call__(
      self,
      x: jax.Array,
      train: bool,
      *,
      first: str = 'stem',
      last: str = 'layer4',
  ) -> dict[str, jax.Array]:
    """Runs the stages ``first..last``; ``x`` is the input of ``first``.

    Returns:
      ``{stage: output}`` for the stages that ran.
    """
    names = self.STAGES[self.STAGES.index(first) : self.STAGES.index(last) + 1]
    feats = {}
    for name in names:
      x = self.stage(name, x, train)
      feats[name] = x
    return feats
