"""The train state pytree of every step, and DA-STC's carried clips.

Pure data: the steps in ``method/`` read and replace it; its creation
(model init, optimizer state) lives in ``runtime/state.py``.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed).

  ``teacher`` and ``carried`` exist for DA-STC only (None otherwise):
  the teacher's ``params``/``batch_stats``, and the previous iteration's
  source and target clips that the fusion pastes from (batch-sharded).
  ``imagenet_encoder`` (DA-STC with ``dastc.feature_distance.weight > 0``)
  holds the backbone's ``params``/``batch_stats`` as the run started
  (after ``train.init_from``): the frozen reference of the feature
  distance.
  """

  step: jax.Array  # int32 scalar
  params: Any  # pure dict of float32 arrays
  batch_stats: Any  # pure dict of BatchNorm running averages
  opt_state: Any
  rng: jax.Array  # uint32 key data; step keys: fold_in(wrap(rng), step)
  teacher: Any = None
  carried: Any = None
  imagenet_encoder: Any = None


def empty_carried(
    batch: int,
    source_hw: tuple[int, int],
    target_hw: tuple[int, int],
    clip_length: int = 2,
    num_classes: int = 1,
) -> dict[str, jax.Array]:
  """The previous-iteration state before the first adaptation step.

  Source clip S' (histogram-matched uint8 RGB t, t-1; labels; flow t->t-1)
  and target clip T' (uint8 RGB d=t, c=t-1; pseudo-labels; confident-region
  masks M_d, M_c; flow d->c). ``has_prev`` is False until one DA-STC step
  has run, which switches the S'/T' pastes off. The image domain
  (``clip_length=1``) carries single frames and no flows. ``class_prior``
  holds the running class frequencies of the source labels and of the
  teacher's target predictions (``[C]`` each; pseudo-label distribution
  alignment).
  """
  hs, ws = source_hw
  ht, wt = target_hw
  n = clip_length
  z = lambda shape, dt: jnp.asarray(np.zeros(shape, dt))
  carried = {
      'src_frames': z((batch, n, hs, ws, 3), np.uint8),
      'src_labels': z((batch, n, hs, ws), np.uint8),
      'tgt_frames': z((batch, n, ht, wt, 3), np.uint8),
      'tgt_labels': z((batch, n, ht, wt), np.uint8),
      'tgt_masks': z((batch, n, ht, wt), np.bool_),
      'has_prev': jnp.asarray(False),
      'class_prior': {
          'source': z((num_classes,), np.float32),
          'target': z((num_classes,), np.float32),
      },
  }
  if n == 2:
    carried['src_flow'] = z((batch, hs, ws, 2), np.float32)
    carried['tgt_flow'] = z((batch, ht, wt, 2), np.float32)
  return carried
