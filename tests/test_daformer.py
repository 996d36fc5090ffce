"""The DAFormer head against the PyTorch restatement with mmseg's module
names (``benchmarks/torch_daformer.py``; random weights and BatchNorm
statistics, eval mode)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import torch

from dastc_jax import convert
from tests import torch_daformer
from dastc_jax.models import daformer
from tests import torch_helpers

torch.set_num_threads(1)


def test_head_matches_the_pytorch_restatement():
  dims, classes, embed = (8, 12, 20, 24), 5, 16
  torch.manual_seed(0)
  tm = torch_daformer.DAFormerHead(dims, classes, embed).eval()
  torch_helpers.randomize_batchnorm(tm, 1)
  head = daformer.DAFormerHead(dims, classes, embed=embed, rngs=nnx.Rngs(0))
  sd = {
      k: v.numpy()
      for k, v in tm.state_dict().items()
      if not k.endswith('num_batches_tracked')
  }
  assert sorted(convert.load_by_names(head, sd)) == sorted(sd)
  rng = np.random.default_rng(0)
  # A non-square 40x56 input: strides 4..32 (ceil sizes as MiT's convs).
  feats = [
      rng.normal(size=(2, h, w, c)).astype(np.float32)
      for (h, w), c in zip(((10, 14), (5, 7), (3, 4), (2, 2)), dims)
  ]
  with torch.no_grad():
    logits, feat = tm([torch.from_numpy(np.moveaxis(f, -1, 1)) for f in feats])
  out, out_feat = jax.jit(lambda m, f: m(f, train=False))(head, feats)
  for got, want in ((out, logits), (out_feat, feat)):
    want = np.moveaxis(want.numpy(), 1, -1)
    assert got.shape == want.shape
    assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-4


def test_head_gradients_in_training_match_the_pytorch_restatement():
  """Training mode (batch statistics), no dropout: the gradients of the
  four encoder maps and of the bottleneck kernel match PyTorch's (the
  backward pass includes ``layers.materialise_grad``)."""
  dims, classes, embed = (8, 12, 20, 24), 5, 16
  torch.manual_seed(0)
  tm = torch_daformer.DAFormerHead(dims, classes, embed).train()
  tm.dropout = torch.nn.Identity()
  head = daformer.DAFormerHead(dims, classes, embed=embed, rngs=nnx.Rngs(0))
  sd = {
      k: v.numpy()
      for k, v in tm.state_dict().items()
      if not k.endswith('num_batches_tracked')
  }
  convert.load_by_names(head, sd)
  rng = np.random.default_rng(1)
  feats = [
      rng.normal(size=(2, h, w, c)).astype(np.float32)
      for (h, w), c in zip(((8, 12), (4, 6), (2, 3), (1, 2)), dims)
  ]
  cot = rng.normal(size=(2, 8, 12, classes)).astype(np.float32)
  tf = [
      torch.from_numpy(np.moveaxis(f, -1, 1).copy()).requires_grad_()
      for f in feats
  ]
  (
      tm(tf)[0] * torch.from_numpy(np.moveaxis(cot, -1, 1).copy())
  ).sum().backward()
  graphdef, params, rest = nnx.split(head, nnx.Param, ...)

  def loss(p, f):
    m = nnx.merge(graphdef, p, rest, copy=True)
    return jnp.sum(m(f, train=True)[0] * cot)

  dp, df = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, feats)
  for got, want in zip(df, tf):
    want = np.moveaxis(want.grad.numpy(), 1, -1)
    assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-4
  want = tm.fuse_layer.bottleneck.conv.weight.grad.numpy().transpose(2, 3, 1, 0)
  got = np.asarray(dp['fuse_layer']['bottleneck']['conv']['kernel'][...])
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_half_pixel_resize_matches_torch_interpolate():
  """The head's resize against ``F.interpolate(align_corners=False)``, up
  (the embeddings to stride 4), down, and with a one-pixel side."""
  rng = np.random.default_rng(0)
  resize = jax.jit(daformer.resize_half_pixel, static_argnums=1)
  for size_in, size_out in (
      ((4, 8), (16, 32)),
      ((5, 7), (13, 29)),
      ((16, 32), (4, 8)),
      ((1, 3), (4, 5)),
  ):
    x = rng.standard_normal((2, *size_in, 3)).astype(np.float32)
    want = (
        torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            size=size_out,
            mode='bilinear',
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    got = resize(x, size_out)
    np.testing.assert_allclose(
        np.asarray(got), want, atol=2e-6, err_msg=str((size_in, size_out))
    )
