"""RAFT optical flow (Teed & Deng, 2020) in Flax NNX, as torchvision builds it.

Two variants, ``raft_large`` and ``raft_small`` (:data:`VARIANTS`), with
torchvision's module names, so its state dicts convert key by key
(``flow/weights.py``). Arrays are NHWC; images are RGB in [-1, 1] (torchvision's
``OpticalFlow`` preset), H and W multiples of 8. The flow returned for
``(image1, image2)`` lives on image1's grid and points into image2, channel 0
= dx: ``image1(p) ~ image2(p + flow(p))``. docs/optical_flow.md describes the
network and how it is used for the datasets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from dastc_jax.flow import correlation


@dataclasses.dataclass(frozen=True)
class RaftSpec:
  """Sizes of one RAFT variant (torchvision's ``_raft`` arguments)."""

  feature_layers: tuple[int, ...]  # stem, stage 1-3, output
  context_layers: tuple[int, ...]
  block: str  # 'residual' | 'bottleneck'
  context_norm: str | None  # 'batch' | None (the feature encoder: instance)
  corr_levels: int
  corr_radius: int
  motion_corr_layers: tuple[int, ...]
  motion_flow_layers: tuple[int, int]
  motion_out: int
  hidden: int
  gru_kernels: tuple[tuple[int, int], ...]
  flow_head_hidden: int
  convex_upsampling: bool


VARIANTS = {
    'raft_large': RaftSpec(
        feature_layers=(64, 64, 96, 128, 256),
        context_layers=(64, 64, 96, 128, 256),
        block='residual',
        context_norm='batch',
        corr_levels=4,
        corr_radius=4,
        motion_corr_layers=(256, 192),
        motion_flow_layers=(128, 64),
        motion_out=128,
        hidden=128,
        gru_kernels=((1, 5), (5, 1)),
        flow_head_hidden=256,
        convex_upsampling=True,
    ),
    'raft_small': RaftSpec(
        feature_layers=(32, 32, 64, 96, 128),
        context_layers=(32, 32, 64, 96, 160),
        block='bottleneck',
        context_norm=None,
        corr_levels=4,
        corr_radius=3,
        motion_corr_layers=(96,),
        motion_flow_layers=(64, 32),
        motion_out=82,
        hidden=96,
        gru_kernels=((3, 3),),
        flow_head_hidden=128,
        convex_upsampling=False,
    ),
}
_EPS = 1e-5  # torch's InstanceNorm2d / BatchNorm2d default


class Conv(nnx.Conv):
  """``nnx.Conv`` whose 1x1 kernels run as a matmul over channels (on
  XLA:CPU a 1x1 convolution is slower than the same matmul)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if tuple(self.kernel_size) != (1, 1):
      return super().__call__(x)
    s = self.strides if isinstance(self.strides, int) else self.strides[0]
    if s > 1:
      x = x[:, ::s, ::s]
    y = jnp.einsum('bhwc,cd->bhwd', x, self.kernel[...][0, 0])
    return y + self.bias[...]


def _conv(
    cin: int, cout: int, kernel, stride: int = 1, *, rngs: nnx.Rngs
) -> Conv:
  """A biased conv with PyTorch's symmetric (k - 1) / 2 padding."""
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  return Conv(
      cin,
      cout,
      (kh, kw),
      strides=stride,
      padding=(((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2),
      use_bias=True,
      rngs=rngs,
  )


def instance_norm(x: jax.Array) -> jax.Array:
  """Per-image, per-channel normalisation over H, W (no affine)."""
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _EPS)


class ConvNormAct(nnx.Module):
  """torchvision's ``Conv2dNormActivation``: conv, optional norm, ReLU."""

  def __init__(
      self,
      cin: int,
      cout: int,
      kernel,
      stride: int = 1,
      *,
      norm: str | None,
      relu: bool = True,
      rngs: nnx.Rngs,
  ):
    self.conv = _conv(cin, cout, kernel, stride, rngs=rngs)
    self.norm = (
        nnx.BatchNorm(cout, use_running_average=True, epsilon=_EPS, rngs=rngs)
        if norm == 'batch'
        else None
    )
    self.instance = norm == 'instance'
    self.relu = relu

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    if self.norm is not None:
      x = self.norm(x)
    if self.instance:
      x = instance_norm(x)
    return jax.nn.relu(x) if self.relu else x


def _shortcut(
    cin: int, cout: int, stride: int, norm: str | None, rngs: nnx.Rngs
) -> ConvNormAct | None:
  """The projected shortcut of a strided block (``downsample``), or None."""
  if stride == 1:
    return None
  return ConvNormAct(cin, cout, 1, stride, norm=norm, relu=False, rngs=rngs)


def _add_shortcut(
    downsample: ConvNormAct | None, x: jax.Array, y: jax.Array
) -> jax.Array:
  return jax.nn.relu((x if downsample is None else downsample(x)) + y)


class ResidualBlock(nnx.Module):
  """Two 3x3 conv-norm-ReLU, projected shortcut when strided, ReLU."""

  def __init__(
      self,
      cin: int,
      cout: int,
      stride: int,
      *,
      norm: str | None,
      rngs: nnx.Rngs,
  ):
    self.convnormrelu1 = ConvNormAct(cin, cout, 3, stride, norm=norm, rngs=rngs)
    self.convnormrelu2 = ConvNormAct(cout, cout, 3, norm=norm, rngs=rngs)
    self.downsample = _shortcut(cin, cout, stride, norm, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return _add_shortcut(
        self.downsample, x, self.convnormrelu2(self.convnormrelu1(x))
    )


class BottleneckBlock(nnx.Module):
  """1x1 -> 3x3 (strided) -> 1x1 at a quarter of the width, then as above."""

  def __init__(
      self,
      cin: int,
      cout: int,
      stride: int,
      *,
      norm: str | None,
      rngs: nnx.Rngs,
  ):
    mid = cout // 4
    self.convnormrelu1 = ConvNormAct(cin, mid, 1, norm=norm, rngs=rngs)
    self.convnormrelu2 = ConvNormAct(mid, mid, 3, stride, norm=norm, rngs=rngs)
    self.convnormrelu3 = ConvNormAct(mid, cout, 1, norm=norm, rngs=rngs)
    self.downsample = _shortcut(cin, cout, stride, norm, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.convnormrelu3(self.convnormrelu2(self.convnormrelu1(x)))
    return _add_shortcut(self.downsample, x, y)


class FeatureEncoder(nnx.Module):
  """7x7/2 stem, three stages of two blocks (strides 1, 2, 2), 1x1 out."""

  def __init__(
      self,
      layers: tuple[int, ...],
      block: str,
      norm: str | None,
      *,
      rngs: nnx.Rngs,
  ):
    block_cls = {'residual': ResidualBlock, 'bottleneck': BottleneckBlock}[
        block
    ]
    self.convnormrelu = ConvNormAct(3, layers[0], 7, 2, norm=norm, rngs=rngs)
    for i, stride in enumerate((1, 2, 2)):
      cin, cout = layers[i], layers[i + 1]
      setattr(
          self,
          f'layer{i + 1}',
          nnx.List(
              [
                  block_cls(cin, cout, stride, norm=norm, rngs=rngs),
                  block_cls(cout, cout, 1, norm=norm, rngs=rngs),
              ]
          ),
      )
    self.conv = _conv(layers[3], layers[4], 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.convnormrelu(x)  # [B, H/2, W/2, C0]
    for stage in (self.layer1, self.layer2, self.layer3):
      for block in stage:
        x = block(x)
    return self.conv(x)  # [B, H/8, W/8, C]


class MotionEncoder(nnx.Module):
  """Encodes the correlation features and the current flow."""

  def __init__(self, spec: RaftSpec, *, rngs: nnx.Rngs):
    corr_in = spec.corr_levels * (2 * spec.corr_radius + 1) ** 2
    corr, flow = spec.motion_corr_layers, spec.motion_flow_layers
    self.convcorr1 = ConvNormAct(corr_in, corr[0], 1, norm=None, rngs=rngs)
    self.convcorr2 = (
        ConvNormAct(corr[0], corr[1], 3, norm=None, rngs=rngs)
        if len(corr) == 2
        else None
    )
    self.convflow1 = ConvNormAct(2, flow[0], 7, norm=None, rngs=rngs)
    self.convflow2 = ConvNormAct(flow[0], flow[1], 3, norm=None, rngs=rngs)
    self.conv = ConvNormAct(
        corr[-1] + flow[-1], spec.motion_out - 2, 3, norm=None, rngs=rngs
    )

  def __call__(self, flow: jax.Array, corr: jax.Array) -> jax.Array:
    c = self.convcorr1(corr)
    if self.convcorr2 is not None:
      c = self.convcorr2(c)
    f = self.convflow2(self.convflow1(flow))
    out = self.conv(jnp.concatenate([c, f], axis=-1))
    return jnp.concatenate([out, flow], axis=-1)  # [B, h, w, motion_out]


class ConvGRU(nnx.Module):
  """Convolutional GRU cell.

  Its input is ``[h, context, motion]`` along channels (torchvision's order).
  A convolution is linear in its input channels, so the context's share of
  each gate (the context is the same in every iteration) is computed once
  per image pair by :meth:`prepare` and added inside the loop; only
  ``[h, motion]`` is convolved per iteration. The result equals the
  convolution of the full concatenation up to float summation order.
  """

  def __init__(
      self, inputs: int, hidden: int, kernel: tuple[int, int], *, rngs: nnx.Rngs
  ):
    self.hidden = hidden
    self.convz = _conv(hidden + inputs, hidden, kernel, rngs=rngs)
    self.convr = _conv(hidden + inputs, hidden, kernel, rngs=rngs)
    self.convq = _conv(hidden + inputs, hidden, kernel, rngs=rngs)

  def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        self.convz.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )

  def prepare(self, context: jax.Array) -> dict[str, jax.Array]:
    """What every iteration reuses: the context's part of the z|r and q
    gates (with the biases) and the kernels of the ``[h, motion]`` part."""
    lo, hi = self.hidden, self.hidden + context.shape[-1]
    zr = jnp.concatenate(
        [self.convz.kernel[...], self.convr.kernel[...]], axis=-1
    )  # [kh, kw, Cin, 2 hidden]: z and r at once
    q = self.convq.kernel[...]
    rest = lambda k: jnp.concatenate([k[:, :, :lo], k[:, :, hi:]], axis=2)
    zr_bias = jnp.concatenate([self.convz.bias[...], self.convr.bias[...]])
    return {
        'zr_context': self._conv(context, zr[:, :, lo:hi]) + zr_bias,
        'q_context': self._conv(context, q[:, :, lo:hi]) + self.convq.bias[...],
        'zr_kernel': rest(zr),
        'q_kernel': rest(q),
    }

  def __call__(
      self, h: jax.Array, motion: jax.Array, prepared: dict[str, jax.Array]
  ) -> jax.Array:
    zr = (
        self._conv(jnp.concatenate([h, motion], axis=-1), prepared['zr_kernel'])
        + prepared['zr_context']
    )
    z, r = jnp.split(jax.nn.sigmoid(zr), 2, axis=-1)
    q = jnp.tanh(
        self._conv(
            jnp.concatenate([r * h, motion], axis=-1), prepared['q_kernel']
        )
        + prepared['q_context']
    )
    return (1 - z) * h + z * q


class RecurrentBlock(nnx.Module):
  """One or two ConvGRUs (large: 1x5 then 5x1; small: one 3x3)."""

  def __init__(self, inputs: int, spec: RaftSpec, *, rngs: nnx.Rngs):
    for i, kernel in enumerate(spec.gru_kernels):
      setattr(
          self,
          f'convgru{i + 1}',
          ConvGRU(inputs, spec.hidden, kernel, rngs=rngs),
      )
    self.count = len(spec.gru_kernels)

  def _grus(self) -> list[ConvGRU]:
    return [getattr(self, f'convgru{i + 1}') for i in range(self.count)]

  def prepare(self, context: jax.Array) -> list[dict[str, jax.Array]]:
    """Each GRU's iteration-invariant part (:meth:`ConvGRU.prepare`)."""
    return [gru.prepare(context) for gru in self._grus()]

  def __call__(
      self,
      h: jax.Array,
      motion: jax.Array,
      prepared: list[dict[str, jax.Array]],
  ) -> jax.Array:
    for gru, p in zip(self._grus(), prepared):
      h = gru(h, motion, p)
    return h


class FlowHead(nnx.Module):
  """3x3 conv, ReLU, 3x3 conv to the flow update."""

  def __init__(self, hidden: int, width: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(hidden, width, 3, rngs=rngs)
    self.conv2 = _conv(width, 2, 3, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.conv2(jax.nn.relu(self.conv1(h)))


class UpdateBlock(nnx.Module):
  """Motion encoder, recurrent block and flow head of one iteration."""

  def __init__(self, spec: RaftSpec, *, rngs: nnx.Rngs):
    context = spec.context_layers[-1] - spec.hidden
    self.motion_encoder = MotionEncoder(spec, rngs=rngs)
    self.recurrent_block = RecurrentBlock(
        spec.motion_out + context, spec, rngs=rngs
    )
    self.flow_head = FlowHead(spec.hidden, spec.flow_head_hidden, rngs=rngs)

  def prepare(self, context: jax.Array) -> list[dict[str, jax.Array]]:
    """The GRUs' iteration-invariant part, from the context features."""
    return self.recurrent_block.prepare(context)

  def __call__(self, hidden, prepared, corr, flow):
    motion = self.motion_encoder(flow, corr)
    hidden = self.recurrent_block(hidden, motion, prepared)
    return hidden, self.flow_head(hidden)


class MaskPredictor(nnx.Module):
  """Convex-upsampling weights: 3x3 conv-ReLU to 256, 1x1 to 8*8*9, x0.25."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.convrelu = ConvNormAct(hidden, 256, 3, norm=None, rngs=rngs)
    self.conv = _conv(256, 8 * 8 * 9, 1, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return 0.25 * self.conv(self.convrelu(h))


def convex_upsample(flow: jax.Array, mask: jax.Array) -> jax.Array:
  """x8 flow as a softmax-weighted sum of each 3x3 neighbourhood.

  Args:
    flow: [B, h, w, 2] at 1/8 resolution.
    mask: [B, h, w, 576] logits, ordered (neighbour, row, column).

  Returns:
    [B, 8h, 8w, 2], in full-resolution pixels.
  """
  b, h, w, _ = flow.shape
  weights = jax.nn.softmax(mask.reshape(b, h, w, 9, 8, 8), axis=3)
  padded = jnp.pad(8 * flow, ((0, 0), (1, 1), (1, 1), (0, 0)))
  neighbours = jnp.stack(
      [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)],
      axis=3,
  )
  up = jnp.einsum('bhwkij,bhwkc->bhiwjc', weights, neighbours)
  return up.reshape(b, 8 * h, 8 * w, 2)


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear interpolation with aligned corners."""
  src = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
  lo = np.clip(np.floor(src).astype(int), 0, max(n_in - 2, 0))
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), lo] += 1 - frac
  if n_in > 1:
    m[np.arange(n_out), lo + 1] += frac
  return m


def bilinear_upsample(flow: jax.Array) -> jax.Array:
  """x8 flow by bilinear interpolation with aligned corners (raft_small)."""
  _, h, w, _ = flow.shape
  rows = jnp.asarray(_align_corners_matrix(h, 8 * h))
  cols = jnp.asarray(_align_corners_matrix(w, 8 * w))
  return 8 * jnp.einsum(
      'Hh,bhwc,Ww->bHWc', rows, flow, cols, precision=jax.lax.Precision.HIGHEST
  )


class Raft(nnx.Module):
  """RAFT: encoders, correlation pyramid, iterated ConvGRU updates."""

  def __init__(self, spec: RaftSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.feature_encoder = FeatureEncoder(
        spec.feature_layers, spec.block, 'instance', rngs=rngs
    )
    self.context_encoder = FeatureEncoder(
        spec.context_layers, spec.block, spec.context_norm, rngs=rngs
    )
    self.update_block = UpdateBlock(spec, rngs=rngs)
    self.mask_predictor = (
        MaskPredictor(spec.hidden, rngs=rngs)
        if spec.convex_upsampling
        else None
    )

  def _upsample(self, flow: jax.Array, hidden: jax.Array) -> jax.Array:
    if self.mask_predictor is None:
      return bilinear_upsample(flow)
    return convex_upsample(flow, self.mask_predictor(hidden))

  def __call__(
      self,
      image1: jax.Array,
      image2: jax.Array,
      iterations: int,
      all_iterations: bool = False,
  ) -> jax.Array:
    """Flow from ``image1`` to ``image2``.

    Args:
      image1: [B, H, W, 3] RGB in [-1, 1]; H, W multiples of 8.
      image2: [B, H, W, 3].
      iterations: number of recurrent updates (torchvision: 12).
      all_iterations: return every iteration's flow, not only the last.

    Returns:
      [B, H, W, 2] (x, y) flow in pixels, or [iterations, B, H, W, 2].
    """
    b, h, w, _ = image1.shape
    if h % 8 or w % 8:
      raise ValueError(f'RAFT needs H and W divisible by 8, got {h}x{w}.')
    fmaps = self.feature_encoder(jnp.concatenate([image1, image2], axis=0))
    levels = correlation.pad_levels(
        correlation.pyramid(fmaps[:b], fmaps[b:], self.spec.corr_levels),
        self.spec.corr_radius,
    )
    context = self.context_encoder(image1)  # [B, h, w, Cctx]
    hidden = jnp.tanh(context[..., : self.spec.hidden])
    context = jax.nn.relu(context[..., self.spec.hidden :])
    prepared = self.update_block.prepare(context)
    ys, xs = jnp.meshgrid(
        jnp.arange(h // 8, dtype=jnp.float32),
        jnp.arange(w // 8, dtype=jnp.float32),
        indexing='ij',
    )
    coords0 = jnp.broadcast_to(jnp.stack([xs, ys], -1), (b, h // 8, w // 8, 2))

    def step(carry, _):
      hidden, coords1 = carry
      coords1 = jax.lax.stop_gradient(coords1)
      corr = correlation.lookup(levels, coords1, self.spec.corr_radius)
      hidden, delta = self.update_block(
          hidden, prepared, corr, coords1 - coords0
      )
      coords1 = coords1 + delta
      out = (
          self._upsample(coords1 - coords0, hidden) if all_iterations else None
      )
      return (hidden, coords1), out

    (hidden, coords1), flows = jax.lax.scan(
        step, (hidden, coords0), None, length=iterations
    )
    if all_iterations:
      return flows
    return self._upsample(coords1 - coords0, hidden)


def build(variant: str, seed: int = 0) -> Raft:
  """A randomly initialised model (one compiled initialisation)."""
  if variant not in VARIANTS:
    raise ValueError(
        f'Unknown RAFT variant {variant!r}; expected one of '
        f'{sorted(VARIANTS)}.'
    )
  spec = VARIANTS[variant]
  abstract = nnx.eval_shape(lambda: Raft(spec, rngs=nnx.Rngs(seed)))
  graphdef, _ = nnx.split(abstract)
  state = jax.jit(lambda: nnx.split(Raft(spec, rngs=nnx.Rngs(seed)))[1])()
  return nnx.merge(graphdef, state)


def abstract(variant: str) -> Raft:
  """The model with shape-only parameters (to be filled from weights)."""
  return nnx.eval_shape(lambda: Raft(VARIANTS[variant], rngs=nnx.Rngs(0)))
