"""ACCEL-DeepLabv2 in PyTorch eager: the step benchmark's baseline and the
parity tests' reference.

A restatement of ``dastc_jax.models`` with torch layers (NCHW) and the
module names of the reference code (so its ``state_dict`` has the keys of a
released checkpoint: ``conv1``, ``bn1``, ``layer1..4`` with ``downsample.0/1``,
aux ``layer5.conv2d_list.i``, DA-STC head ``layer7`` or TPS head ``layer6``,
``sf_layer``): a Caffe-style
dilated ResNet (stride in the first 1x1 conv, layer3/layer4 dilated 2/4,
output stride 8, ceil-mode max-pool), the ASPP-sum aux head on layer3, the
ASPP feature head and 1x1 classifier on layer4, and the ACCEL score fusion
(key-frame scores warped with ``grid_sample`` (align_corners=True, border
padding; the Resample2d op) and fused by a 2C->C 1x1 conv). Only ``torch``
is needed; it is imported by the benchmark when present.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
  """1x1 (stride) -> 3x3 (dilation) -> 1x1 (x4) with BN."""

  def __init__(
      self,
      cin: int,
      planes: int,
      stride: int,
      dilation: int,
      downsample: bool,
      stride_in_1x1: bool = True,
  ):
    super().__init__()
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    self.conv1 = nn.Conv2d(cin, planes, 1, s1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(
        planes, planes, 3, s3, dilation, dilation, bias=False
    )
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = (
        nn.Sequential(
            nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
            nn.BatchNorm2d(planes * 4),
        )
        if downsample
        else None
    )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      x = self.downsample(x)
    return F.relu(out + x)


class AsppSum(nn.Module):
  """Sum of dilated 3x3 convs (``Classifier_Module``: ``conv2d_list``)."""

  def __init__(self, cin: int, cout: int, dilations):
    super().__init__()
    self.conv2d_list = nn.ModuleList(
        nn.Conv2d(cin, cout, 3, 1, d, d, bias=True) for d in dilations
    )

  def forward(self, x):
    return sum(b(x) for b in self.conv2d_list)


class ProdaHead(nn.Module):
  """DA-STC ``layer7``: ASPP sum to a feature, then ``head`` = Dropout2d and a
  bias-free 1x1 classifier (the released files' ``layer7.head.1.weight``)."""

  def __init__(self, cin: int, features: int, num_classes: int, dilations):
    super().__init__()
    self.conv2d_list = AsppSum(cin, features, dilations).conv2d_list
    self.head = nn.Sequential(
        nn.Dropout2d(0.1), nn.Conv2d(features, num_classes, 1, bias=False)
    )

  def forward(self, x):
    feat = sum(b(x) for b in self.conv2d_list)
    return self.head(feat)


class AccelDeepLab(nn.Module):
  """Two-frame ACCEL on DeepLab-v2 (see the module doc)."""

  def __init__(
      self,
      num_classes: int,
      blocks=(3, 4, 23, 3),
      width: int = 64,
      head_features: int = 256,
      dilations=(6, 12, 18, 24),
      head: str = 'proda',
      stride_in_1x1: bool = True,
  ):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    stages, cin = [], width
    for i, (n, (stride, dil)) in enumerate(
        zip(blocks, ((1, 1), (2, 1), (1, 2), (1, 4)))
    ):
      planes = width * 2**i
      layer = []
      for j in range(n):
        layer.append(
            Bottleneck(
                cin, planes, stride if j == 0 else 1, dil, j == 0, stride_in_1x1
            )
        )
        cin = planes * 4
      stages.append(nn.Sequential(*layer))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.layer5 = AsppSum(width * 16, num_classes, dilations)
    self.head_name = 'layer7' if head == 'proda' else 'layer6'
    setattr(
        self,
        self.head_name,
        ProdaHead(width * 32, head_features, num_classes, dilations)
        if head == 'proda'
        else AsppSum(width * 32, num_classes, dilations),
    )
    self.sf_layer = nn.Conv2d(2 * num_classes, num_classes, 1, bias=False)

  def backbone(self, x):
    """``[B, 3, H, W]`` -> (layer3, layer4) maps."""
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
    x = self.layer2(self.layer1(x))
    l3 = self.layer3(x)
    return l3, self.layer4(l3)

  def single_frame(self, x):
    l3, l4 = self.backbone(x)
    return getattr(self, self.head_name)(l4), self.layer5(l3)

  def forward(self, cur, key, flow):
    logits, aux = self.single_frame(cur)
    with torch.no_grad():
      key_logits, key_aux = self.single_frame(key)
    return (
        fuse(self.sf_layer, logits, key_logits, flow),
        fuse(self.sf_layer, aux, key_aux, flow),
    )


def fuse(sf_layer: nn.Module, cur, key, flow):
  """ACCEL's fusion: the key frame's scores warped to the current frame by
  the flow (resized to the score grid and scaled), concatenated with the
  current scores, mixed by the 1x1 ``sf_layer``."""
  h, w = cur.shape[2:]
  fh = flow.shape[2]
  flow = F.interpolate(flow, (h, w), mode='bilinear', align_corners=True) * (
      h / fh
  )
  ys, xs = torch.meshgrid(
      torch.arange(h, dtype=flow.dtype),
      torch.arange(w, dtype=flow.dtype),
      indexing='ij',
  )
  gx = (xs + flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
  gy = (ys + flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
  warped = F.grid_sample(
      key,
      torch.stack([gx, gy], -1),
      mode='bilinear',
      padding_mode='border',
      align_corners=True,
  )
  return sf_layer(torch.cat([cur, warped], 1))


def source_loss(model: AccelDeepLab, cur, key, flow, label):
  """CE (ignore 255) of the fused scores upsampled to the label, + 0.1 aux."""
  pred, aux = model(cur, key, flow)
  size = label.shape[1:]
  up = lambda s: F.interpolate(s, size, mode='bilinear', align_corners=True)
  return F.cross_entropy(
      up(pred), label, ignore_index=255
  ) + 0.1 * F.cross_entropy(up(aux), label, ignore_index=255)
