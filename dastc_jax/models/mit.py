"""Mix Transformer (MiT, the SegFormer encoder), B0-B5, in Flax NNX.

Four stages, each an overlapping patch embedding (a strided conv: 7x7/4,
then 3x3/2 three times; LayerNorm eps 1e-5), blocks of efficient
self-attention (keys and values from a ``sr x sr``-strided conv of the map
plus LayerNorm eps 1e-5 when ``sr > 1``) and a Mix-FFN (fc1, 3x3 depthwise
conv, exact GELU, fc2) with pre-LayerNorms (eps 1e-6), and a stage
LayerNorm (eps 1e-6). Stochastic depth rises linearly over all blocks.
Module names follow the mmseg/SegFormer ``mix_transformer.py`` state dict
(``patch_embed1.proj``, ``block1.0.attn.kv``, ``block1.0.mlp.dwconv.dwconv``,
``norm1``, ...), so ImageNet ``mit_b*.pth`` files convert key by key.
Arrays are NHWC; any H, W (non-square inputs included).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dastc_jax.models import layers
from dastc_jax.models import scan
from dastc_jax.ops import image as image_ops


@dataclasses.dataclass(frozen=True)
class MiTSpec:
  """Sizes of one MiT variant."""

  dims: tuple[int, int, int, int]
  depths: tuple[int, int, int, int]
  heads: tuple[int, int, int, int] = (1, 2, 5, 8)
  sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
  mlp_ratio: int = 4


_WIDE = (64, 128, 320, 512)
VARIANTS = {
    # A test-size MiT of the same structure (the :smoke configs on CPU).
    'tiny': MiTSpec((16, 32, 40, 64), (1, 1, 1, 1)),
    'b0': MiTSpec((32, 64, 160, 256), (2, 2, 2, 2)),
    'b1': MiTSpec(_WIDE, (2, 2, 2, 2)),
    'b2': MiTSpec(_WIDE, (3, 4, 6, 3)),
    'b3': MiTSpec(_WIDE, (3, 4, 18, 3)),
    'b4': MiTSpec(_WIDE, (3, 8, 27, 3)),
    'b5': MiTSpec(_WIDE, (3, 6, 40, 3)),
}
EMBED_EPS = 1e-5  # patch-embedding and spatial-reduction LayerNorms
BLOCK_EPS = 1e-6  # block and stage LayerNorms


# Initialisation as mmseg's MiT: Linear N(0, 0.02^2) (timm's truncation at
# +-2 never bites at that std), LayerNorm 1 / 0, conv N(0, 2 / fan_out) with
# fan_out = k * k * cout / groups, zero biases. Drawn on the host
# (layers._host_normal): no compile per parameter shape.


def _conv(
    cin: int,
    cout: int,
    kernel: int,
    stride: int,
    pad: int,
    *,
    dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  return nnx.Conv(
      cin,
      cout,
      (kernel, kernel),
      strides=stride,
      padding=((pad, pad), (pad, pad)),
      use_bias=True,
      kernel_init=layers.group_fan_out_normal(),
      bias_init=layers.zeros(),
      dtype=dtype,
      rngs=rngs,
  )


def _linear(cin: int, cout: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      cin,
      cout,
      kernel_init=layers.normal(0.02),
      bias_init=layers.zeros(),
      dtype=dtype,
      rngs=rngs,
  )


def _layer_norm(
    dim: int, eps: float, *, dtype, rngs: nnx.Rngs
) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      dim,
      epsilon=eps,
      scale_init=layers.ones(),
      bias_init=layers.zeros(),
      dtype=dtype,
      rngs=rngs,
  )


class OverlapPatchEmbed(nnx.Module):
  """Strided conv (kernel > stride, so patches overlap) and LayerNorm."""

  def __init__(
      self,
      cin: int,
      dim: int,
      kernel: int,
      stride: int,
      *,
      eps: float,
      dtype,
      rngs: nnx.Rngs,
  ):
    self.proj = _conv(
        cin, dim, kernel, stride, kernel // 2, dtype=dtype, rngs=rngs
    )
    self.norm = _layer_norm(dim, eps, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.proj(x))  # [B, H/s, W/s, D]


def _patch_conv(conv: nnx.Conv, x: jax.Array, s: int) -> jax.Array:
  """``conv`` (kernel s x s, stride s, no padding) as one matmul over
  non-overlapping s x s patches: the same values, and a forward and backward
  pass of plain matmuls (XLA:CPU's convolution kernel gradient took 5% of
  the MiT-B5 step; docs/performance.md). Rows and columns past the last
  whole patch are dropped, as the strided convolution drops them."""
  b, h, w, c = x.shape
  hs, ws = h // s, w // s
  dtype = conv.dtype or x.dtype
  kernel = conv.kernel[...].astype(dtype)  # [s, s, C, D]
  x = x[:, : hs * s, : ws * s].astype(dtype)
  patches = x.reshape(b, hs, s, ws, s, c).transpose(0, 1, 3, 2, 4, 5)
  out = patches.reshape(b, hs, ws, s * s * c) @ kernel.reshape(s * s * c, -1)
  return out + conv.bias[...].astype(dtype)  # [B, H/s, W/s, D]


class Attention(nnx.Module):
  """Multi-head attention whose keys/values come from a reduced map."""

  def __init__(
      self, dim: int, heads: int, sr: int, *, eps: float, dtype, rngs: nnx.Rngs
  ):
    self.heads = heads
    self.q = _linear(dim, dim, dtype=dtype, rngs=rngs)
    self.kv = _linear(dim, 2 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
    self.sr_ratio = sr
    if sr > 1:
      self.sr = _conv(dim, dim, sr, sr, 0, dtype=dtype, rngs=rngs)
      self.norm = _layer_norm(dim, eps, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    d = c // self.heads
    q = self.q(x).reshape(b, h * w, self.heads, d)
    y = x
    if self.sr_ratio > 1:
      y = self.norm(_patch_conv(self.sr, x, self.sr_ratio))  # [B, h, w, C]
    m = y.shape[1] * y.shape[2]
    kv = self.kv(y).reshape(b, m, 2, self.heads, d)  # first C: keys
    logits = jnp.einsum('bnhd,bmhd->bhnm', q, kv[:, :, 0]) * d**-0.5
    att = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum('bhnm,bmhd->bnhd', att, kv[:, :, 1])
    return self.proj(out.reshape(b, h, w, c))


class DWConv(nnx.Module):
  """3x3 depthwise conv with bias (mmseg's ``mlp.dwconv.dwconv``)."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.dwconv = layers.DepthwiseConv(
        dim,
        3,
        use_bias=True,
        kernel_init=layers.group_fan_out_normal(dim),
        dtype=dtype,
        rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.dwconv(x)


class MixFFN(nnx.Module):
  """fc1 -> 3x3 depthwise conv -> GELU (exact) -> fc2."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.dwconv = DWConv(hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(layers.gelu(self.dwconv(self.fc1(x))))


def drop_path(
    x: jax.Array, rate: float | jax.Array, key: jax.Array | None
) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per example (``rate``
  may be traced, as inside a scan over blocks)."""
  if key is None or (isinstance(rate, float) and rate == 0.0):
    return x
  keep = jax.random.bernoulli(
      key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1)
  )
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block: attention and Mix-FFN, each residual."""

  def __init__(
      self,
      dim: int,
      heads: int,
      sr: int,
      mlp_ratio: int,
      drop_path_rate: float,
      *,
      dtype,
      rngs: nnx.Rngs,
  ):
    self.norm1 = _layer_norm(dim, BLOCK_EPS, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, heads, sr, eps=EMBED_EPS, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, BLOCK_EPS, dtype=dtype, rngs=rngs)
    self.mlp = MixFFN(dim, dim * mlp_ratio, dtype=dtype, rngs=rngs)
    self.drop_path_rate = drop_path_rate

  def __call__(
      self, x: jax.Array, key: jax.Array | None, rate: jax.Array | None = None
  ) -> jax.Array:
    """``rate`` replaces ``drop_path_rate`` (a scan passes each block's)."""
    rate = self.drop_path_rate if rate is None else rate
    k1 = k2 = None
    if key is not None:
      k1, k2 = jax.random.split(key)
    x = x + drop_path(self.attn(self.norm1(x)), rate, k1)
    return x + drop_path(self.mlp(self.norm2(x)), rate, k2)


IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)


def imagenet_from_caffe(x: jax.Array) -> jax.Array:
  """BGR minus the Caffe mean -> RGB with ImageNet mean/std (mmseg's
  ``img_norm_cfg``)."""
  rgb = (x + jnp.asarray(image_ops.BGR_MEAN, x.dtype))[..., ::-1]
  return (rgb - jnp.asarray(IMAGENET_MEAN_RGB, x.dtype)) / jnp.asarray(
      IMAGENET_STD_RGB, x.dtype
  )


def drop_path_rates(depths: tuple[int, ...], rate: float) -> list[float]:
  """Stochastic-depth rate of every block: 0 to ``rate``, linearly over all
  blocks of all stages."""
  total = sum(depths)
  return [rate * i / max(total - 1, 1) for i in range(total)]


@nnx.remat
def _remat_block(
    block: Block, x: jax.Array, key: jax.Array | None
) -> jax.Array:
  return block(x, key)


class MiT(nnx.Module):
  """The MiT encoder: four stages at strides 4, 8, 16, 32."""

  STAGES = ('c1', 'c2', 'c3', 'c4')

  def __init__(
      self,
      spec: MiTSpec,
      *,
      drop_path_rate: float = 0.1,
      caffe_input: bool = False,
      remat: bool = False,
      scan_blocks: bool = False,
      scan_recompute: bool = True,
      scan_min_blocks: int = 2,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    rates = drop_path_rates(spec.depths, drop_path_rate)
    # True: inputs come as this project's frames (BGR minus the Caffe mean,
    # ops/image.py) and are brought to the ImageNet normalisation that MiT
    # weights are trained with (RGB, mean/std in 0-255 units).
    self.caffe_input = caffe_input
    # Recompute each block's activations in the backward pass instead of
    # keeping them (memory for compute; same values).
    self.remat = remat
    # Run each stage's blocks as one scan (models/scan.py), recomputing its
    # body in the backward pass or not.
    self.scan_blocks = scan_blocks
    self.scan_recompute = scan_recompute
    self.scan_min_blocks = scan_min_blocks
    self.out_features = dict(zip(self.STAGES, spec.dims))
    cin, k = 3, 0
    for i, (dim, depth) in enumerate(zip(spec.dims, spec.depths)):
      kernel, stride = (7, 4) if i == 0 else (3, 2)
      setattr(
          self,
          f'patch_embed{i + 1}',
          OverlapPatchEmbed(
              cin, dim, kernel, stride, eps=EMBED_EPS, dtype=dtype, rngs=rngs
          ),
      )
      setattr(
          self,
          f'block{i + 1}',
          nnx.List(
              [
                  Block(
                      dim,
                      spec.heads[i],
                      spec.sr_ratios[i],
                      spec.mlp_ratio,
                      rates[k + j],
                      dtype=dtype,
                      rngs=rngs,
                  )
                  for j in range(depth)
              ]
          ),
      )
      setattr(
          self,
          f'norm{i + 1}',
          _layer_norm(dim, BLOCK_EPS, dtype=dtype, rngs=rngs),
      )
      cin, k = dim, k + depth

  def __call__(
      self,
      x: jax.Array,
      train: bool = False,
      *,
      rng: jax.Array | None = None,
      first: str = 'c1',
      last: str = 'c4',
  ) -> dict[str, jax.Array]:
    """Runs the stages ``first..last`` (``x`` is the input of ``first``).

    Args:
      x: ``[B, H, W, 3]`` image (or the previous stage's map).
      train: unused (no BatchNorm); stochastic depth follows ``rng``.
      rng: turns stochastic depth on (training); split into one key per
        block of the whole network, so partial runs never share a key.
      first: first stage to run.
      last: last stage to run.

    Returns:
      ``{stage: [B, H/s, W/s, D_s]}`` for the stages that ran.
    """
    out = {}
    depths = [len(getattr(self, f'block{i + 1}')) for i in range(4)]
    key_array = jax.random.split(rng, sum(depths)) if rng is not None else None
    keys = list(key_array) if rng is not None else [None] * sum(depths)
    lo, hi = self.STAGES.index(first), self.STAGES.index(last)
    if lo == 0 and self.caffe_input:
      x = imagenet_from_caffe(x)
    for i in range(lo, hi + 1):
      x = getattr(self, f'patch_embed{i + 1}')(x)
      offset = sum(depths[:i])
      blocks = getattr(self, f'block{i + 1}')
      if self.scan_blocks and len(blocks) >= self.scan_min_blocks:
        per_block = (
            None if rng is None else key_array[offset : offset + len(blocks)],
            jnp.asarray([b.drop_path_rate for b in blocks], jnp.float32),
        )
        x = scan.scan_blocks(
            list(blocks),
            x,
            lambda b, h, kr: b(h, kr[0], rate=kr[1]),
            per_block,
            recompute=self.scan_recompute,
        )
      else:
        for j, block in enumerate(blocks):
          x = (
              _remat_block(block, x, keys[offset + j])
              if self.remat
              else block(x, keys[offset + j])
          )
      x = getattr(self, f'norm{i + 1}')(x)
      out[self.STAGES[i]] = x
    return out
