"""Non-finite losses and gradients: stop the run, or skip the step.

``config.train.nonfinite``:

* ``'stop'`` (default): the loop raises :class:`NonFiniteLossError` naming the
  non-finite terms; nothing is saved after the failure, the last good
  checkpoint stays the latest.
* ``'skip'``: inside the jitted step a step whose loss or gradient norm is
  not finite leaves the whole state (parameters, optimizer, BatchNorm
  averages, teacher, carried clips) as it was, except the step counter; the
  metric ``skipped`` is 1 and the loop logs which terms went non-finite. More
  than ``config.train.max_consecutive_skips`` skipped steps in a row stop
  the run.

Either way no checkpoint with non-finite parameters is written: the loop
checks the metrics of a step before anything derived from it is saved.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dastc_jax import errors

POLICIES = ('stop', 'skip')


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """Training produced a non-finite loss or gradient."""


def guard(
    policy: str, old_state: Any, new_state: Any, metrics: dict[str, jax.Array]
) -> tuple[Any, dict[str, jax.Array]]:
  """In the step: adds ``skipped`` and, for ``'skip'``, undoes a bad step.

  Args:
    policy: one of :data:`POLICIES`.
    old_state: the state the step started from.
    new_state: the state the step produced.
    metrics: the step's metrics; must hold ``loss`` and ``grad_norm``.

  Returns:
    The state to keep and the metrics with ``skipped`` (0 or 1).
  """
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  metrics = {**metrics, 'skipped': 1.0 - finite.astype(jnp.float32)}
  if policy != 'skip':
    return new_state, metrics
  kept = jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new_state, old_state
  )
  return kept.replace(step=new_state.step), metrics


class Monitor:
  """Host-side check of each step's metrics (see the module doc)."""

  def __init__(self, policy: str, max_consecutive_skips: int):
    if policy not in POLICIES:
      raise errors.ConfigError(
          f'Unknown config.train.nonfinite={policy!r}; expected '
          f'one of {POLICIES}.'
      )
    self.policy = policy
    self.max_consecutive = max_consecutive_skips
    self.consecutive = 0
    self.total_skipped = 0

  def check(
      self,
      metrics: dict[str, float],
      step: int,
      where: str,
      last_good: Callable[[], int | None],
  ) -> None:
    """Raises or logs for a step whose metrics are not all finite.

    Args:
      metrics: host scalars of step ``step``.
      step: the step number (after the update).
      where: the checkpoint folder, for the message.
      last_good: returns the latest committed checkpoint step (called only
        when the run stops: it waits for pending saves).
    """
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    skipped = metrics.get('skipped', 0.0) > 0
    if not bad and not skipped:
      self.consecutive = 0
      return
    terms = ', '.join(f'{k}={metrics[k]}' for k in bad)
    if self.policy == 'skip' and skipped:
      self.consecutive += 1
      self.total_skipped += 1
      logging.warning(
          'Step %d skipped (config.train.nonfinite=skip): '
          'non-finite %s. Parameters and optimizer state are '
          'unchanged. %d skipped in a row, %d in this run.',
          step,
          terms,
          self.consecutive,
          self.total_skipped,
      )
      if self.consecutive <= self.max_consecutive:
        return
      reason = (
          f'{self.consecutive} consecutive skipped steps (more than '
          f'config.train.max_consecutive_skips={self.max_consecutive})'
      )
    else:
      reason = f'Non-finite values at step {step}: {terms}'
    raise NonFiniteLossError(
        f'{reason}. Training stopped; nothing was saved after the failure. '
        f'The last good checkpoint is step {last_good()} in {where}. Lower '
        'config.optim.lr, set config.optim.grad_clip_norm, or set '
        "config.train.nonfinite='skip' to skip such steps."
    )
