"""The DAFormer head against the PyTorch restatement with mmseg's module
names (``benchmarks/torch_daformer.py``; random weights and BatchNorm
statistics, eval mode)."""

from flax import nnx
import jax
import numpy as np
import torch

from dastc_jax import convert
from dastc_jax.benchmarks import torch_daformer
from dastc_jax.models import daformer
from tests import torch_helpers

torch.set_num_threads(1)


def test_head_matches_the_pytorch_restatement():
  dims, classes, embed = (8, 12, 20, 24), 5, 16
  torch.manual_seed(0)
  tm = torch_daformer.DAFormerHead(dims, classes, embed).eval()
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
