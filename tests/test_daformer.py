"""The DAFormer head against a PyTorch restatement with mmseg's module names
(random weights and BatchNorm statistics, eval mode)."""

from flax import nnx
import jax
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from dastc_jax import convert
from dastc_jax.models import daformer
from tests import torch_helpers

torch.set_num_threads(1)


class _ConvModule(nn.Module):

  def __init__(self, cin, cout, k, dilation=1, groups=1):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, padding=dilation * (k // 2),
                          dilation=dilation, groups=groups, bias=False)
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class _Sep(nn.Module):

  def __init__(self, cin, cout, d):
    super().__init__()
    self.depthwise_conv = _ConvModule(cin, cin, 3, d, groups=cin)
    self.pointwise_conv = _ConvModule(cin, cout, 1)

  def forward(self, x):
    return self.pointwise_conv(self.depthwise_conv(x))


class _Embed(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.proj = nn.Linear(cin, cout)

  def forward(self, x):
    b, _, h, w = x.shape
    y = self.proj(x.flatten(2).transpose(1, 2))
    return y.transpose(1, 2).reshape(b, -1, h, w)


class TorchDAFormerHead(nn.Module):
  """mmseg DAFormerHead (sepaspp, no pooling) restated."""

  def __init__(self, dims, classes, embed=16, dilations=(1, 6, 12, 18)):
    super().__init__()
    self.embed_layers = nn.ModuleList(_Embed(c, embed) for c in dims)
    cin = len(dims) * embed
    self.fuse_layer = nn.Module()
    self.fuse_layer.aspp_modules = nn.ModuleList(
        _ConvModule(cin, embed, 1) if d == 1 else _Sep(cin, embed, d)
        for d in dilations)
    self.fuse_layer.bottleneck = _ConvModule(len(dilations) * embed, embed, 3)
    self.dropout = nn.Dropout2d(0.1)
    self.conv_seg = nn.Conv2d(embed, classes, 1)

  def forward(self, feats):
    hw = feats[0].shape[2:]
    x = torch.cat([F.interpolate(e(f), size=hw, mode='bilinear',
                                 align_corners=False)
                   for e, f in zip(self.embed_layers, feats)], 1)
    x = torch.cat([m(x) for m in self.fuse_layer.aspp_modules], 1)
    feat = self.fuse_layer.bottleneck(x)
    return self.conv_seg(self.dropout(feat)), feat


def test_head_matches_the_pytorch_restatement():
  dims, classes, embed = (8, 12, 20, 24), 5, 16
  torch.manual_seed(0)
  tm = TorchDAFormerHead(dims, classes, embed).eval()
  torch_helpers.randomize_batchnorm(tm, 1)
  head = daformer.DAFormerHead(dims, classes, embed=embed,
                               rngs=nnx.Rngs(0))
  sd = {k: v.numpy() for k, v in tm.state_dict().items()
        if not k.endswith('num_batches_tracked')}
  assert sorted(convert.load_by_names(head, sd)) == sorted(sd)
  rng = np.random.default_rng(0)
  # A non-square 40x56 input: strides 4..32 (ceil sizes as MiT's convs).
  feats = [rng.normal(size=(2, h, w, c)).astype(np.float32) for (h, w), c in
           zip(((10, 14), (5, 7), (3, 4), (2, 2)), dims)]
  with torch.no_grad():
    logits, feat = tm([torch.from_numpy(np.moveaxis(f, -1, 1))
                       for f in feats])
  out, out_feat = jax.jit(lambda m, f: m(f, train=False))(head, feats)
  for got, want in ((out, logits), (out_feat, feat)):
    want = np.moveaxis(want.numpy(), 1, -1)
    assert got.shape == want.shape
    assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-4
