"""Multi-resolution segmentation (HRDA) around a per-frame network.

HRDA segments an image twice with one network: a *context* pass over the
whole image downscaled (``context_scale``, 0.5), and a *detail* pass at full
resolution. A learned class-wise *scale attention* ``a = sigmoid(A(f_c))``,
computed from the context pass's encoder features by a head of its own,
decides per pixel and class how much of each to use:

  fused = up(a) * detail + up((1 - a) * context)

on the detail pass's score grid (``up``: bilinear, half-pixel centres, by
``1 / context_scale``). In training the detail pass sees one random crop
(``detail_crop``, offsets divisible by ``crop_divisible``) at the same place
for every image of the batch; the attention is zeroed outside it, so that
there the fused scores are the context's. In evaluation (and for the
teacher's pseudo-labels) the detail pass slides over the whole image in
overlapping windows (stride half the crop) whose scores are averaged.

The loss is ``(1 - w) CE(fused) + w CE(detail, labels cropped at the box)``
(``detail_loss_weight``; ``method/losses.py``). docs/method.md, "HRDA and
MIC", lists the facts and every deviation.

Arrays are NHWC; a box is ``[2]`` int32 ``(y1, x1)`` in input pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static settings of the multi-resolution model."""

  context_scale: float
  detail_crop: tuple[int, int]
  crop_divisible: int
  slide_detail: bool

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> 'Spec | None':
    """``config.model`` -> the Spec of its ``hrda`` section, or None when it
    is off (or, in a model config written before the section existed,
    absent)."""
    c = model.get('hrda')
    if c is None or not c.enabled:
      return None
    return cls(
        context_scale=float(c.context_scale),
        detail_crop=tuple(int(v) for v in c.detail_crop),
        crop_divisible=int(c.crop_divisible),
        slide_detail=bool(c.slide_detail),
    )


def context_size(hw: Sequence[int], scale: float) -> tuple[int, int]:
  """The context pass's input size (``F.interpolate(scale_factor=s)``
  floors)."""
  return int(np.floor(hw[0] * scale)), int(np.floor(hw[1] * scale))


def resize_half_pixel(x: jax.Array, hw: Sequence[int]) -> jax.Array:
  """Bilinear resize with half-pixel centres and no antialiasing (PyTorch's
  ``align_corners=False``): a 0.5 downscale averages 2x2 blocks."""
  hw = (int(hw[0]), int(hw[1]))
  if tuple(x.shape[1:3]) == hw:
    return x
  return jax.image.scale_and_translate(
      x,
      (x.shape[0], hw[0], hw[1]) + x.shape[3:],
      (1, 2),
      jnp.array([hw[0] / x.shape[1], hw[1] / x.shape[2]], jnp.float32),
      jnp.zeros((2,), jnp.float32),
      'linear',
      antialias=False,
  )


def sample_box(
    key: jax.Array,
    image_hw: Sequence[int],
    crop_hw: Sequence[int],
    divisible: int,
) -> jax.Array:
  """A random detail crop ``(y1, x1)``: offsets uniform over
  ``{0, d, 2d, ...}`` with ``offset + crop <= size`` (d = ``divisible``)."""
  k_y, k_x = jax.random.split(key)
  out = []
  for k, n, c in (
      (k_y, image_hw[0], crop_hw[0]),
      (k_x, image_hw[1], crop_hw[1]),
  ):
    choices = (max(int(n) - int(c), 0) + 1) // divisible
    if n == c or choices <= 1:
      out.append(jnp.zeros((), jnp.int32))
    else:
      out.append(jax.random.randint(k, (), 0, choices) * divisible)
  return jnp.stack(out).astype(jnp.int32)


def crop(x: jax.Array, box: jax.Array, size: Sequence[int]) -> jax.Array:
  """``x[:, y1:y1+h, x1:x1+w]`` of ``[B, H, W, ...]`` at a traced box."""
  start = (0, box[0], box[1]) + (0,) * (x.ndim - 3)
  shape = (x.shape[0], int(size[0]), int(size[1])) + x.shape[3:]
  return jax.lax.dynamic_slice(x, start, shape)


def crop_at_scale(
    x: jax.Array,
    box: jax.Array,
    crop_hw: Sequence[int],
    input_hw: Sequence[int],
) -> jax.Array:
  """The detail crop of a map on another grid than the input (labels at
  the score grid, exchange masks): ``round(crop * grid / input)`` cells
  from the cell of the box (``place``)."""
  grid = x.shape[1:3]
  size = tuple(
      max(int(round(c * g / n)), 1) for c, g, n in zip(crop_hw, grid, input_hw)
  )
  return crop(x, jnp.stack(place((box[0], box[1]), size, input_hw, grid)), size)


def footprint(
    scores: jax.Array,
    crop_hw: Sequence[int],
    input_hw: Sequence[int],
    grid_hw: Sequence[int],
) -> jax.Array:
  """A crop's scores on the cells it covers of the whole image's score grid.

  With an exact output stride (MiT: 1024 -> 256) the crop's own grid is
  that footprint already; a DeepLab ResNet's grid is one cell larger than
  ``size / 8`` (1024 -> 129), so there the crop's scores are resized
  (bilinear, half-pixel) to ``round(crop * grid / input)`` cells.
  """
  fh = int(round(crop_hw[0] * grid_hw[0] / input_hw[0]))
  fw = int(round(crop_hw[1] * grid_hw[1] / input_hw[1]))
  return resize_half_pixel(scores, (fh, fw))


def place(
    start: Sequence[Any],
    size: Sequence[int],
    input_hw: Sequence[int],
    grid_hw: Sequence[int],
) -> tuple[Any, Any]:
  """The grid cell where a crop starting at input pixel ``start`` goes
  (rounded down; moved back so that ``size`` cells fit)."""
  out = []
  for v, n, g, k in zip(start, input_hw, grid_hw, size):
    if isinstance(v, int):
      out.append(min(v * g // n, g - k))
    else:
      out.append(jnp.minimum(v * g // n, g - k))
  return tuple(out)


def slide_boxes(
    hw: Sequence[int], crop_hw: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
  """Sliding windows ``(y1, y2, x1, x2)`` covering ``hw`` (mmseg's rule:
  the last window of a row or column is moved back inside the image)."""
  h, w = int(hw[0]), int(hw[1])
  ch, cw = int(crop_hw[0]), int(crop_hw[1])
  sh, sw = int(stride[0]), int(stride[1])
  rows = max(h - ch + sh - 1, 0) // sh + 1
  cols = max(w - cw + sw - 1, 0) // sw + 1
  boxes = []
  for i in range(rows):
    for j in range(cols):
      y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
      boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
  return boxes


def slide(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    crop_hw: Sequence[int],
    grid_hw: Sequence[int],
    stride: Sequence[int] | None = None,
) -> jax.Array:
  """Scores of ``x`` ``[B, H, W, ...]`` from overlapping windows.

  The windows (``stride``, default half the crop) go through ``fn`` as one
  batch; each window's scores are added at its place on the ``grid_hw``
  score grid and the sum is divided by the number of windows covering each
  cell.
  """
  h, w = x.shape[1:3]
  stride = stride or (crop_hw[0] // 2, crop_hw[1] // 2)
  boxes = slide_boxes((h, w), crop_hw, stride)
  b = x.shape[0]
  windows = jnp.concatenate([x[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
  scores = fn(windows)  # [n * B, ch / os, cw / os, C]
  total = jnp.zeros((b, grid_hw[0], grid_hw[1], scores.shape[-1]), scores.dtype)
  count = np.zeros((grid_hw[0], grid_hw[1]), np.float32)
  for i, (y1, y2, x1, x2) in enumerate(boxes):
    part = footprint(scores[i * b : (i + 1) * b], crop_hw, (h, w), grid_hw)
    fh, fw = part.shape[1:3]
    gy, gx = place((y1, x1), (fh, fw), (h, w), grid_hw)
    # A window at the image's end covers the grid's last cells.
    gy = grid_hw[0] - fh if y2 == h else gy
    gx = grid_hw[1] - fw if x2 == w else gx
    total = total.at[:, gy : gy + fh, gx : gx + fw].add(part)
    count[gy : gy + fh, gx : gx + fw] += 1
  if (count == 0).any():
    raise ValueError(
        f'Sliding {tuple(crop_hw)} windows over {(h, w)} leave cells of the '
        f'{tuple(grid_hw)} score grid uncovered.'
    )
  return total / jnp.asarray(count)[None, :, :, None]


def fuse(
    context: jax.Array,
    attention: jax.Array,
    detail: jax.Array,
    box: jax.Array | None,
    *,
    input_hw: Sequence[int],
    crop_hw: Sequence[int],
    context_scale: float,
) -> jax.Array:
  """The scale-attention fusion of HRDA's head.

  Args:
    context: ``[B, h, w, C]`` context-pass scores.
    attention: ``[B, h, w, C or 1]`` sigmoid attention on the same grid.
    detail: ``[B, H', W', C]`` detail scores: of the crop at ``box``
      (training) or of the whole image (evaluation, ``box`` None).
    box: the detail crop ``(y1, x1)`` in input pixels, or None.
    input_hw: the input's (full-resolution) size.
    crop_hw: the detail crop's size in input pixels.
    context_scale: the context pass's downscale (0.5).

  Returns:
    ``[B, h / s, w / s, C]`` fused scores (s = ``context_scale``).
  """
  h, w = context.shape[1:3]
  grid = (int(round(h / context_scale)), int(round(w / context_scale)))
  if box is not None:
    # The attention is zero outside the detail crop (on the context grid).
    y1 = (box[0] * h) // input_hw[0]
    x1 = (box[1] * w) // input_hw[1]
    ch, cw = crop_hw[0] * h // input_hw[0], crop_hw[1] * w // input_hw[1]
    rows, cols = jnp.arange(h), jnp.arange(w)
    inside = ((rows >= y1) & (rows < y1 + ch))[:, None] & (
        (cols >= x1) & (cols < x1 + cw)
    )[None, :]
    attention = attention * inside[None, :, :, None].astype(attention.dtype)
  context = (1.0 - attention) * context
  up_context = resize_half_pixel(context, grid)
  up_attention = resize_half_pixel(attention, grid)
  if box is not None:
    detail = footprint(detail, crop_hw, input_hw, grid)
    gy, gx = place((box[0], box[1]), detail.shape[1:3], input_hw, grid)
    placed = jnp.zeros(up_context.shape, detail.dtype)
    detail = jax.lax.dynamic_update_slice(placed, detail, (0, gy, gx, 0))
  return up_attention * detail + up_context


def split_keys(key: jax.Array | None) -> dict[str, jax.Array | None]:
  """Dropout/stochastic-depth keys of one multi-resolution forward pass:
  the context pass, the detail pass and the attention head."""
  names = ('context', 'detail', 'attention')
  if key is None:
    return dict.fromkeys(names)
  return dict(zip(names, jax.random.split(key, 3)))


def combine(
    model: Any,
    spec: Spec,
    context_feats: dict[str, jax.Array],
    ctx: dict[str, jax.Array],
    detail: jax.Array,
    box: jax.Array | None,
    *,
    input_hw: Sequence[int],
    train: bool,
    attention_key: jax.Array | None,
) -> dict[str, jax.Array]:
  """Scale attention and fusion of the context head's outputs ``ctx`` with
  the detail scores.

  Returns the per-frame outputs of the model (``logits`` fused, ``aux`` the
  same array: HRDA has no auxiliary head, ``feat`` the context pass's
  pre-logit feature, ``enc`` its last encoder stage) plus ``context``,
  ``attention`` and, in training, ``detail`` and ``detail_box`` for the
  detail loss.
  """
  att = jax.nn.sigmoid(
      model.attention(
          context_feats, train=train, dropout_key=attention_key
      ).astype(jnp.float32)
  )
  fused = fuse(
      ctx['logits'],
      att,
      detail.astype(jnp.float32),
      box,
      input_hw=input_hw,
      crop_hw=spec.detail_crop,
      context_scale=spec.context_scale,
  )
  out = {
      'logits': fused,
      'aux': fused,
      'feat': ctx['feat'],
      'enc': context_feats[model.backbone.STAGES[-1]],
      'context': ctx['logits'],
      'attention': att,
  }
  if box is not None:
    out['detail'] = detail.astype(jnp.float32)
    out['detail_box'] = box
  return out


def forward(
    model: Any,
    x: jax.Array,
    *,
    train: bool,
    dropout_key: jax.Array | None,
    box: jax.Array | None,
) -> dict[str, jax.Array]:
  """One frame through the multi-resolution model.

  Args:
    model: a ``video.FlowFusionModel`` with ``hrda`` set (``encode``,
      ``heads``, ``attention``, ``_keys``).
    x: ``[B, H, W, 3]`` normalised frame.
    train: training mode: the detail pass sees the crop at ``box``;
      otherwise it slides over the image (``slide_detail``) or sees it
      whole.
    dropout_key: key for dropout and stochastic depth (training).
    box: the detail crop ``(y1, x1)`` (training).

  Returns:
    See ``combine``.
  """
  spec = model.hrda
  hw = x.shape[1:3]
  keys = split_keys(dropout_key if train else None)
  kb_c, kh_c = model._keys(keys['context'])  # pylint: disable=protected-access
  context_feats = model.encode(
      resize_half_pixel(x, context_size(hw, spec.context_scale)), train, kb_c
  )
  ctx = model.heads(context_feats, train=train, dropout_key=kh_c)
  if train:
    if box is None:
      raise ValueError('Multi-resolution training needs a detail box.')
    kb_d, kh_d = model._keys(keys['detail'])  # pylint: disable=protected-access
    detail = model.heads(
        model.encode(crop(x, box, spec.detail_crop), train, kb_d),
        train=train,
        dropout_key=kh_d,
    )['logits']
  else:
    box = None
    whole = lambda w: model.heads(
        model.encode(w, False, None), train=False, dropout_key=None
    )['logits']
    if spec.slide_detail:
      grid = tuple(
          int(round(g / spec.context_scale)) for g in ctx['logits'].shape[1:3]
      )
      detail = slide(whole, x, spec.detail_crop, grid)
    else:
      detail = whole(x)
  return combine(
      model,
      spec,
      context_feats,
      ctx,
      detail,
      box,
      input_hw=hw,
      train=train,
      attention_key=keys['attention'],
  )
