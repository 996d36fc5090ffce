"""SIGTERM (what TPU/GPU schedulers send before preempting): save and exit.

The train loop asks :meth:`Preemption.reached` after every step. After a
SIGTERM it answers True at the same step on every host, the loop saves a
checkpoint of that step, waits for the commit, and ``main.py`` exits with
:data:`EXIT_PREEMPTED`, so a scheduler (or ``launch/slurm.sh``'s requeue)
can tell a preemption from a failure. Restarting the same command resumes
from that checkpoint. The time from the signal to the exit is at most one
step plus one checkpoint save.

Multi-host runs (``jax.distributed``) use JAX's preemption sync point, which
makes every host agree on the step, also when only one of them got the
signal (``tests/test_scale.py`` sends it to one of two processes); a single
process uses a Python signal handler.
"""

from __future__ import annotations

import signal
import threading

from absl import logging
import jax

# EX_TEMPFAIL: a temporary failure; retrying the same command is expected.
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """The run saved a checkpoint after a SIGTERM and must exit."""

  def __init__(self, step: int, directory: str):
    super().__init__(
        f'Preempted (SIGTERM): saved checkpoint step {step} in '
        f'{directory}; rerun the same command to resume.'
    )
    self.step = step


class Preemption:
  """Notices a SIGTERM and picks the step at which every host stops."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    self._multihost = False
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      self._multihost = True
      self._sync = multihost_utils.reached_preemption_sync_point
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after this step.')
    self._flag.set()

  def reached(self, step: int) -> bool:
    """True when the run must save at ``step`` and exit (same on all hosts)."""
    if self._multihost:
      try:
        return bool(self._sync(step))
      except RuntimeError as e:  # no preemption sync service
        logging.warning(
            'No JAX preemption sync service (%s): each host '
            'handles SIGTERM on its own.',
            e,
        )
        self._multihost = False
        if threading.current_thread() is threading.main_thread():
          self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self._flag.is_set()

  def close(self) -> None:
    """Restores the previous SIGTERM handler."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def exit_if_preempted(fn, *args, **kw):
  """Runs ``fn``; a :class:`Preempted` becomes ``SystemExit(75)``."""
  try:
    return fn(*args, **kw)
  except Preempted as e:
    logging.warning('%s', e)
    raise SystemExit(EXIT_PREEMPTED) from None
