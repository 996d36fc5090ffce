"""The transformer video model (QuadMix-ViT) in PyTorch eager, restated.

The PyTorch baseline of the step benchmark's ViT rows
(``python -m dastc_jax.benchmarks.step --model=vit``) and the reference of
the DAFormer-head parity test: mmseg's DAFormer head (sepaspp context fusion,
no pooling branch) with mmseg's module names, on HuggingFace ``transformers``'
MiT encoder (``SegformerModel``), with ACCEL's flow fusion of the key frame's
scores. ``torch`` (and ``transformers`` for the encoder) are optional
benchmark dependencies.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from tests import torch_accel


class ConvModule(nn.Module):
  """mmcv ConvModule: conv (no bias) + BatchNorm + ReLU."""

  def __init__(
      self, cin: int, cout: int, k: int, dilation: int = 1, groups: int = 1
  ):
    super().__init__()
    self.conv = nn.Conv2d(
        cin,
        cout,
        k,
        padding=dilation * (k // 2),
        dilation=dilation,
        groups=groups,
        bias=False,
    )
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class SeparableConv(nn.Module):
  """Depthwise 3x3 (dilated) then pointwise 1x1, each a ConvModule."""

  def __init__(self, cin: int, cout: int, dilation: int):
    super().__init__()
    self.depthwise_conv = ConvModule(cin, cin, 3, dilation, groups=cin)
    self.pointwise_conv = ConvModule(cin, cout, 1)

  def forward(self, x):
    return self.pointwise_conv(self.depthwise_conv(x))


class Embed(nn.Module):
  """Per-stage linear embedding of every pixel."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.proj = nn.Linear(cin, cout)

  def forward(self, x):
    b, _, h, w = x.shape
    y = self.proj(x.flatten(2).transpose(1, 2))
    return y.transpose(1, 2).reshape(b, -1, h, w)


class DAFormerHead(nn.Module):
  """The DAFormer decoder: embed every stage, resize to stage 1, sepaspp,
  3x3 bottleneck, dropout, 1x1 classifier. Returns (scores, feature)."""

  def __init__(
      self,
      dims: Sequence[int],
      classes: int,
      embed: int = 256,
      dilations: Sequence[int] = (1, 6, 12, 18),
      fusion: str = 'sepaspp',
  ):
    super().__init__()
    self.embed_layers = nn.ModuleList(Embed(c, embed) for c in dims)
    cin = len(dims) * embed
    self.fusion = fusion
    if fusion == 'conv':  # HRDA's attention head: one 1x1 ConvModule
      self.fuse_layer = ConvModule(cin, embed, 1)
    else:
      self.fuse_layer = nn.Module()
      self.fuse_layer.aspp_modules = nn.ModuleList(
          ConvModule(cin, embed, 1) if d == 1 else SeparableConv(cin, embed, d)
          for d in dilations
      )
      self.fuse_layer.bottleneck = ConvModule(len(dilations) * embed, embed, 3)
    self.dropout = nn.Dropout2d(0.1)
    self.conv_seg = nn.Conv2d(embed, classes, 1)

  def forward(self, feats):
    hw = feats[0].shape[2:]
    x = torch.cat(
        [
            F.interpolate(e(f), size=hw, mode='bilinear', align_corners=False)
            for e, f in zip(self.embed_layers, feats)
        ],
        1,
    )
    if self.fusion == 'conv':
      feat = self.fuse_layer(x)
    else:
      x = torch.cat([m(x) for m in self.fuse_layer.aspp_modules], 1)
      feat = self.fuse_layer.bottleneck(x)
    return self.conv_seg(self.dropout(feat)), feat


class VitVideo(nn.Module):
  """MiT encoder + DAFormer head per frame; the key frame without gradient,
  its scores warped to the current frame and fused by ``sf_layer``."""

  def __init__(
      self,
      dims: Sequence[int],
      depths: Sequence[int],
      heads: Sequence[int],
      sr_ratios: Sequence[int],
      classes: int,
      embed: int,
      dilations: Sequence[int],
      drop_path_rate: float = 0.1,
  ):
    super().__init__()
    from transformers import SegformerConfig  # pylint: disable=g-import-not-at-top
    from transformers import SegformerModel  # pylint: disable=g-import-not-at-top

    self.encoder = SegformerModel(
        SegformerConfig(
            hidden_sizes=list(dims),
            depths=list(depths),
            num_attention_heads=list(heads),
            sr_ratios=list(sr_ratios),
            drop_path_rate=drop_path_rate,
        )
    )
    self.decode_head = DAFormerHead(dims, classes, embed, dilations)
    self.sf_layer = nn.Conv2d(2 * classes, classes, 1, bias=False)

  def single_frame(self, x):
    feats = self.encoder(x, output_hidden_states=True).hidden_states
    return self.decode_head(list(feats))[0]

  def forward(self, cur, key, flow):
    logits = self.single_frame(cur)
    with torch.no_grad():
      key_logits = self.single_frame(key)
    return torch_accel.fuse(self.sf_layer, logits, key_logits, flow)


def source_loss(model: VitVideo, cur, key, flow, label):
  """CE (ignore 255) of the fused scores upsampled to the label."""
  pred = model(cur, key, flow)
  pred = F.interpolate(
      pred, label.shape[1:], mode='bilinear', align_corners=True
  )
  return F.cross_entropy(pred, label, ignore_index=255)
