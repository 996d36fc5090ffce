"""Flow-guided score fusion of two frames (ACCEL), shared by the video models.

A subclass supplies ``backbone`` (``(x, train, *, first, last, rng) ->
{stage: map}`` with a ``STAGES`` tuple), ``heads`` (stage maps -> ``logits``,
``aux``, ``feat``), ``clip_length`` (2, or 1 for the image domain),
``sf_layer`` (2C -> C, initialised [I | 0]) and ``per_axis_flow_scale``.
Both frames of a clip go through the same network: the current frame t with
gradients, the key frame t-1 under ``stop_gradient``. The key-frame scores
are warped to frame t with the flow t->t-1 and fused with the current scores
by ``sf_layer``, so at initialisation the fused output equals the
current-frame scores.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dastc_jax.models import hrda
from dastc_jax.models import layers
from dastc_jax.ops import warp as warp_ops

# The single-frame (image-domain) models; every other model reads clips.
IMAGE_MODELS = ('deeplabv2', 'daformer')


def clip_length(name: str) -> int:
  """Frames per clip model ``name`` consumes: 1 (image domain) or 2."""
  return 1 if name in IMAGE_MODELS else 2


class FlowFusionModel(nnx.Module):
  """The frame-pair forward passes around a per-frame network."""

  backbone: Any
  clip_length: int
  # Whether the backbone takes a PRNG key in training (stochastic depth).
  backbone_rng: bool = False
  # The multi-resolution (HRDA) settings, or None for one resolution; a
  # subclass that sets them also builds ``scale_attention``.
  hrda: hrda.Spec | None = None

  @staticmethod
  def fusion_layer(num_classes: int, *, dtype, rngs: nnx.Rngs) -> layers.Conv:
    """``sf_layer``: the bias-free 2C -> C 1x1 conv, initialised [I | 0] so
    that the fused scores start as the current frame's."""
    return layers.Conv(
        2 * num_classes,
        num_classes,
        1,
        kernel_init=layers.identity_fusion_init(num_classes),
        dtype=dtype,
        rngs=rngs,
    )

  def _keys(
      self, key: jax.Array | None
  ) -> tuple[jax.Array | None, jax.Array | None]:
    """(backbone key, head key) from one dropout key."""
    if key is None or not self.backbone_rng:
      return None, key
    k_backbone, k_head = jax.random.split(key)
    return k_backbone, k_head

  def encode(
      self, x: jax.Array, train: bool, key: jax.Array | None
  ) -> dict[str, jax.Array]:
    """The backbone's stage maps of ``x`` (``key``: stochastic depth)."""
    if self.backbone_rng:
      return self.backbone(x, train, rng=key)
    return self.backbone(x, train)

  def attention(
      self,
      feats: dict[str, jax.Array],
      *,
      train: bool,
      dropout_key: jax.Array | None,
  ) -> jax.Array:
    """The scale-attention logits of a context pass (HRDA models; the
    subclasses that build ``scale_attention`` override this)."""
    raise TypeError(
        f'{type(self).__name__} has no scale attention (config.model.hrda '
        'is off).'
    )

  def sample_detail_box(
      self, key: jax.Array | None, hw: tuple[int, int]
  ) -> jax.Array:
    """The training detail crop of a multi-resolution model (``key``
    required)."""
    if key is None:
      raise ValueError('Multi-resolution training needs a PRNG key.')
    spec = self.hrda
    return hrda.sample_box(key, hw, spec.detail_crop, spec.crop_divisible)

  def single_frame(
      self,
      x: jax.Array,
      *,
      train: bool,
      dropout_key: jax.Array | None,
      detail_box: jax.Array | None = None,
  ) -> dict[str, jax.Array]:
    """Per-frame network: logits, aux logits and the pre-logit feature.

    Args:
      x: ``[B, H, W, 3]`` normalised BGR frame.
      train: batch-statistics BN and dropout when True.
      dropout_key: key for Dropout2d (unused at eval).
      detail_box: the detail crop of a multi-resolution model in training.

    Returns:
      dict with ``logits``/``aux`` ``[B, h, w, C]`` and ``feat``
      ``[B, h, w, F]`` at the output stride, ``enc`` the backbone's last
      stage (the context pass's for multi-resolution models, which add the
      entries of ``hrda.combine``).
    """
    if self.hrda is not None:
      return hrda.forward(
          self, x, train=train, dropout_key=dropout_key, box=detail_box
      )
    k_backbone, k_head = self._keys(dropout_key if train else None)
    feats = self.encode(x, train, k_backbone)
    out = self.heads(feats, train=train, dropout_key=k_head)
    return {**out, 'enc': feats[self.backbone.STAGES[-1]]}

  def reference_encoding(self, x: jax.Array) -> jax.Array:
    """The backbone's last stage of ``x`` ``[B, H, W, 3]`` in evaluation
    mode, at the context scale for a multi-resolution model: what the
    feature distance compares the student's ``enc`` with."""
    if self.hrda is not None:
      x = hrda.resize_half_pixel(
          x, hrda.context_size(x.shape[1:3], self.hrda.context_scale)
      )
    return self.encode(x, False, None)[self.backbone.STAGES[-1]]

  def fuse(
      self,
      cur: jax.Array,
      key: jax.Array,
      flow: jax.Array,
      *,
      out_size: tuple[int, int] | None = None,
      lt_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Warps key-frame scores to frame t and fuses them with ``cur``.

    Args:
      cur: ``[B, h, w, C]`` current-frame scores.
      key: ``[B, h, w, C]`` key-frame scores.
      flow: ``[B, H, W, 2]`` flow t->t-1 on any grid; it is resized to the
        fusion grid with magnitude rescaling (docs/reference_code.md, "Optical
        flow").
      out_size: fuse at this size (scores upsampled first, align corners);
        None fuses at the score resolution.
      lt_mask: ``[B, H', W']`` long-tail paste mask at ``out_size``: there
        the warped key-frame scores are replaced by the current ones (the
        pasted patches are static, docs/reference_code.md, "Models").

    Returns:
      Fused scores at the fusion grid.
    """
    if out_size is not None:
      cur = warp_ops.resize_bilinear(cur, out_size)
      key = warp_ops.resize_bilinear(key, out_size)
    flow = warp_ops.resize_flow(
        flow.astype(jnp.float32), cur.shape[1:3], self.per_axis_flow_scale
    )
    warped = warp_ops.warp(key, flow)
    if lt_mask is not None:
      m = lt_mask[..., None].astype(warped.dtype)
      warped = warped * (1.0 - m) + cur * m
    fused = self.sf_layer(jnp.concatenate([cur, warped], axis=-1))
    return fused.astype(jnp.float32)

  def _outputs(self, cur, key, flow, out_size, lt_mask):
    # The multi-resolution model's detail scores and box (detail loss).
    extra = {k: cur[k] for k in ('detail', 'detail_box', 'enc') if k in cur}
    if key is None:  # single frame: the scores are the current frame's
      up = (
          (lambda x: warp_ops.resize_bilinear(x, out_size))
          if out_size
          else (lambda x: x)
      )
      return {
          'pred': up(cur['logits']),
          'pred_aux': up(cur['aux']),
          'logits': cur['logits'],
          'aux': cur['aux'],
          'feat': cur['feat'],
          **extra,
      }
    key = jax.lax.stop_gradient(key)
    return {
        'pred': self.fuse(
            cur['logits'],
            key['logits'],
            flow,
            out_size=out_size,
            lt_mask=lt_mask,
        ),
        'pred_aux': self.fuse(
            cur['aux'], key['aux'], flow, out_size=out_size, lt_mask=lt_mask
        ),
        'logits': cur['logits'],
        'aux': cur['aux'],
        'feat': cur['feat'],
        'key_logits': key['logits'],
        'key_aux': key['aux'],
        'key_feat': key['feat'],
        **extra,
    }

  def __call__(
      self,
      frame_cur: jax.Array,
      frame_key: jax.Array | None,
      flow: jax.Array | None,
      *,
      train: bool,
      rng: jax.Array | None = None,
      fuse_at_input: bool = False,
      lt_mask: jax.Array | None = None,
  ) -> dict[str, Any]:
    """Two-frame forward pass.

    Args:
      frame_cur: ``[B, H, W, 3]`` normalised frame t.
      frame_key: ``[B, H, W, 3]`` normalised key frame t-1 (None for
        ``deeplabv2``).
      flow: ``[B, H, W, 2]`` flow t->t-1 (pixels of its own grid; None for
        ``deeplabv2``).
      train: training mode (batch-stat BN, dropout).
      rng: dropout key; required when ``train`` and dropout > 0.
      fuse_at_input: fuse at the input resolution (the fusion clips).
      lt_mask: ``[B, H, W]`` long-tail mask (with ``fuse_at_input``).

    Returns:
      dict: ``pred``/``pred_aux`` fused scores (``[B, h, w, C]``, or
      ``[B, H, W, C]`` with ``fuse_at_input``), the current frame's
      ``logits``/``aux``/``feat`` and the key frame's
      ``key_logits``/``key_aux``/``key_feat`` (gradient-free).
    """
    k_cur = k_key = None
    box = None
    if train and self.hrda is not None:
      # One detail crop, at the same place in every frame of the clip.
      rng, k_box = jax.random.split(rng) if rng is not None else (None, None)
      box = self.sample_detail_box(k_box, frame_cur.shape[1:3])
    if train and rng is not None:
      k_cur, k_key = jax.random.split(rng)
    cur = self.single_frame(
        frame_cur, train=train, dropout_key=k_cur, detail_box=box
    )
    key = None
    if self.clip_length == 2:
      key = self.single_frame(
          frame_key, train=train, dropout_key=k_key, detail_box=box
      )
    out_size = frame_cur.shape[1:3] if fuse_at_input else None
    return self._outputs(cur, key, flow, out_size, lt_mask)

  def clip(
      self,
      frames: jax.Array,
      flow: jax.Array | None,
      *,
      train: bool,
      rng: jax.Array | None = None,
      **kw,
  ) -> dict[str, Any]:
    """Forward of a clip ``[B, T, H, W, 3]`` (t, t-1, ...; T >= clip
    length) with its flow t->t-1 (None for ``deeplabv2``)."""
    if self.clip_length == 1:
      return self(frames[:, 0], None, None, train=train, rng=rng, **kw)
    return self(frames[:, 0], frames[:, 1], flow, train=train, rng=rng, **kw)

  def mixed_pair(
      self,
      clip_s: tuple[jax.Array, ...],
      clip_t: tuple[jax.Array, ...],
      masks: jax.Array,
      *,
      layer: str | None,
      mix_fn: Callable[..., Any] | None,
      train: bool,
      rng: jax.Array | None,
      lt_mask: jax.Array | None,
  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Forwards the source- and target-context clips, mixing their shallow
    features after ``layer`` inside ``masks`` (shallow-feature fusion).

    Args:
      clip_s: ``(cur, key, flow)`` of the source-context clip (``(cur,)``
        for ``deeplabv2``).
      clip_t: ``(cur, key, flow)`` of the target-context clip.
      masks: a pytree of ``[B, T, H, W]`` masks (frame t, and frame t-1);
        ``mix_fn`` receives frame f's slice ``[:, f]`` of every leaf.
      layer: backbone stage after which features are mixed (``stem``,
        ``layer1``, ...); None disables the feature-level fusion.
      mix_fn: ``(feat_s, feat_t, masks_f) -> (feat_s, feat_t, info)``;
        ``info`` is a dict of scalars, returned per frame in the source
        clip's output under ``mix_info`` (``{name}_f{f}``).
      train: training mode.
      rng: dropout key.
      lt_mask: ``[B, H, W]`` long-tail mask for the score swap.

    Returns:
      The two clips' outputs, fused at the input resolution.
    """
    n_keys = 4 if self.hrda is None else 5
    keys = (
        list(jax.random.split(rng, n_keys))
        if train and rng is not None
        else [None] * n_keys
    )
    box = None
    if self.hrda is not None:
      # One detail crop for both clips: the exchange is at the same pixels.
      box = self.sample_detail_box(keys[4], clip_s[0].shape[1:3])
    frames = []
    info = {}
    for f in range(self.clip_length):
      xs, xt = clip_s[f], clip_t[f]
      masks_f = jax.tree.map(lambda m: m[:, f], masks)
      if self.hrda is not None:
        out_s, out_t, frame_info = self._mixed_frame_hrda(
            xs, xt, masks_f, box, keys[2 * f], keys[2 * f + 1], layer, mix_fn
        )
        info.update({f'{k}_f{f}': v for k, v in frame_info.items()})
        frames.append((out_s, out_t))
        continue
      kb_s, kh_s = self._keys(keys[2 * f])
      kb_t, kh_t = self._keys(keys[2 * f + 1])
      fs, ft, frame_info = self._exchange(
          xs, xt, masks_f, kb_s, kb_t, layer, mix_fn, train
      )
      info.update({f'{k}_f{f}': v for k, v in frame_info.items()})
      frames.append(
          (
              self.heads(fs, train=train, dropout_key=kh_s),
              self.heads(ft, train=train, dropout_key=kh_t),
          )
      )
    (cur_s, cur_t), (key_s, key_t) = (
        frames if self.clip_length == 2 else (frames[0], (None, None))
    )
    size = clip_s[0].shape[1:3]
    flow_s = clip_s[2] if self.clip_length == 2 else None
    flow_t = clip_t[2] if self.clip_length == 2 else None
    out_s = self._outputs(cur_s, key_s, flow_s, size, lt_mask)
    out_s['mix_info'] = info
    return out_s, self._outputs(cur_t, key_t, flow_t, size, lt_mask)

  def _exchange(self, xs, xt, masks_f, kb_s, kb_t, layer, mix_fn, train):
    """Both clips' stage maps of one frame, with their shallow features
    exchanged after ``layer`` (None: no exchange). Returns ``(feats_s,
    feats_t, info)``."""
    if layer is None:
      return self.encode(xs, train, kb_s), self.encode(xt, train, kb_t), {}
    net_s = functools.partial(self.encode_part, train=train, key=kb_s)
    net_t = functools.partial(self.encode_part, train=train, key=kb_t)
    s1 = net_s(xs, last=layer)
    t1 = net_t(xt, last=layer)
    ms, mt, info = mix_fn(s1[layer], t1[layer], masks_f)
    stages = self.backbone.STAGES
    nxt = stages[stages.index(layer) + 1]
    # The mixed feature replaces the stage output (an aux head on it sees
    # the mixed feature too).
    fs = {**s1, layer: ms, **net_s(ms, first=nxt)}
    ft = {**t1, layer: mt, **net_t(mt, first=nxt)}
    return fs, ft, info

  def encode_part(self, x, *, train, key, first=None, last=None):
    """The backbone's stages from ``first`` to ``last`` (None: the ends)."""
    kw = {}
    if first is not None:
      kw['first'] = first
    if last is not None:
      kw['last'] = last
    if self.backbone_rng:
      return self.backbone(x, train, rng=key, **kw)
    return self.backbone(x, train, **kw)

  def _mixed_frame_hrda(self, xs, xt, masks_f, box, key_s, key_t, layer, mix):
    """One frame of both fused clips through the multi-resolution model:
    the exchange runs in the context pass (masks at any grid) and in the
    detail pass (masks cropped at the detail box)."""
    spec = self.hrda
    hw = xs.shape[1:3]
    k_s, k_t = hrda.split_keys(key_s), hrda.split_keys(key_t)
    kb_cs, kh_cs = self._keys(k_s['context'])
    kb_ct, kh_ct = self._keys(k_t['context'])
    kb_ds, kh_ds = self._keys(k_s['detail'])
    kb_dt, kh_dt = self._keys(k_t['detail'])
    small = hrda.context_size(hw, spec.context_scale)
    fc_s, fc_t, info = self._exchange(
        hrda.resize_half_pixel(xs, small),
        hrda.resize_half_pixel(xt, small),
        masks_f,
        kb_cs,
        kb_ct,
        layer,
        mix,
        True,
    )
    # The spatial masks ([B, H, W]) at the detail crop; other leaves (the
    # exchanged class ids) are per clip.
    crop_masks = jax.tree.map(
        lambda m: (
            hrda.crop_at_scale(m, box, spec.detail_crop, hw)
            if m.ndim >= 3
            else m
        ),
        masks_f,
    )
    fd_s, fd_t, _ = self._exchange(
        hrda.crop(xs, box, spec.detail_crop),
        hrda.crop(xt, box, spec.detail_crop),
        crop_masks,
        kb_ds,
        kb_dt,
        layer,
        mix,
        True,
    )
    outs = []
    for fc, fd, kh_c, kh_d, k in (
        (fc_s, fd_s, kh_cs, kh_ds, k_s),
        (fc_t, fd_t, kh_ct, kh_dt, k_t),
    ):
      ctx = self.heads(fc, train=True, dropout_key=kh_c)
      detail = self.heads(fd, train=True, dropout_key=kh_d)['logits']
      outs.append(
          hrda.combine(
              self,
              spec,
              fc,
              ctx,
              detail,
              box,
              input_hw=hw,
              train=True,
              attention_key=k['attention'],
          )
      )
    return outs[0], outs[1], info
