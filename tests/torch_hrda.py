"""HRDA's multi-resolution head and encoder-decoder in PyTorch, restated.

The reference of the HRDA parity tests (``tests/test_hrda.py``), written
from the published formulas: scales (0.5, 1); the context scores
``(1 - a) * s_c`` and the attention ``a = sigmoid(A(f_c))`` are upsampled
by 2 (bilinear, ``align_corners=False``); the detail scores sit at their
crop (training) or are the average of overlapping sliding windows (stride
half the crop; evaluation); ``fused = up(a) * s_d + up((1 - a) * s_c)``;
in training ``a`` is zero outside the crop. The loss is ``(1 - w) CE(fused)
+ w CE(detail, labels cropped)`` with ``w = 0.1``, the scores resized
(bilinear, ``align_corners=False``) to the labels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Scores = Callable[[torch.Tensor], torch.Tensor]


def up2(x: torch.Tensor) -> torch.Tensor:
  return F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False)


def fuse(
    lr: torch.Tensor,
    att: torch.Tensor,
    hr: torch.Tensor,
    box: Sequence[int] | None,
    os: int,
) -> torch.Tensor:
  """``box``: ``(y1, y2, x1, x2)`` of the detail crop in input pixels."""
  if box is not None:
    mask = torch.zeros_like(lr[:, :1])
    s = os * 2  # input pixels per context cell
    y1, y2, x1, x2 = (v // s for v in box)
    mask[:, :, y1:y2, x1:x2] = 1
    att = att * mask
  up_lr = up2((1 - att) * lr)
  up_att = up2(att)
  if box is not None:
    placed = torch.zeros_like(up_lr)
    y1, y2, x1, x2 = (v // os for v in box)
    placed[:, :, y1:y2, x1:x2] = hr
    hr = placed
  return up_att * hr + up_lr


def slide_scores(
    scores: Scores, img: torch.Tensor, crop: Sequence[int], os: int
) -> torch.Tensor:
  """Detail scores of the whole image from overlapping windows."""
  b, _, h, w = img.shape
  ch, cw = crop
  sh, sw = ch // 2, cw // 2
  rows = max(h - ch + sh - 1, 0) // sh + 1
  cols = max(w - cw + sw - 1, 0) // sw + 1
  total, count = None, torch.zeros((1, 1, h // os, w // os))
  for i in range(rows):
    for j in range(cols):
      y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
      y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
      s = scores(img[:, :, y1:y2, x1:x2])
      if total is None:
        total = torch.zeros((b, s.shape[1], h // os, w // os))
      total[:, :, y1 // os : y2 // os, x1 // os : x2 // os] += s
      count[:, :, y1 // os : y2 // os, x1 // os : x2 // os] += 1
  return total / count


def half(img: torch.Tensor) -> torch.Tensor:
  return F.interpolate(
      img, scale_factor=0.5, mode='bilinear', align_corners=False
  )


def encode_decode(
    scores: Scores,
    attention: Scores,
    img: torch.Tensor,
    crop: Sequence[int],
    os: int,
) -> torch.Tensor:
  """Evaluation: the fused scores at the detail grid (stride ``os``)."""
  lr_img = half(img)
  hr = slide_scores(scores, img, crop, os)
  return fuse(scores(lr_img), torch.sigmoid(attention(lr_img)), hr, None, os)


def train_forward(
    scores: Scores,
    attention: Scores,
    img: torch.Tensor,
    box: Sequence[int],
    os: int,
) -> tuple[torch.Tensor, torch.Tensor]:
  """Training with the detail crop ``box``: (fused, detail) scores."""
  y1, y2, x1, x2 = box
  lr_img = half(img)
  hr = scores(img[:, :, y1:y2, x1:x2])
  fused = fuse(scores(lr_img), torch.sigmoid(attention(lr_img)), hr, box, os)
  return fused, hr


def loss(
    fused: torch.Tensor,
    detail: torch.Tensor,
    label: torch.Tensor,
    box: Sequence[int],
    weight: float = 0.1,
) -> torch.Tensor:
  """HRDA's loss on labels ``[B, H, W]`` (ignore 255)."""

  def ce(s, lab):
    s = F.interpolate(s, lab.shape[1:], mode='bilinear', align_corners=False)
    return F.cross_entropy(s, lab, ignore_index=255)

  y1, y2, x1, x2 = box
  return (1 - weight) * ce(fused, label) + weight * ce(
      detail, label[:, y1:y2, x1:x2]
  )
