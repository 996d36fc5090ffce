"""Flow t -> s for batches of frame pairs with RAFT, jitted and sharded.

The batch is split over the local devices (a 1-D ``data`` mesh); the weights
are replicated. Frames are uint8 RGB at any size: they are resized to the
estimation size (multiples of 8), and the flow is brought back to the size
the caller asks for with its magnitudes rescaled.
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dastc_jax.data import transforms
from dastc_jax.flow import weights


def resize_frame(frame: np.ndarray, hw: Sequence[int]) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of a uint8 RGB frame."""
  if frame.shape[:2] == tuple(hw):
    return frame
  img = Image.fromarray(frame).resize((hw[1], hw[0]), Image.BILINEAR)
  return np.asarray(img)


def multiple_of_8(hw: Sequence[int]) -> tuple[int, int]:
  """Each side rounded to a multiple of 8, at least 128 (the 4-level
  correlation pyramid needs a 1/8 map of 16 or more)."""
  return tuple(max(128, int(round(n / 8)) * 8) for n in hw)  # type: ignore


class RaftEstimator:
  """``(frames_t, frames_s) -> flow t->s`` on frame t's grid.

  Attributes:
    meta: what the weights are (variant, source, sha256).
    iterations: RAFT updates per pair.
  """

  def __init__(
      self,
      weights_path: str,
      *,
      iterations: int = 12,
      variant: str | None = None,
      devices: Sequence[Any] | None = None,
  ):
    model, self.meta = weights.load(weights_path, variant)
    self.iterations = iterations
    self.devices = list(devices or jax.local_devices())
    mesh = jax.sharding.Mesh(np.array(self.devices), ('data',))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, replicated)
    self._batch_sharding = batch

    def run(state, frames_t, frames_s):  # uint8 [B, H, W, 3] each
      model = nnx.merge(graphdef, state)
      to_unit = lambda x: x.astype(jnp.float32) / 127.5 - 1.0
      return model(to_unit(frames_t), to_unit(frames_s), iterations)

    self._run = jax.jit(
        run, in_shardings=(replicated, batch, batch), out_shardings=batch
    )

  @property
  def name(self) -> str:
    return f'raft:{self.meta["variant"]}'

  def info(self) -> dict[str, Any]:
    """What identifies the flows this estimator writes."""
    return {
        'estimator': 'raft',
        'variant': self.meta['variant'],
        'weights_sha256': self.meta.get('sha256'),
        'iterations': self.iterations,
    }

  def flows(self, frames_t: np.ndarray, frames_s: np.ndarray) -> np.ndarray:
    """RAFT flows of same-sized frames ``[B, H, W, 3]`` (H, W multiples of
    8), as ``[B, H, W, 2]`` float32; the batch is padded to the device
    count."""
    b = frames_t.shape[0]
    n = len(self.devices)
    pad = -b % n
    if pad:
      frames_t = np.concatenate([frames_t, frames_t[-1:].repeat(pad, 0)])
      frames_s = np.concatenate([frames_s, frames_s[-1:].repeat(pad, 0)])
    out = self._run(
        self._state,
        jax.device_put(frames_t, self._batch_sharding),
        jax.device_put(frames_s, self._batch_sharding),
    )
    return np.asarray(out)[:b]

  def __call__(
      self,
      frame_t: np.ndarray,
      frame_s: np.ndarray,
      hw: Sequence[int] | None = None,
  ) -> np.ndarray:
    """One pair of uint8 frames of any size -> flow ``[h, w, 2]`` at ``hw``
    (default: frame t's size)."""
    hw = tuple(hw or frame_t.shape[:2])
    size = multiple_of_8(frame_t.shape[:2])
    flow = self.flows(
        resize_frame(frame_t, size)[None], resize_frame(frame_s, size)[None]
    )[0]
    return transforms.resize_flow_np(flow, hw, per_axis_scale=True)
