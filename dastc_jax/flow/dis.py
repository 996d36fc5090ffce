"""OpenCV DIS optical flow: the classical fallback when no RAFT weights are
given (no download, CPU only, fast; less accurate, see docs/optical_flow.md)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np


class DisFlow:
  """Flow t -> s on grey frames, on frame t's grid (channel 0 = dx)."""

  name = 'OpenCV DIS (medium preset)'
  devices = (None,)  # one host thread; batches are looped

  def __init__(self):
    self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

  def __call__(self, frame_t: np.ndarray, frame_s: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB pair -> ``[H, W, 2]`` float32."""
    # calc(I0, I1) gives F with I0(x) ~ I1(x + F(x)): the backward flow
    # t -> s that the warp samples with.
    g0 = cv2.cvtColor(frame_t, cv2.COLOR_RGB2GRAY)
    g1 = cv2.cvtColor(frame_s, cv2.COLOR_RGB2GRAY)
    return self._dis.calc(g0, g1, None).astype(np.float32)

  def flows(self, frames_t: np.ndarray, frames_s: np.ndarray) -> np.ndarray:
    """Batched: ``[B, H, W, 3]`` pairs -> ``[B, H, W, 2]``."""
    return np.stack([self(t, s) for t, s in zip(frames_t, frames_s)])

  def info(self) -> dict[str, Any]:
    return {
        'estimator': 'opencv_dis',
        'preset': 'medium',
        'opencv': cv2.__version__,
    }
