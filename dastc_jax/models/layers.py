"""Layers of the DeepLab models: convolutions, frozen-affine BatchNorm, pools.

Every 1x1 convolution runs as a matmul over the channel axis: on XLA:CPU the
weight gradient of a 1x1 ``conv_general_dilated`` is ~20x slower than the
matmul form (docs/performance.md). On CPU the kernel gradient of the larger
kernels is an im2col matmul too (``KERNEL_GRADS``). Kernels are stored in HWIO
layout either way so that converted PyTorch weights map one to one.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
DTYPES = tuple(_DTYPES)  # config.model.dtype
INITIALIZERS = ('he', 'normal')  # config.model.backbone_init


def compute_dtype(name: str):
  """``config.model.dtype`` -> the jnp dtype of activations and matmuls."""
  if name not in _DTYPES:
    raise ValueError(
        f'Unknown config.model.dtype={name!r}; expected one of '
        f'{sorted(_DTYPES)}.'
    )
  return _DTYPES[name]


def _host_rng(key: jax.Array) -> np.random.Generator:
  bits = np.asarray(jax.random.key_data(key)).astype(np.uint32).ravel()
  return np.random.default_rng(bits.tolist())


def _host_normal(
    key: jax.Array, shape: tuple[int, ...], std: float, dtype
) -> jax.Array:
  """N(0, std^2) drawn on the host from a generator seeded by ``key``.

  Eager ``jax.random`` compiles one XLA program per parameter shape (~0.35 s
  each on a 2-core CPU, ~20 s for the model); numpy draws the same
  distribution with no compile. Under tracing (``jax.eval_shape``) only the
  shapes matter, so the traced path uses ``jax.random``.
  """
  if isinstance(key, jax.core.Tracer):
    return std * jax.random.normal(key, shape, dtype)
  return jnp.asarray(_host_rng(key).standard_normal(shape) * std, dtype)


def _host_uniform(
    key: jax.Array, shape: tuple[int, ...], bound: float, dtype
) -> jax.Array:
  """U(-bound, bound), drawn like ``_host_normal``."""
  if isinstance(key, jax.core.Tracer):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return jnp.asarray(_host_rng(key).uniform(-bound, bound, shape), dtype)


def zeros() -> Initializer:
  """Zeros, built on the host (no compile per shape)."""
  return lambda key, shape, dtype: jnp.asarray(np.zeros(shape), dtype)


def ones() -> Initializer:
  """Ones, built on the host (no compile per shape)."""
  return lambda key, shape, dtype: jnp.asarray(np.ones(shape), dtype)


def group_fan_out_normal(groups: int = 1) -> Initializer:
  """N(0, 2 / fan_out) with ``fan_out = kh * kw * cout / groups`` (HWIO):
  the MiT encoder's conv init in mmseg (``groups = cout`` for its
  depthwise convs, so their fan-out is ``kh * kw``)."""

  def init(key, shape, dtype):
    fan_out = int(np.prod(shape[:-2])) * shape[-1] // groups
    return _host_normal(key, shape, float(np.sqrt(2.0 / fan_out)), dtype)

  return init


def torch_linear(fan_in: int) -> Initializer:
  """PyTorch's default ``nn.Linear`` init of the weight and of the bias:
  U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / float(np.sqrt(fan_in))
  return lambda key, shape, dtype: _host_uniform(key, shape, bound, dtype)


def he_normal() -> Initializer:
  """Kaiming-normal (fan_out, ReLU gain), torchvision's ResNet init."""

  def init(key, shape, dtype):
    fan_out = int(np.prod(shape[:-2])) * shape[-1]  # HWIO: kh * kw * cout
    return _host_normal(key, shape, float(np.sqrt(2.0 / fan_out)), dtype)

  return init


def normal(std: float) -> Initializer:
  """N(0, std^2), the DeepLab reference init of every conv."""
  return lambda key, shape, dtype: _host_normal(key, shape, std, dtype)


def initializer(name: str, std: float) -> Initializer:
  """``config.model.backbone_init`` -> initializer (``he`` or ``normal``)."""
  if name == 'he':
    return he_normal()
  if name == 'normal':
    return normal(std)
  raise ValueError(
      f'Unknown config.model.backbone_init={name!r}; expected '
      "'he' or 'normal'."
  )


def _zeros(n: int) -> jax.Array:
  return jnp.asarray(np.zeros((n,), np.float32))


def _ones(n: int) -> jax.Array:
  return jnp.asarray(np.ones((n,), np.float32))


class Conv(nnx.Module):
  """2-D convolution in NHWC with an HWIO kernel; 1x1 kernels run as matmuls.

  Padding is ``dilation * (k // 2)`` on every side (PyTorch DeepLab padding).
  ``kernel_grad`` picks how the kernel gradient of a k > 1 conv is computed
  (``KERNEL_GRADS``).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int,
      *,
      stride: int = 1,
      dilation: int = 1,
      use_bias: bool = False,
      kernel_init: Initializer,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
      kernel_grad: str = 'auto',
  ):
    check_kernel_grad(kernel_grad)
    self.kernel_grad = kernel_grad
    self.kernel_size = kernel_size
    self.stride = stride
    self.dilation = dilation
    self.dtype = dtype
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32))
    self.bias = nnx.Param(_zeros(out_features)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [B, H, W, Cin] -> [B, H', W', Cout]
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    if self.kernel_size == 1:
      if self.stride > 1:
        x = x[:, :: self.stride, :: self.stride, :]
      y = jnp.einsum('bhwc,cd->bhwd', x, kernel[0, 0])
    else:
      kernel, pads = _crop_to_reachable_taps(
          kernel, x.shape[1:3], self.dilation
      )
      grad = _kernel_grad_mode(self.kernel_grad, x, kernel, self.stride)
      if grad is None:
        y = _conv(x, kernel, self.stride, self.dilation, pads)
      else:
        y = conv_explicit_grads(
            x, kernel, self.stride, self.dilation, pads, grad
        )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


# How the kernel gradient of a k x k (k > 1) convolution is computed:
# 'conv' = a convolution of the input with the output gradient (the one
# XLA's autodiff would build, in the layout XLA:CPU runs with Eigen);
# 'im2col' = one matmul over stacked
# shifted inputs (XLA:CPU's kernel-gradient convolution is well below its
# matmul speed; the whole-step effect is measured in benchmarks/step.md);
# 'auto' = 'im2col' on CPU where the stacked patches of the call take at
# most AUTO_IM2COL_MAX_BYTES, 'conv' otherwise. The patches are kh*kw times
# the input: at 128x256 im2col is the faster choice on CPU
# (benchmarks/step.md), but at the real configs' sizes (a ResNet-101 layer4
# map of 90x160 has 265 MB of patches, an ASPP branch 1 GB) it multiplies
# the step's temporaries (benchmarks/memory.md). On CPU both write the input
# gradient out explicitly (``conv_explicit_grads``); 'auto' on other
# backends leaves the whole backward pass to XLA.
KERNEL_GRADS = ('auto', 'conv', 'im2col')
AUTO_IM2COL_MAX_BYTES = 64 * 2**20


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), written with ``erf`` as PyTorch computes it.

  ``jax.nn.gelu(approximate=False)`` writes it with ``erfc``, which XLA:CPU
  evaluates 4-6x slower than ``erf`` (docs/vit.md); the two agree
  to float32 rounding (tests/test_mit.py).
  """
  half = np.asarray(0.5, x.dtype)
  return half * x * (1 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


@jax.custom_vjp
def materialise_grad(x: jax.Array) -> jax.Array:
  """Identity whose gradient XLA:CPU computes once, into its own buffer.

  XLA:CPU fuses an elementwise producer into each of its consumers and
  recomputes it there. Where a large gradient expression (the DAFormer
  head's: four ASPP branches' input gradients, BatchNorm and ReLU
  backward, 27 shifted slices of the depthwise convolutions) feeds several
  consumers that read it transposed (the embeddings' weight gradients, the
  resizes' backward pass), every consumer re-evaluated the whole
  expression in a transposed, unvectorised loop: 180 ms of the head's
  forward + backward pass against PyTorch's 19 ms at 128x256
  (benchmarks/head_ops_before_materialise.md). On CPU the backward pass
  hands the gradient through a conditional whose predicate XLA cannot
  evaluate (it is always true), and a conditional's result is a buffer of
  its own, so it is computed once. Elsewhere, and in the forward pass, it
  is the identity.
  """
  return x


def _materialise_fwd(x):
  return x, None


def _materialise_bwd(_, g):
  if jax.default_backend() != 'cpu':
    return (g,)
  first = g[(0,) * g.ndim]
  always = (first == first) | jnp.isnan(first)  # true for every value
  return (jax.lax.cond(always, lambda a: a, jnp.zeros_like, g),)


materialise_grad.defvjp(_materialise_fwd, _materialise_bwd)


def _shifted_sum(
    xp: jax.Array,
    w: jax.Array,
    hw: tuple[int, int],
    dilation: int,
    flip: bool = False,
) -> jax.Array:
  """sum_ij xp[:, i*d:i*d+h, j*d:j*d+w, :] * w[i, j] (w flipped if asked);
  ``xp`` [B, H + 2p, W + 2p, C], ``w`` [k, k, C] -> [B, H, W, C]."""
  k = w.shape[0]
  h, wd = hw
  out = None
  for i in range(k):
    for j in range(k):
      di, dj = i * dilation, j * dilation
      tap = w[k - 1 - i, k - 1 - j] if flip else w[i, j]
      term = xp[:, di : di + h, dj : dj + wd, :] * tap
      out = term if out is None else out + term
  return out


def _pad_hw(x: jax.Array, p: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x: jax.Array, w: jax.Array, dilation: int) -> jax.Array:
  """Depthwise k x k convolution (stride 1, 'same' zero padding, dilation
  ``dilation``) as shifted multiply-adds; ``x`` [B, H, W, C], ``w``
  [k, k, C] (odd k).

  The backward pass is written out so that it keeps only ``x`` and ``w``:
  the input gradient is the same shifted sum of the padded output gradient
  with the flipped kernel, and each kernel tap's gradient one fused
  reduction. Left to autodiff, XLA materialised every tap's shifted slice of
  the input as a residual: k*k copies of the input per convolution (the
  DAFormer head's three dilated 1024-channel convolutions at 180x320 held
  15 GB of temporaries for one forward and backward pass in float32;
  docs/performance.md).
  """
  p = dilation * (w.shape[0] // 2)
  return _shifted_sum(_pad_hw(x, p), w, x.shape[1:3], dilation)


def _depthwise_fwd(x, w, dilation):
  return depthwise_conv(x, w, dilation), (x, w)


def _depthwise_bwd(dilation, res, g):
  # The barrier keeps XLA from merging the backward's shifted slices with
  # the forward's (common-subexpression elimination would keep those alive
  # from the forward to the backward pass).
  x, w = jax.lax.optimization_barrier(res)  # [B, H, W, C], [k, k, C]
  k = w.shape[0]
  p = dilation * (k // 2)
  hw = x.shape[1:3]
  g = g.astype(x.dtype)
  # out[h] = sum_i x[h + i*d - p] w[i]  =>  dx[m] = sum_i g[m - i*d + p] w[i],
  # a shifted sum of the padded g with the kernel flipped.
  dx = _shifted_sum(_pad_hw(g, p), w, hw, dilation, flip=True)
  xp = _pad_hw(x, p)
  g32 = g.astype(jnp.float32)
  b, h, wd, c = x.shape
  offsets = dilation * jnp.array(
      [(i, j) for i in range(k) for j in range(k)], jnp.int32
  )  # [k*k, 2]

  def tap_grad(offset: jax.Array) -> jax.Array:  # one tap at a time
    tap = jax.lax.dynamic_slice(xp, (0, offset[0], offset[1], 0), (b, h, wd, c))
    return jnp.sum(tap.astype(jnp.float32) * g32, axis=(0, 1, 2))  # [C]

  dw = jax.lax.map(tap_grad, offsets).reshape(k, k, c)
  return dx, dw.astype(w.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nnx.Module):
  """k x k depthwise convolution (stride 1, 'same' padding, dilation d) as
  k*k shifted multiply-adds (:func:`depthwise_conv`).

  The parameters are those of ``nnx.Conv(C, C, k, feature_group_count=C)``
  (``kernel`` [k, k, 1, C], optional ``bias`` [C]), so weights convert
  alike. Why not a grouped convolution: XLA:CPU computes grouped
  convolutions and their gradients slowly; measured forward + backward of a
  3x3 depthwise conv on [1, 8, 16, 1280]: 91 ms as a grouped convolution,
  2 ms as shifted sums (docs/performance.md). Shifted sums are elementwise
  work that every backend fuses.
  """

  def __init__(
      self,
      dim: int,
      kernel: int = 3,
      *,
      dilation: int = 1,
      use_bias: bool,
      kernel_init: Initializer | None = None,
      dtype=None,
      rngs: nnx.Rngs,
  ):
    init = kernel_init or nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(
        init(rngs.params(), (kernel, kernel, 1, dim), jnp.float32)
    )
    self.bias = nnx.Param(_zeros(dim)) if use_bias else None
    self.size, self.dilation, self.dtype = kernel, dilation, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)  # [B, H, W, C]
    w = self.kernel[...].astype(dtype)[:, :, 0]  # [k, k, C]
    out = depthwise_conv(x, w, self.dilation)
    if self.bias is not None:
      out = out + self.bias[...].astype(dtype)
    return out


def check_kernel_grad(name: str) -> None:
  """Raises for an unknown ``config.model.conv_kernel_grad``."""
  if name not in KERNEL_GRADS:
    raise ValueError(
        f'Unknown config.model.conv_kernel_grad={name!r}; '
        f'expected one of {KERNEL_GRADS}.'
    )


def _kernel_grad_mode(
    name: str, x: jax.Array, kernel: jax.Array, stride: int
) -> str | None:
  """'im2col' or 'conv' for :func:`conv_explicit_grads`, or None for XLA's
  own backward pass ('auto' off CPU)."""
  if name != 'auto':
    return name
  if jax.default_backend() != 'cpu':
    return None
  kh, kw, cin, _ = kernel.shape
  b, h, w = x.shape[0], -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  patches = b * h * w * kh * kw * cin * jnp.dtype(x.dtype).itemsize
  return 'im2col' if patches <= AUTO_IM2COL_MAX_BYTES else 'conv'


def _conv(x, kernel, stride, dilation, pads):
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(stride, stride),
      padding=pads,
      rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_explicit_grads(
    x: jax.Array,
    kernel: jax.Array,
    stride: int,
    dilation: int,
    pads,
    kernel_grad: str,
) -> jax.Array:
  """Convolution whose backward pass is written out.

  The forward pass is XLA's convolution. The input gradient is a
  convolution of ``dy`` with the flipped kernel in HWIO order
  (:func:`_conv_input_grad`). The kernel gradient is a convolution of the
  input with ``dy`` (``kernel_grad='conv'``) or one
  ``[Cout, P] x [P, kh*kw*Cin]`` matmul over the stacked shifted (and
  strided) inputs (``'im2col'``), accumulated in float32. Every convolution
  here has NHWC/HWIO operands held in that order by optimisation barriers,
  the only form XLA:CPU runs with Eigen inside loops. ``pads`` is
  ``((top, bottom), (left, right))``.
  """
  return _conv(x, kernel, stride, dilation, pads)


def _explicit_fwd(x, kernel, stride, dilation, pads, kernel_grad):
  del kernel_grad
  return _conv(x, kernel, stride, dilation, pads), (x, kernel)


def _explicit_bwd(stride, dilation, pads, kernel_grad, res, dy):
  x, kernel = res
  # dy: [B, h, w, Cout]
  dx = _conv_input_grad(dy, kernel, x.shape[1:3], stride, dilation, pads)
  kh, kw, cin, cout = kernel.shape
  h, w = dy.shape[1:3]
  s, d = stride, dilation
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  if kernel_grad == 'conv':
    # The kernel gradient as a convolution in the layout XLA:CPU hands to
    # Eigen: [Cin, Hp, Wp, B] (B as features) * [h, w, B, Cout] (dy as the
    # kernel, dilated by the stride), strided by the dilation ->
    # [Cin, kh, kw, Cout]. The barriers keep XLA from folding the two
    # transposes back into the dimension labels ('f01b_i01o'), which
    # XLA:CPU runs as a generic loop inside scanned or rematerialised blocks.
    lhs = jax.lax.optimization_barrier(jnp.transpose(xp, (3, 1, 2, 0)))
    rhs = jax.lax.optimization_barrier(jnp.transpose(dy, (1, 2, 0, 3)))
    dk = jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=(d, d),
        padding=((0, 0), (0, 0)),
        rhs_dilation=(s, s),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        preferred_element_type=jnp.float32,
    )
    dk = jnp.transpose(dk[:, :kh, :kw], (1, 2, 0, 3))  # [kh, kw, Cin, Cout]
    return dx, dk.astype(kernel.dtype)
  cols = jnp.stack(
      [
          xp[
              :,
              i * d : i * d + (h - 1) * s + 1 : s,
              j * d : j * d + (w - 1) * s + 1 : s,
          ]
          for i in range(kh)
          for j in range(kw)
      ],
      axis=3,
  )
  # cols: [B, h, w, kh*kw, Cin]. dy^T (small) is the left operand, so that
  # the patches are read in their own layout, without a transpose.
  dk = jnp.transpose(
      jnp.einsum(
          'bhwo,bhwkc->okc', dy, cols, preferred_element_type=jnp.float32
      ),
      (1, 2, 0),
  )  # [kh*kw, Cin, Cout]
  return dx, dk.reshape(kh, kw, cin, cout).astype(kernel.dtype)


conv_explicit_grads.defvjp(_explicit_fwd, _explicit_bwd)


def _conv_input_grad(
    dy: jax.Array,
    kernel: jax.Array,
    hw: tuple[int, int],
    stride: int,
    dilation: int,
    pads,
) -> jax.Array:
  """The gradient of :func:`_conv` with respect to its input.

  A convolution of ``dy`` (dilated by the stride) with the spatially
  flipped kernel, its in/out axes swapped to HWIO. The flipped kernel goes
  through an optimisation barrier: otherwise XLA folds the flip and the
  axis swap into the convolution's dimension labels ('01oi'), and XLA:CPU
  runs a convolution with such a kernel as a generic loop instead of its
  Eigen kernel. Inside a scanned or rematerialised block that happened to
  every 3x3 input gradient; with the kernel gradients, the real-size
  source-only step did not finish its first step in 16 minutes
  (docs/performance.md).
  """
  kh, kw = kernel.shape[:2]
  k = jax.lax.optimization_barrier(
      jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  )  # [kh, kw, Cout, Cin]
  new_pads = []
  for n, m, ks, (lo, _) in zip(hw, dy.shape[1:3], (kh, kw), pads):
    span = dilation * (ks - 1) + 1
    before = span - 1 - lo
    new_pads.append((before, n + span - 2 - (m - 1) * stride - before))
  return jax.lax.conv_general_dilated(
      dy,
      k,
      window_strides=(1, 1),
      padding=new_pads,
      lhs_dilation=(stride, stride),
      rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


def _crop_to_reachable_taps(
    kernel: jax.Array, hw: tuple[int, int], dilation: int
):
  """Drops kernel rows/columns whose taps only ever read zero padding.

  With padding ``d * (k // 2)``, tap offset ``o * d`` reaches the map only if
  ``|o * d| < size``; DeepLab's ASPP (dilation up to 24) on small maps has
  whole rows of such taps. Removing them is exact and saves their FLOPs.

  Returns:
    The cropped kernel and the matching ``((top, bottom), (left, right))``
    padding.
  """
  k = kernel.shape[0]
  pads, crops = [], []
  for size in hw:
    r = k // 2
    while r > 0 and r * dilation >= size:
      r -= 1
    crops.append(slice(k // 2 - r, k // 2 + r + 1))
    pads.append((r * dilation, r * dilation))
  return kernel[crops[0], crops[1]], tuple(pads)


class BatchNorm(nnx.Module):
  """BatchNorm with PyTorch semantics (momentum 0.1, unbiased running var).

  In training it normalises with batch statistics and updates the running
  averages; at eval it uses the running averages. ``group_size`` sets which
  examples share statistics: 0 = the whole global batch (synchronised BN
  across devices); g > 0 = consecutive groups of g examples (g = 1: every
  example on its own, which is what the reference's batch-1 training
  computes, on any number of devices). The running averages move by the
  mean of the groups' statistics. Whether ``scale``/``bias`` are trained is
  decided by the optimizer (``model.freeze_bn_affine``).
  """

  def __init__(
      self,
      num_features: int,
      *,
      momentum: float = 0.1,
      eps: float = 1e-5,
      group_size: int = 0,
  ):
    self.momentum = momentum
    self.eps = eps
    self.group_size = group_size
    self.scale = nnx.Param(_ones(num_features))
    self.bias = nnx.Param(_zeros(num_features))
    self.mean = nnx.BatchStat(_zeros(num_features))
    self.var = nnx.BatchStat(_ones(num_features))

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # x: [B, H, W, C]
    if not train:
      inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
      shift = self.bias[...] - self.mean[...] * inv
      return x * inv.astype(x.dtype) + shift.astype(x.dtype)
    b = x.shape[0]
    g = self.group_size or b
    if b % g:
      raise ValueError(
          f'model.bn_group_size={g} does not divide the batch '
          f'of {b} examples.'
      )
    xf = x.astype(jnp.float32).reshape((b // g, g) + x.shape[1:])
    mean = jnp.mean(xf, axis=(1, 2, 3), keepdims=True)  # [G, 1, 1, 1, C]
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 3), keepdims=True)
    n = g * x.shape[1] * x.shape[2]
    unbiased = jnp.mean(var, axis=(0, 1, 2, 3)) * (n / max(n - 1, 1))
    m = self.momentum
    # set_value (a full replace): `var[...] = x` makes flax compare tracer
    # shardings, which costs ~50 ms of tracing per update.
    self.mean.set_value(
        (1 - m) * self.mean[...]
        + m * jax.lax.stop_gradient(jnp.mean(mean, axis=(0, 1, 2, 3)))
    )
    self.var.set_value(
        (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
    )
    inv = jax.lax.rsqrt(var + self.eps) * self.scale[...]
    shift = self.bias[...] - mean * inv
    y = x.reshape(xf.shape) * inv.astype(x.dtype) + shift.astype(x.dtype)
    return y.reshape(x.shape)


def max_pool_ceil(
    x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1
) -> jax.Array:
  """Max-pool with PyTorch ``ceil_mode=True`` output sizes.

  Args:
    x: ``[B, H, W, C]``.
    window: square window size.
    stride: stride.
    padding: implicit -inf padding on the leading side (and trailing side,
      extended as ceil mode requires).

  Returns:
    ``[B, H', W', C]`` with ``H' = ceil((H + 2p - k) / s) + 1``, dropping the
    last window if it would start in the trailing padding (PyTorch rule).
  """
  pads = []
  for n in x.shape[1:3]:
    out = -(-(n + 2 * padding - window) // stride) + 1
    if (out - 1) * stride >= n + padding:
      out -= 1
    trailing = (out - 1) * stride + window - n - padding
    pads.append((padding, max(trailing, 0)))
  return jax.lax.reduce_window(
      x,
      -jnp.inf,
      jax.lax.max,
      (1, window, window, 1),
      (1, stride, stride, 1),
      ((0, 0), pads[0], pads[1], (0, 0)),
  )


def channel_dropout(
    x: jax.Array, rate: float, key: jax.Array | None
) -> jax.Array:
  """Dropout2d: zeroes whole channels per example, scales the rest.

  Args:
    x: ``[B, H, W, C]``.
    rate: drop probability; 0 or ``key=None`` disables it.
    key: PRNG key.

  Returns:
    Array like ``x``.
  """
  if rate <= 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0], 1, 1, x.shape[3]))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def identity_fusion_init(num_classes: int) -> Initializer:
  """[I | 0] init of the 2C->C score-fusion 1x1 conv (HWIO kernel)."""

  def init(key, shape, dtype):
    del key
    assert shape == (1, 1, 2 * num_classes, num_classes), shape
    k = np.concatenate(
        [np.eye(num_classes), np.zeros((num_classes, num_classes))], axis=0
    )
    return jnp.asarray(k.reshape(shape), dtype)

  return init
