"""The console of a training run: one progress line per log interval.

``step 1400/1500 [dastc] loss 0.2634  1.9 s/step  ETA 4m47s``: the phase
(``warm_start`` or the method), the phase's loss, the seconds per step of
the current phase (compilation excluded) and the time left over *all*
phases. A later phase that has not run yet is estimated from the current
phase's time per step scaled by the ratio of the two steps' FLOPs (XLA's
cost analysis of the lowered steps), plus its compilation, estimated as the
current phase's first-step overhead scaled the same way. Metrics go to
TensorBoard and ``metrics.jsonl`` (``metrics_file.MetricsFile``), not to
the console.
"""

from __future__ import annotations

import time
from typing import Any, Sequence


def _now(now: float | None) -> float:
  return time.time() if now is None else now


def duration(seconds: float) -> str:
  """``4m47s``, ``1h02m``, ``38s``."""
  s = int(round(max(seconds, 0.0)))
  if s >= 3600:
    return f'{s // 3600}h{s % 3600 // 60:02d}m'
  if s >= 60:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s}s'


def flops(lowered: Any) -> float | None:
  """FLOPs of a lowered step from XLA's cost analysis (None: unknown)."""
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = (cost or {}).get('flops')
  return float(value) if value and value > 0 else None


class Progress:
  """Phase bookkeeping and the progress line.

  Args:
    phases: ``[(first_step, name), ...]`` in order.
    num_steps: the run's last step.
    start: the step the run (re)starts from.
  """

  def __init__(
      self, phases: Sequence[tuple[int, str]], num_steps: int, start: int
  ):
    self.phases = list(phases)
    self.num_steps = num_steps
    self.ratio: dict[str, float] = {}  # later phase -> FLOPs ratio
    self._phase = None
    self._t_first = None  # when the phase's first step was launched
    self._t0 = None  # end of the phase's first step
    self._s0 = start
    self.first_step_s = None

  def phase(self, step: int) -> str:
    """The name of the phase that runs ``step``."""
    return [name for first, name in self.phases if first <= step][-1]

  def _end(self, name: str) -> int:
    """The step where phase ``name`` ends."""
    first = next(f for f, n in self.phases if n == name)
    later = [f for f, _ in self.phases if f > first]
    return min(later) if later else self.num_steps

  def before_step(self, step: int, now: float | None = None) -> bool:
    """Call before each step; True when it starts a phase (it compiles)."""
    name = self.phase(step)
    if name != self._phase:
      self._phase, self._t_first, self._t0 = name, _now(now), None
      self._s0 = step
      return True
    return False

  def after_step(self, step: int, now: float | None = None) -> None:
    """Call after each step (its outputs ready, e.g. at a log)."""
    if self._t0 is None:
      now = _now(now)
      self._t0, self._s0 = now, step + 1
      self.first_step_s = now - self._t_first

  def seconds_per_step(self, done: int, now: float | None = None) -> float:
    if self._t0 is None or done <= self._s0:
      return float('nan')
    return (_now(now) - self._t0) / (done - self._s0)

  def eta(self, done: int, now: float | None = None) -> float:
    """Seconds left over every phase (NaN until a rate is measured)."""
    rate = self.seconds_per_step(done, now)
    if rate != rate:  # NaN
      return rate
    left = rate * (self._end(self._phase) - done)
    overhead = max((self.first_step_s or 0.0) - rate, 0.0)
    for first, name in self.phases:
      if first <= done or name == self._phase:
        continue
      r = self.ratio.get(name, 1.0)
      left += rate * r * (self._end(name) - first) + overhead * r
    return left

  def line(self, done: int, loss: float, now: float | None = None) -> str:
    rate = self.seconds_per_step(done, now)
    eta = self.eta(done, now)
    pace = f'{rate:.2f} s/step' if rate == rate else 'measuring'
    left = f'ETA {duration(eta)}' if eta == eta else 'ETA -'
    later = [n for f, n in self.phases if f > done and n != self._phase]
    note = f' (with the {", ".join(later)} phase)' if later else ''
    return (
        f'step {done}/{self.num_steps} [{self._phase}] loss {loss:.4f}  '
        f'{pace}  {left}{note}'
    )
