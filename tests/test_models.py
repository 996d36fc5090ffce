"""ACCEL-DeepLabv2: shapes, output stride, layers, fusion init, gradients."""

import re

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dastc_jax import models
from dastc_jax.models import layers


def _cfg(**kw):
  c = dict(
      name='accel_deeplabv2',
      num_classes=5,
      layers=(1, 1, 1, 1),
      width=8,
      head_features=16,
      aspp_dilations=(6, 12, 18, 24),
      dropout=0.1,
      bn_momentum=0.1,
      backbone_init='he',
      init_std=0.01,
      dtype='float32',
      per_axis_flow_scale=False,
      head='proda',
      conv_kernel_grad='auto',
      bn_group_size=0,
      stride_in_1x1=True,
      remat=False,
      scan_blocks=False,
      scan_recompute=True,
      scan_min_blocks=2,
  )
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _split(cfg, seed=0):
  model = models.build_model(cfg, nnx.Rngs(params=seed))
  g, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
  return g, nnx.to_pure_dict(p), nnx.to_pure_dict(s)


@pytest.mark.parametrize(
    'hw,out_hw',
    [
        ((512, 1024), (65, 129)),
        ((640, 1280), (81, 161)),
        ((720, 1280), (91, 161)),
        ((64, 128), (9, 17)),
    ],
)
def test_output_stride_8_with_ceil_mode_pool(hw, out_hw):
  g, p, s = _split(_cfg())
  x = jax.ShapeDtypeStruct((1,) + hw + (3,), jnp.float32)
  f = jax.ShapeDtypeStruct((1,) + hw + (2,), jnp.float32)
  out = jax.eval_shape(
      lambda p, s, x, f: nnx.merge(g, p, s)(x, x, f, train=False), p, s, x, f
  )
  for k in ('pred', 'pred_aux', 'logits', 'aux', 'key_logits'):
    assert out[k].shape == (1,) + out_hw + (5,)
  assert out['feat'].shape == (1,) + out_hw + (16,)


def test_resnet101_parameter_count_matches_deeplabv2():
  # DeepLab-v2 ResNet-101 trunk (conv1..layer4 + BN affine) has 42.5M
  # parameters in the torchvision layout without fc; its ASPP heads add
  # 4 x (3*3*2048*C + C) for the classifier. Check the trunk exactly.
  cfg = _cfg(layers=(3, 4, 23, 3), width=64, num_classes=19, head_features=256)
  _, p, _ = _split(cfg)
  trunk = sum(x.size for x in jax.tree.leaves(p['backbone']))
  assert trunk == 42_500_160  # torchvision resnet101 minus fc (2049000)


def test_max_pool_ceil_matches_pytorch_rule():
  x = jnp.arange(2 * 7 * 8 * 1, dtype=jnp.float32).reshape(2, 7, 8, 1)
  out = layers.max_pool_ceil(x, 3, 2, 1)
  # ceil((7 + 2 - 3) / 2) + 1 = 4 rows; ceil((8 + 2 - 3) / 2) + 1 = 5 cols.
  assert out.shape == (2, 4, 5, 1)
  xn = np.asarray(x)
  for i in range(4):
    for j in range(5):
      r0, c0 = max(i * 2 - 1, 0), max(j * 2 - 1, 0)
      ref = xn[:, r0 : i * 2 + 2, c0 : j * 2 + 2].max(axis=(1, 2))
      np.testing.assert_array_equal(np.asarray(out[:, i, j]), ref)


def test_1x1_matmul_conv_and_tap_cropping_equal_xla_conv():
  rng = nnx.Rngs(params=0)
  x = jax.random.normal(jax.random.key(1), (2, 9, 11, 6))
  for k, stride, dilation in (
      (1, 2, 1),
      (1, 1, 1),
      (3, 1, 24),
      (3, 1, 6),
      (7, 2, 1),
  ):
    conv = layers.Conv(
        6,
        4,
        k,
        stride=stride,
        dilation=dilation,
        use_bias=True,
        kernel_init=layers.he_normal(),
        rngs=rng,
    )
    pad = dilation * (k // 2)
    ref = (
        jax.lax.conv_general_dilated(
            x,
            conv.kernel[...],
            (stride, stride),
            ((pad, pad), (pad, pad)),
            rhs_dilation=(dilation, dilation),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        )
        + conv.bias[...]
    )
    np.testing.assert_allclose(
        np.asarray(conv(x)), np.asarray(ref), rtol=1e-5, atol=1e-5
    )


def test_fusion_is_identity_at_init():
  g, p, s = _split(_cfg())
  k = jax.random.split(jax.random.key(0), 3)
  cur = jax.random.normal(k[0], (2, 64, 96, 3)) * 50
  key = jax.random.normal(k[1], (2, 64, 96, 3)) * 50
  flow = jax.random.normal(k[2], (2, 64, 96, 2)) * 3
  out = nnx.merge(g, p, s)(cur, key, flow, train=False)
  np.testing.assert_allclose(
      np.asarray(out['pred']), np.asarray(out['logits']), atol=1e-6
  )
  np.testing.assert_allclose(
      np.asarray(out['pred_aux']), np.asarray(out['aux']), atol=1e-6
  )
  kernel = np.asarray(p['sf_layer']['kernel'])[0, 0]
  np.testing.assert_array_equal(
      kernel, np.concatenate([np.eye(5), np.zeros((5, 5))], axis=0)
  )


def test_key_frame_branch_has_no_gradient():
  g, p, s = _split(_cfg(dropout=0.0))
  # Give the warped key-frame scores a non-zero weight in the fusion.
  p['sf_layer']['kernel'] = p['sf_layer']['kernel'] + 0.5
  k = jax.random.split(jax.random.key(3), 3)
  cur = jax.random.normal(k[0], (1, 32, 48, 3)) * 50
  key = jax.random.normal(k[1], (1, 32, 48, 3)) * 50
  flow = jnp.ones((1, 32, 48, 2))

  def f(p, s, cur, key):
    out = nnx.merge(g, p, s)(cur, key, flow, train=True)
    return jnp.sum(out['pred'] ** 2) + jnp.sum(out['pred_aux'] ** 2)

  g_cur, g_key = jax.jit(jax.grad(f, argnums=(2, 3)))(p, s, cur, key)
  assert float(jnp.abs(g_cur).max()) > 0
  assert float(jnp.abs(g_key).max()) == 0.0


def test_batchnorm_train_stats_and_running_update():
  bn = layers.BatchNorm(3, momentum=0.1)
  x = jax.random.normal(jax.random.key(0), (4, 5, 6, 3)) * 2 + 1
  y = bn(x, train=True)
  xn = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 3).mean(0), 0, atol=1e-5)
  n = xn.shape[0]
  np.testing.assert_allclose(
      np.asarray(bn.mean[...]), 0.1 * xn.mean(0), rtol=1e-5
  )
  np.testing.assert_allclose(
      np.asarray(bn.var[...]), 0.9 + 0.1 * xn.var(0) * n / (n - 1), rtol=1e-5
  )
  # Eval mode normalises with the running averages.
  ye = bn(x, train=False)
  ref = (xn - np.asarray(bn.mean[...])) / np.sqrt(
      np.asarray(bn.var[...]) + 1e-5
  )
  np.testing.assert_allclose(
      np.asarray(ye).reshape(-1, 3), ref, rtol=1e-4, atol=1e-5
  )


def test_bn_running_stats_see_the_current_frame_first():
  g, p, s = _split(_cfg(dropout=0.0))
  k = jax.random.split(jax.random.key(5), 2)
  cur = jax.random.normal(k[0], (2, 32, 48, 3)) * 40 + 30
  key = jax.random.normal(k[1], (2, 32, 48, 3)) * 20 - 50

  @jax.jit
  def run(p, s):
    model = nnx.merge(g, p, s)
    model(cur, key, jnp.zeros((2, 32, 48, 2)), train=True)
    stem = model.backbone.conv1
    return (
        nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
        jnp.mean(stem(cur), (0, 1, 2)),
        jnp.mean(stem(key), (0, 1, 2)),
    )

  stats, m_cur, m_key = run(p, s)
  # Running mean starts at 0, momentum 0.1: cur then key gives
  # 0.9 * 0.1 * m_cur + 0.1 * m_key (the other order would swap them).
  np.testing.assert_allclose(
      stats['backbone']['bn1']['mean'],
      0.09 * m_cur + 0.1 * m_key,
      rtol=1e-4,
      atol=1e-4,
  )


def test_channel_dropout_drops_whole_channels():
  x = jnp.ones((2, 4, 4, 64))
  y = np.asarray(layers.channel_dropout(x, 0.5, jax.random.key(0)))
  per_channel = y.reshape(2, 16, 64)
  # Every channel is either all zero or all 2 (= 1 / (1 - 0.5)).
  assert set(np.unique(per_channel)) <= {0.0, 2.0}
  assert np.all(per_channel.min(1) == per_channel.max(1))
  assert 0 < (per_channel[:, 0] == 0).mean() < 1
  np.testing.assert_array_equal(
      np.asarray(layers.channel_dropout(x, 0.5, None)), x
  )


@pytest.mark.parametrize(
    'k,stride,dilation', [(3, 1, 2), (3, 1, 10), (7, 2, 1), (3, 2, 1)]
)
def test_im2col_kernel_gradient_equals_torch_and_xla(k, stride, dilation):
  """Both written-out kernel gradients (im2col and the convolution form)
  agree with each other and with PyTorch's ``conv2d`` backward; dilation 10
  on a 9x11 map exercises a kernel cropped to 1x3."""
  torch = pytest.importorskip('torch')
  x = jax.random.normal(jax.random.key(1), (2, 9, 11, 6))
  convs = {
      m: layers.Conv(
          6,
          4,
          k,
          stride=stride,
          dilation=dilation,
          kernel_init=layers.he_normal(),
          rngs=nnx.Rngs(params=0),
          kernel_grad=m,
      )
      for m in ('im2col', 'conv')
  }
  g = jax.random.normal(jax.random.key(2), convs['conv'](x).shape)

  def grads(conv):
    graphdef, params = nnx.split(conv)
    params = nnx.to_pure_dict(params)
    f = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) * g)
    dp, dx = jax.grad(f, argnums=(0, 1))(params, x)
    return dp['kernel'], dx

  ref_dk, ref_dx = grads(convs['conv'])
  dk, dx = grads(convs['im2col'])
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
  xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
  kt = torch.tensor(
      np.asarray(convs['conv'].kernel[...]).transpose(3, 2, 0, 1),
      requires_grad=True,
  )
  yt = torch.nn.functional.conv2d(
      xt, kt, stride=stride, padding=dilation * (k // 2), dilation=dilation
  )
  (yt * torch.tensor(np.asarray(g).transpose(0, 3, 1, 2))).sum().backward()
  np.testing.assert_allclose(
      dk, kt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(
      dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5
  )


def test_auto_kernel_gradient_is_chosen_per_shape(monkeypatch):
  """'auto' takes im2col on CPU only where the stacked patches of the call
  fit AUTO_IM2COL_MAX_BYTES: at the real configs' sizes the convolution
  form keeps the step's memory down."""
  pick = layers._kernel_grad_mode  # pylint: disable=protected-access
  k3 = jnp.zeros((3, 3, 512, 512))
  small = jax.ShapeDtypeStruct((2, 16, 32, 512), jnp.float32)  # 128x256/8
  real = jax.ShapeDtypeStruct((2, 90, 160, 512), jnp.float32)  # 720x1280/8
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert pick('auto', small, k3, 1) == 'im2col'
  assert pick('auto', real, k3, 1) == 'conv'
  assert pick('im2col', real, k3, 1) == 'im2col'
  assert pick('conv', small, k3, 1) == 'conv'
  # Stride 2 counts the output grid: 75.5 MB of patches at stride 1,
  # 18.9 MB at stride 2.
  k = jnp.zeros((3, 3, 64, 64))
  x = jax.ShapeDtypeStruct((1, 128, 256, 64), jnp.float32)
  assert pick('auto', x, k, 1) == 'conv' and pick('auto', x, k, 2) == 'im2col'
  monkeypatch.setattr(layers, 'AUTO_IM2COL_MAX_BYTES', 2**40)
  assert pick('auto', real, k3, 1) == 'im2col'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert pick('auto', small, k3, 1) is None


@pytest.mark.parametrize(
    'hw,k,stride,dilation',
    [
        ((9, 11), 3, 1, 1),
        ((9, 11), 3, 1, 4),
        ((9, 11), 3, 2, 1),
        ((10, 7), 3, 2, 2),
        ((13, 16), 7, 2, 1),
        ((12, 12), 3, 4, 1),
    ],
)
def test_explicit_input_gradient_equals_xla(hw, k, stride, dilation):
  """The written-out input gradient equals XLA's, for odd and even sizes,
  strides and dilations."""
  x = jax.random.normal(jax.random.key(0), (2, *hw, 5))
  kernel = jax.random.normal(jax.random.key(1), (k, k, 5, 3))
  p = dilation * (k // 2)
  pads = ((p, p), (p, p))
  conv = lambda a: layers._conv(a, kernel, stride, dilation, pads)  # pylint: disable=protected-access
  y, vjp = jax.vjp(conv, x)
  dy = jax.random.normal(jax.random.key(2), y.shape)
  got = layers._conv_input_grad(dy, kernel, hw, stride, dilation, pads)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, vjp(dy)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', ['conv', 'im2col'])
def test_gradients_in_a_scanned_remat_block_are_eigen_convolutions(mode):
  """Inside scanned, checkpointed blocks XLA folds the flipped kernel of an
  input gradient into '01oi' dimension labels and the kernel gradient into
  'f01b_i01o', and XLA:CPU runs such convolutions as generic loops (the
  real-size step did not finish its first step in 16 minutes). Every
  convolution of the compiled gradient keeps the one form XLA:CPU hands to
  Eigen."""
  conv = layers.Conv(
      8,
      8,
      3,
      dilation=2,
      kernel_init=layers.he_normal(),
      rngs=nnx.Rngs(params=0),
      kernel_grad=mode,
  )
  kernels = jnp.stack([conv.kernel[...]] * 3)  # [3, 3, 3, 8, 8]

  def loss(kernels, x):
    def body(h, k):
      y = layers.conv_explicit_grads(h, k, 1, 2, ((2, 2), (2, 2)), mode)
      return jnp.tanh(y), None

    h, _ = jax.lax.scan(jax.checkpoint(body), x, kernels)
    return jnp.sum(h**2)

  x = jax.ShapeDtypeStruct((1, 12, 16, 8), jnp.float32)
  hlo = (
      jax.jit(jax.grad(loss, argnums=(0, 1)))
      .lower(jax.ShapeDtypeStruct(kernels.shape, jnp.float32), x)
      .compile()
      .as_text()
  )
  labels = re.findall(r'dim_labels=(\w+->\w+)', hlo)
  assert len(labels) >= 3, labels  # forward, input and kernel gradient
  assert set(labels) == {'b01f_01io->b01f'}, labels


def test_resnet_remat_gives_the_same_loss_gradients_and_statistics():
  """``model.remat`` recomputes each bottleneck in the backward pass: the
  same loss, gradients and BatchNorm running averages (train mode)."""
  x = jax.random.normal(jax.random.key(0), (2, 2, 33, 41, 3))
  flow = jax.random.normal(jax.random.key(1), (2, 33, 41, 2))
  outs = []
  for remat in (False, True):
    g, p, s = _split(_cfg(layers=(2, 1, 2, 1), remat=remat))

    def loss(p, s):
      m = nnx.merge(g, p, s)
      out = m.clip(x, flow, train=True, rng=jax.random.key(3))
      stats = nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
      return jnp.sum(jnp.tanh(out['pred']) ** 2), stats

    (value, stats), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(p, s)
    outs.append((value, stats, grad))
  (l0, s0, g0), (l1, s1, g1) = outs
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((s0, g0)), jax.tree.leaves((s1, g1))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_bad_model_config_values_name_the_key():
  with pytest.raises(ValueError, match='config.model.conv_kernel_grad'):
    _split(_cfg(conv_kernel_grad='fast'))
  with pytest.raises(ValueError, match='config.model.dtype'):
    _split(_cfg(dtype='float16'))
  with pytest.raises(ValueError, match='config.model.backbone_init'):
    _split(_cfg(backbone_init='xavier'))
  with pytest.raises(ValueError, match='config.model.name'):
    _split(_cfg(name='unet'))


@pytest.mark.parametrize('layer', ['stem', 'layer1', 'layer3'])
def test_feature_fusion_in_the_model(layer):
  """An empty mask gives the two plain forwards; a full mask with weight 1
  swaps the clips from ``layer`` on (aux head included)."""
  from dastc_jax.method import fusion  # pylint: disable=g-import-not-at-top

  g, p, s = _split(_cfg())
  k = jax.random.split(jax.random.key(3), 4)
  xs = [jax.random.normal(k[i], (2, 40, 48, 3)) * 50 for i in range(4)]
  flow = jax.random.normal(jax.random.key(9), (2, 40, 48, 2))
  model = nnx.merge(g, p, s)
  plain_s = model(xs[0], xs[1], flow, train=False, fuse_at_input=True)
  plain_t = model(xs[2], xs[3], flow, train=False, fuse_at_input=True)

  def mixed(mask, weight):
    return model.mixed_pair(
        (xs[0], xs[1], flow),
        (xs[2], xs[3], flow),
        mask,
        layer=layer,
        mix_fn=lambda a, b, m: fusion.feature_mix(a, b, m, weight),
        train=False,
        rng=None,
        lt_mask=None,
    )

  out_s, out_t = mixed(jnp.zeros((2, 2, 40, 48)), 0.3)
  assert float(out_s['mix_info']['feat_rel_diff_f0']) == 0.0  # empty mask
  for key in ('pred', 'pred_aux'):
    np.testing.assert_allclose(out_s[key], plain_s[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_t[key], plain_t[key], rtol=1e-5, atol=1e-5)
  out_s, out_t = mixed(jnp.ones((2, 2, 40, 48)), 1.0)
  for key in ('pred', 'pred_aux'):
    np.testing.assert_allclose(out_s[key], plain_t[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_t[key], plain_s[key], rtol=1e-5, atol=1e-5)
  # The key frame is exchanged with its own (t-1) mask: exchanging only
  # frame t changes the fused output but not the current-frame logits'
  # source (they are the other clip's), and the key logits stay the clip's.
  only_t = jnp.stack([jnp.ones((2, 40, 48)), jnp.zeros((2, 40, 48))], 1)
  swap_s, _ = model.mixed_pair(
      (xs[0], xs[1], flow),
      (xs[2], xs[3], flow),
      {'to_s': only_t, 'to_t': only_t},
      layer=layer,
      mix_fn=fusion.feature_swap,
      train=False,
      rng=None,
      lt_mask=None,
  )
  np.testing.assert_allclose(
      swap_s['logits'], plain_t['logits'], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
      swap_s['key_logits'], plain_s['key_logits'], rtol=1e-5, atol=1e-5
  )
  assert float(swap_s['mix_info']['feat_rel_diff_to_s_f0']) > 0.1
  assert float(swap_s['mix_info']['feat_rel_diff_to_s_f1']) == 0.0
  assert float(jnp.abs(plain_s['pred'] - plain_t['pred']).max()) > 1e-3


def test_image_model_is_the_single_frame_network():
  """``deeplabv2`` (clip length 1): ACCEL without the key frame, the flow
  and the fusion layer; with the same weights its scores are ACCEL's
  current-frame scores."""
  g1, p1, s1 = _split(_cfg(name='deeplabv2'))
  g2, p2, s2 = _split(_cfg())
  assert set(p2) - set(p1) == {'sf_layer'}
  x = jax.random.normal(jax.random.key(0), (2, 1, 40, 56, 3)) * 50
  img = nnx.merge(g1, p1, s1).clip(x, None, train=False)
  np.testing.assert_array_equal(img['pred'], img['logits'])
  assert 'key_logits' not in img
  p2 = {**p2, **p1}
  acc = nnx.merge(g2, p2, s1)(
      x[:, 0], x[:, 0], jnp.zeros((2, 40, 56, 2)), train=False
  )
  np.testing.assert_allclose(acc['logits'], img['logits'], rtol=1e-6)
  up = nnx.merge(g1, p1, s1).clip(x, None, train=False, fuse_at_input=True)
  assert up['pred'].shape == (2, 40, 56, 5)


def test_long_tail_pixels_take_the_current_scores_in_the_fusion():
  """Inside the long-tail mask the warped key-frame scores are replaced by
  the current frame's (the pasted patches do not move); outside it the
  fusion sees the warped key-frame scores."""
  g, p, s = _split(_cfg())
  model = nnx.merge(g, p, s)
  k = jax.random.split(jax.random.key(5), 3)
  cur = jax.random.normal(k[0], (1, 6, 8, 5))
  key = jax.random.normal(k[1], (1, 6, 8, 5))
  flow = jnp.zeros((1, 6, 8, 2))
  lt = jnp.zeros((1, 6, 8)).at[:, :, :4].set(1.0)
  # A fusion layer that outputs the (warped) key-frame half only.
  w = jnp.concatenate([jnp.zeros((5, 5)), jnp.eye(5)], 0)[None, None]
  model.sf_layer.kernel[...] = w
  out = model.fuse(cur, key, flow, lt_mask=lt)
  np.testing.assert_allclose(out[:, :, :4], cur[:, :, :4], rtol=1e-6)
  np.testing.assert_allclose(out[:, :, 4:], key[:, :, 4:], rtol=1e-6)


@pytest.mark.parametrize('dilation', [1, 2, 6, 18])
def test_depthwise_conv_equals_the_grouped_convolution(dilation):
  """Shifted sums give the grouped convolution's output and gradients, with
  nnx.Conv's parameter names and shapes."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, 5))
  dw = layers.DepthwiseConv(
      5, 3, dilation=dilation, use_bias=True, rngs=nnx.Rngs(0)
  )
  ref = nnx.Conv(
      5,
      5,
      (3, 3),
      padding=((dilation,) * 2,) * 2,
      kernel_dilation=dilation,
      feature_group_count=5,
      rngs=nnx.Rngs(0),
  )
  assert ref.kernel.shape == dw.kernel.shape == (3, 3, 1, 5)
  ref.kernel[...] = dw.kernel[...]
  ref.bias[...] = jnp.arange(5.0)
  dw.bias[...] = jnp.arange(5.0)
  loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
  gm_dw, gx_dw = nnx.grad(loss, argnums=(0, 1))(dw, x)
  gm_ref, gx_ref = nnx.grad(loss, argnums=(0, 1))(ref, x)
  np.testing.assert_allclose(dw(x), ref(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx_dw, gx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      gm_dw.kernel[...], gm_ref.kernel[...], rtol=1e-4, atol=1e-4
  )


_TEMPS_SCRIPT = """
import json
import jax
import jax.numpy as jnp
from dastc_jax.models import layers

x = jnp.zeros((1, 48, 64, 256))
w = jnp.zeros((3, 3, 256))
out = {}
for d in (1, 6, 18):
  def autodiff(x, w, d):
    return layers._shifted_sum(layers._pad_hw(x, d), w, x.shape[1:3], d)
  for name, fn in (('written', layers.depthwise_conv), ('autodiff', autodiff)):
    grad = jax.jit(jax.grad(
        lambda x, w: jnp.sum(jnp.sin(fn(x, w, d))), argnums=(0, 1)))
    out[f'{name}{d}'] = (
        grad.lower(x, w).compile().memory_analysis().temp_size_in_bytes)
print(json.dumps(out))
"""


@pytest.fixture(scope='module')
def depthwise_temps():
  """XLA's temporaries of both backward passes, compiled with the scheduler
  training uses (the suite's process turns it off: tests/conftest.py)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  flags = os.environ.get('XLA_FLAGS', '').replace(
      '--xla_cpu_enable_concurrency_optimized_scheduler=false', ''
  )
  proc = subprocess.run(
      [sys.executable, '-c', _TEMPS_SCRIPT],
      env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu'),
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration  # a subprocess
@pytest.mark.parametrize('dilation', [1, 6, 18])
def test_depthwise_conv_gradient_keeps_no_copy_per_tap(
    dilation, depthwise_temps
):
  """The written-out backward pass holds the padded input and a few
  input-sized buffers; autodiff of the same shifted sums holds a shifted
  copy of the input per tap (the DAFormer head's 15 GB at 180x320)."""
  x_bytes = 1 * 48 * 64 * 256 * 4
  padded = (48 + 2 * dilation) * (64 + 2 * dilation) * 256 * 4
  bound = 2 * padded + 2 * x_bytes
  assert depthwise_temps[f'written{dilation}'] <= bound
  # the bound tells the two apart
  assert depthwise_temps[f'autodiff{dilation}'] > bound


def test_materialise_grad_is_the_identity_with_its_gradient_in_one_buffer():
  x = jnp.arange(24.0).reshape(2, 3, 4)
  g = jnp.full((2, 3, 4), 0.5).at[0, 0, 0].set(jnp.nan)  # a NaN first
  out, vjp = jax.vjp(layers.materialise_grad, x)
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(vjp(g)[0], g)  # NaN passes through too
  # On CPU the backward pass holds the conditional that keeps XLA from
  # fusing the gradient into (and recomputing it in) each consumer (for a
  # gradient XLA cannot fold to a constant).
  f = jax.jit(jax.grad(lambda x: jnp.sum(layers.materialise_grad(x * x) * x)))
  assert 'conditional' in f.lower(x).compile().as_text()
