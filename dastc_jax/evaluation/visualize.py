"""Coloured prediction overlays (Cityscapes palette), written as PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dastc_jax import paths


def colorize(ids: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """``[H, W]`` train ids -> ``[H, W, 3]`` uint8 colours (255 -> black)."""
  return palette[np.asarray(ids, np.uint8)]


def overlay_panel(
    frame: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    palette: np.ndarray,
    alpha: float = 0.5,
) -> np.ndarray:
  """Frame with the prediction blended in | ground truth | prediction.

  Args:
    frame: ``[h, w, 3]`` uint8 RGB (any size; resized to the label size).
    label: ``[H, W]`` ground-truth train ids.
    pred: ``[H, W]`` predicted train ids.
    palette: ``[256, 3]`` colours.
    alpha: blend weight of the prediction colours.

  Returns:
    ``[H, 3W, 3]`` uint8 image.
  """
  h, w = label.shape
  if frame.shape[:2] != (h, w):
    frame = np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR))
  pc = colorize(pred, palette)
  blend = (frame * (1 - alpha) + pc * alpha).astype(np.uint8)
  return np.concatenate([blend, colorize(label, palette), pc], axis=1)


def save_png(path: paths.PathLike, image: np.ndarray) -> None:
  """Writes ``image`` as a PNG, atomically (``paths.write_atomic``)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  paths.write_atomic(path, buf.getvalue())
