"""RAFT in Flax against torchvision's RAFT (same random weights), and its
weight files.

torchvision builds ``raft_large`` / ``raft_small`` offline with random
weights; the BatchNorm statistics of the large context encoder are
randomised too, so eval-mode BatchNorm is exercised.
"""

import json
import os

from flax import nnx
import jax
import numpy as np
import pytest
import scipy.ndimage
import torch
from torchvision.models import optical_flow as tv_flow

from dastc_jax.flow import correlation
from tests import torch_helpers
from dastc_jax.flow import raft
from dastc_jax.flow import weights

torch.set_num_threads(1)


def _torch_raft(variant: str, seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  model = getattr(tv_flow, variant)(weights=None).eval()
  torch_helpers.randomize_batchnorm(model, seed + 1, scale=0.1)
  return model


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _pair(h=128, w=160, seed=0):
  """Frame 1 and a shifted, noisy frame 2, RGB in [-1, 1], NHWC."""
  rng = np.random.default_rng(seed)
  smooth = scipy.ndimage.gaussian_filter(
      rng.normal(size=(1, h, w, 3)), (0, 2, 2, 0)
  )
  a = np.clip(smooth / smooth.std(), -1, 1).astype(np.float32)
  b = np.roll(a, (3, -5), axis=(1, 2))
  b = (b + 0.05 * rng.normal(size=a.shape)).astype(np.float32)
  return a, b


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


@pytest.mark.parametrize('variant', ['raft_small', 'raft_large'])
def test_every_iteration_matches_torchvision(variant):
  tm = _torch_raft(variant)
  model = weights.from_state_dict(_state_dict(tm))
  a, b = _pair()
  with torch.no_grad():
    ref = tm(_nchw(a), _nchw(b), num_flow_updates=12)
  ref = np.stack([np.moveaxis(r.numpy(), 1, -1) for r in ref])
  out = np.asarray(
      jax.jit(lambda x, y: model(x, y, 12, all_iterations=True))(a, b)
  )
  assert out.shape == ref.shape == (12, 1, 128, 160, 2)
  for i in range(12):
    rel = np.abs(out[i] - ref[i]).max() / np.abs(ref[i]).max()
    assert rel < 1e-4, (i, rel)
  # The iterations really move the flow (the comparison is not trivial).
  assert np.abs(ref[-1] - ref[0]).max() > 0.1 * np.abs(ref[-1]).max()
  # Only the last flow: the same as the last of all.
  last = np.asarray(jax.jit(lambda x, y: model(x, y, 12))(a, b))
  np.testing.assert_allclose(last, out[-1], rtol=0, atol=1e-4)


def test_lookup_is_bilinear_with_zero_outside():
  """Against scipy on one level: zero padding, fractional and far-out
  centres, windows that only touch the map's first or last row/column,
  and RAFT's (x offset, y offset) ordering."""
  rng = np.random.default_rng(0)
  h, w, hl, wl, r = 3, 3, 7, 9, 2
  corr = rng.normal(size=(1, h * w, hl, wl)).astype(np.float32)
  coords = np.array(
      [
          [[0.0, 0.0], [3.25, 2.5], [8.9, 6.1]],
          [[-1.5, 3.0], [4.0, -2.75], [20.0, 20.0]],
          [[-2.5, 3.0], [10.5, 7.5], [-3.5, -9.0]],
      ],
      np.float32,
  )[None]
  got = np.asarray(
      correlation.lookup(correlation.pad_levels([corr], r), coords, r)
  )
  assert got.shape == (1, h, w, (2 * r + 1) ** 2)
  for q in range(h * w):
    cx, cy = coords[0].reshape(-1, 2)[q]
    d = np.arange(-r, r + 1)
    xs, ys = np.meshgrid(cx + d, cy + d, indexing='ij')  # x major
    want = scipy.ndimage.map_coordinates(
        corr[0, q],
        [ys.ravel(), xs.ravel()],
        order=1,
        mode='grid-constant',
        cval=0.0,
    )
    np.testing.assert_allclose(got[0].reshape(h * w, -1)[q], want, atol=1e-5)
  assert np.all(got[0, 1, 2] == 0)  # a centre far outside reads zeros


def test_pyramid_pools_like_avg_pool2d():
  rng = np.random.default_rng(1)
  f1 = rng.normal(size=(1, 5, 7, 4)).astype(np.float32)
  f2 = rng.normal(size=(1, 5, 7, 4)).astype(np.float32)
  levels = correlation.pyramid(f1, f2, 3)
  t1, t2 = _nchw(f1).reshape(1, 4, 35), _nchw(f2).reshape(1, 4, 35)
  ref = (t1.transpose(1, 2) @ t2).reshape(35, 1, 5, 7) / 2.0
  for i, level in enumerate(levels):
    if i:
      ref = torch.nn.functional.avg_pool2d(ref, 2, 2)
    np.testing.assert_allclose(
        np.asarray(level)[0], ref[:, 0].numpy(), rtol=1e-5, atol=1e-5
    )
  assert [tuple(level.shape[2:]) for level in levels] == [
      (5, 7),
      (2, 3),
      (1, 1),
  ]


def test_parameter_counts_are_torchvisions():
  for variant, count in (('raft_large', 5_257_536), ('raft_small', 990_162)):
    params = nnx.state(raft.abstract(variant), nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == (
        count
    ), variant


def test_wrong_variant_and_bad_keys_are_named(tmp_path):
  sd = _state_dict(_torch_raft('raft_small'))
  with pytest.raises(
      weights.ConversionError,
      match='holds raft_small weights; use variant ' 'raft_small',
  ):
    weights.from_state_dict(sd, 'raft_large', 'small.pth')
  bad = dict(sd)
  del bad['update_block.flow_head.conv2.bias']
  bad['extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(weights.ConversionError) as e:
    weights.from_state_dict(bad, source='x.pth')
  msg = str(e.value)
  assert 'x.pth' in msg and 'update_block.flow_head.conv2.bias' in msg
  assert 'extra.weight' in msg
  with pytest.raises(
      weights.ConversionError, match='is not a torchvision RAFT state dict'
  ):
    weights.from_state_dict({'conv1.weight': np.zeros((1, 1, 1, 1))})


def test_convert_save_load_round_trip(tmp_path):
  tm = _torch_raft('raft_small')
  pth = str(tmp_path / 'raft_small_C_T_V2.pth')
  torch.save(tm.state_dict(), pth)
  out = str(tmp_path / 'raft_small')
  assert weights.convert_file(pth, out) == 'raft_small'
  meta = json.loads(open(os.path.join(out, 'raft.json')).read())
  assert meta['variant'] == 'raft_small' and len(meta['sha256']) == 64
  with pytest.raises(weights.ConversionError, match='exists'):
    weights.convert_file(pth, out)
  from_dir, _ = weights.load(out)
  from_file, meta2 = weights.load(pth)
  assert meta2['variant'] == 'raft_small'
  a, b = _pair(seed=3)
  f = lambda m: np.asarray(jax.jit(lambda x, y: m(x, y, 4))(a, b))
  np.testing.assert_array_equal(f(from_dir), f(from_file))
  with pytest.raises(weights.ConversionError, match='not raft_large'):
    weights.load(out, 'raft_large')
  with pytest.raises(weights.ConversionError, match='found neither'):
    weights.load(str(tmp_path))
