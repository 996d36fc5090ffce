"""MiT encoder against HuggingFace transformers' PyTorch ``SegformerModel``
built offline from a ``SegformerConfig`` with random weights.

HF's attention has separate ``key``/``value`` Linears where the mmseg layout
(ours) has one ``kv`` (keys first), and uses LayerNorm eps 1e-5 everywhere:
the block and stage norms are set to the mmseg 1e-6 here so that the two
compute the same function.
"""

import functools
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SegformerConfig
from transformers import SegformerModel

from dastc_jax import convert
from dastc_jax.models import layers
from dastc_jax.models import mit

torch.set_num_threads(1)


def hf_to_mmseg(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF Segformer encoder keys -> mmseg ``mix_transformer`` keys."""
  out = {}
  for k, v in sd.items():
    parts = k.split('.')
    if parts[0] != 'stages':
      continue
    i = int(parts[1]) + 1
    rest = '.'.join(parts[2:])
    if rest.startswith('patch_embeddings.'):
      name = f'patch_embed{i}.' + rest[len('patch_embeddings.') :].replace(
          'layer_norm', 'norm'
      )
    elif rest.startswith('layer_norm.'):
      name = f'norm{i}.' + rest[len('layer_norm.') :]
    else:  # blocks.j....
      j, sub = rest.split('.', 2)[1:]
      sub = (
          sub.replace('layernorm_before', 'norm1')
          .replace('layernorm_after', 'norm2')
          .replace('attention.q_proj', 'attn.q')
          .replace('attention.o_proj', 'attn.proj')
          .replace('attention.sequence_reduction.sequence_reduction', 'attn.sr')
          .replace('attention.sequence_reduction.layer_norm', 'attn.norm')
      )
      name = f'block{i}.{j}.{sub}'
    out[name] = v
  for k in list(out):  # one kv Linear: keys first, then values
    if '.attention.k_proj.' in k:
      leaf = k.rsplit('.', 1)[1]
      base = k.split('.attention.')[0]
      out[f'{base}.attn.kv.{leaf}'] = np.concatenate(
          [out.pop(k), out.pop(k.replace('k_proj', 'v_proj'))], axis=0
      )
  return out


def use_mmseg_epsilons(hf: torch.nn.Module) -> None:
  """Sets the block and stage LayerNorms of an HF Segformer to mmseg's eps
  (HF uses 1e-5 everywhere)."""
  for name, m in hf.named_modules():
    if isinstance(m, torch.nn.LayerNorm) and (
        name.endswith(('layernorm_before', 'layernorm_after'))
        or re.fullmatch(r'stages\.\d+\.layer_norm', name)
    ):
      m.eps = mit.BLOCK_EPS


@pytest.mark.parametrize('hw', [(64, 96), (72, 40)])
def test_every_stage_matches_transformers(hw):
  spec = mit.MiTSpec((32, 64, 160, 256), (2, 1, 2, 1))
  cfg = SegformerConfig(
      hidden_sizes=list(spec.dims),
      depths=list(spec.depths),
      num_attention_heads=list(spec.heads),
      sr_ratios=list(spec.sr_ratios),
      drop_path_rate=0.0,
  )
  torch.manual_seed(0)
  hf = SegformerModel(cfg).eval()
  use_mmseg_epsilons(hf)
  with torch.no_grad():  # non-trivial LayerNorm affines
    for m in hf.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.add_(0.1 * torch.randn_like(m.weight))
        m.bias.add_(0.1 * torch.randn_like(m.bias))
  model = nnx.eval_shape(lambda: mit.MiT(spec, rngs=nnx.Rngs(0)))
  model = nnx.merge(*nnx.split(model))
  sd = hf_to_mmseg({k: v.numpy() for k, v in hf.state_dict().items()})
  assert sorted(convert.load_by_names(model, sd)) == sorted(sd)
  x = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf(
        torch.from_numpy(np.moveaxis(x, -1, 1)), output_hidden_states=True
    ).hidden_states
  out = jax.jit(lambda m, x: m(x))(model, x)
  for i, name in enumerate(mit.MiT.STAGES):
    want = np.moveaxis(ref[i].numpy(), 1, -1)
    got = np.asarray(out[name])
    assert got.shape == want.shape
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, (name, rel)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_b5_parameter_count():
  """81,443,008 (the mmseg MiT-B5): counted on a one-block-per-stage B5
  (building all 52 blocks takes half a minute), per part, times the depths."""
  spec = mit.VARIANTS['b5']
  one = nnx.eval_shape(
      lambda: mit.MiT(mit.MiTSpec(spec.dims, (1, 1, 1, 1)), rngs=nnx.Rngs(0))
  )
  n = 0
  for i, depth in enumerate(spec.depths):
    for part in (f'patch_embed{i + 1}', f'norm{i + 1}'):
      n += _count(nnx.state(getattr(one, part), nnx.Param))
    n += depth * _count(nnx.state(getattr(one, f'block{i + 1}')[0], nnx.Param))
  assert n == 81_443_008


def test_drop_path_rises_linearly_over_all_blocks():
  rates = mit.drop_path_rates(mit.VARIANTS['b5'].depths, 0.1)
  assert len(rates) == 52 and rates[0] == 0.0
  np.testing.assert_allclose(rates[-1], 0.1)
  np.testing.assert_allclose(np.diff(rates), 0.1 / 51)
  small = nnx.eval_shape(lambda: mit.MiT(mit.VARIANTS['b0'], rngs=nnx.Rngs(0)))
  got = [
      b.drop_path_rate
      for i in range(4)
      for b in getattr(small, f'block{i + 1}')
  ]
  assert got == mit.drop_path_rates(mit.VARIANTS['b0'].depths, 0.1)


def test_remat_and_drop_path_in_training():
  """Rematerialised blocks give the same loss and gradients; stochastic
  depth changes the output only with a key, and differently per key."""
  spec = mit.VARIANTS['tiny']
  x = np.random.default_rng(0).normal(size=(2, 32, 48, 3)).astype(np.float32)
  key = jax.random.key(0)

  model = nnx.eval_shape(
      lambda: mit.MiT(spec, drop_path_rate=0.3, rngs=nnx.Rngs(0))
  )
  graphdef, state = nnx.split(model)
  state = jax.tree.map(  # random values without an eager init per shape
      lambda v: jnp.asarray(
          np.random.default_rng(v.size).normal(0, 0.2, v.shape), np.float32
      ),
      state,
  )

  @functools.partial(jax.jit, static_argnums=2)
  def run(state, rng, remat):  # remat is static below
    def loss(st):
      m = nnx.merge(graphdef, st)
      m.remat = remat
      return sum(jnp.sum(jnp.tanh(v) ** 2) for v in m(x, rng=rng).values())

    return jax.value_and_grad(loss)(state)

  def loss_and_grad(remat, rng):
    if rng is None:
      return jax.jit(
          lambda st: (
              sum(
                  jnp.sum(jnp.tanh(v) ** 2)
                  for v in nnx.merge(graphdef, st)(x).values()
              ),
              None,
          )
      )(state)
    return run(state, rng, remat)

  (l0, g0), (l1, g1) = loss_and_grad(False, key), loss_and_grad(True, key)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
  l_eval, _ = loss_and_grad(False, None)
  l_other, _ = loss_and_grad(False, jax.random.key(1))
  assert len({float(l0), float(l_eval), float(l_other)}) == 3


def test_initialisation_follows_mmseg_and_mmcv():
  """The from-scratch init of the video ViT (drawn on the host): MiT Linear
  N(0, 0.02^2), LayerNorm 1 / 0, convs N(0, 2 / (k k cout / groups)),
  zero biases; DAFormer ConvModules Kaiming fan-out (torch's fan-out, also
  for the depthwise ones), classifier N(0, 0.01^2), embeddings PyTorch's
  default U(+-1/sqrt(fan_in)). Std checked on the largest tensors."""
  from configs import viper_vit  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import state as state_lib  # pylint: disable=g-import-not-at-top

  _, p, _ = state_lib.init_model(viper_vit.get_config('smoke'), 0)
  b, h = p['backbone'], p['head']
  std = lambda x: float(np.std(np.asarray(x)))
  blk = b['block4'][0]
  np.testing.assert_allclose(std(blk['mlp']['fc1']['kernel']), 0.02, rtol=0.03)
  np.testing.assert_allclose(
      std(blk['mlp']['dwconv']['dwconv']['kernel']), np.sqrt(2 / 9), rtol=0.05
  )
  k = b['patch_embed4']['proj']['kernel']  # [3, 3, 40, 64]
  np.testing.assert_allclose(std(k), np.sqrt(2 / (9 * k.shape[-1])), rtol=0.03)
  for path, x in jax.tree_util.tree_flatten_with_path(b)[0]:
    name = jax.tree_util.keystr(path)
    if name.endswith("['bias']"):
      np.testing.assert_array_equal(x, 0.0, err_msg=name)
    elif 'norm' in name and name.endswith("['scale']"):
      np.testing.assert_array_equal(x, 1.0, err_msg=name)
  fuse = h['fuse_layer']
  k = fuse['bottleneck']['conv']['kernel']  # [3, 3, cin, 256]
  np.testing.assert_allclose(std(k), np.sqrt(2 / (9 * k.shape[-1])), rtol=0.03)
  k = fuse['aspp_modules'][1]['depthwise_conv']['conv']['kernel']
  # 576 draws: 10% (the two fan-out rules differ by a factor of 8).
  np.testing.assert_allclose(std(k), np.sqrt(2 / (9 * k.shape[-1])), rtol=0.1)
  np.testing.assert_allclose(std(h['conv_seg']['kernel']), 0.01, rtol=0.05)
  np.testing.assert_array_equal(h['conv_seg']['bias'], 0.0)
  e = h['embed_layers'][3]['proj']
  bound = 1 / np.sqrt(e['kernel'].shape[0])
  assert float(np.abs(e['kernel']).max()) <= bound
  np.testing.assert_allclose(std(e['kernel']), bound / np.sqrt(3), rtol=0.06)
  assert 0 < float(np.abs(e['bias']).max()) <= bound


def test_gelu_is_the_exact_gelu_and_its_gradient():
  x = jnp.linspace(-9.0, 9.0, 20001, dtype=jnp.float32)
  ours = layers.gelu(x)
  ref = jax.nn.gelu(x, approximate=False)  # the erfc form
  # 1 + erf cancels in the far negative tail (x < -5, GELU > -1e-6): the
  # forms differ there by float32 rounding of 1, under 1e-6 absolute.
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
  d_ours = jax.vmap(jax.grad(layers.gelu))(x)
  d_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(d_ours, d_ref, rtol=1e-5, atol=1e-6)
  # PyTorch's exact GELU on the same points.
  np.testing.assert_allclose(
      ours,
      torch.nn.functional.gelu(torch.from_numpy(np.asarray(x))).numpy(),
      rtol=1e-6,
      atol=1e-6,
  )


@pytest.mark.parametrize('hw', [(8, 12), (9, 14)])  # whole and cut patches
def test_patch_conv_is_the_strided_convolution_and_its_gradients(hw):
  conv = nnx.Conv(6, 5, (2, 2), strides=2, padding='VALID', rngs=nnx.Rngs(0))
  conv.bias[...] = jnp.arange(5.0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, *hw, 6)))
  x = x.astype(jnp.float32)
  graphdef, state = nnx.split(conv)

  def loss(state, x, patches):
    m = nnx.merge(graphdef, state)
    out = mit._patch_conv(m, x, 2) if patches else m(x)  # pylint: disable=protected-access
    return jnp.sum(jnp.sin(out)), out

  (_, got), g_got = jax.value_and_grad(loss, (0, 1), has_aux=True)(
      state, x, True
  )
  (_, want), g_want = jax.value_and_grad(loss, (0, 1), has_aux=True)(
      state, x, False
  )
  assert got.shape == want.shape == (2, hw[0] // 2, hw[1] // 2, 5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
