"""No pseudo-label from an untrained head: the check before DA-STC starts.

At the first adaptation step some model labels the target: the EMA teacher,
which is reset to the student (the run's initial weights, or the weights
after ``train.source_only_steps`` source-only steps), or, for the
'reference' teacher with ``dastc.frozen_teacher.weights``, that separately
trained model. Every pseudo-label, every confident target region pasted
into the fused clips, the alignment's target classes and the distribution-
alignment prior come from it. If its classifier head was initialised rather
than trained (a TPS file converted with ``--allow_missing=head/``, ImageNet
weights, or no weights at all), all of those are noise until the EMA
catches up (about ``1 / (1 - ema_decay)`` steps).

:func:`check` refuses that start, before anything is compiled, with one line
that names the keys to set. A converted weights folder says which of its
parameters were initialised in its ``conversion.json``
(``missing_initialised``); a training checkpoint's head is trained.
``dastc.allow_untrained_teacher=True`` accepts the start (an experiment, for
example a DAFormer-style start from ImageNet weights).
"""

from __future__ import annotations

import json

import ml_collections

from dastc_jax import errors
from dastc_jax.runtime import checkpointing

# The classifier head's parameter paths (both model families).
HEAD_PREFIX = 'head/'


def initialised_head(weights: str) -> str | None:
  """The ``conversion.json`` that says the head of ``weights`` was
  initialised by the conversion, or None (converted, or a trained run)."""
  root, _ = checkpointing.resolve('.', weights)
  for folder in (root, root.parent):
    report = folder / 'conversion.json'
    if report.exists():
      try:
        kept = json.loads(report.read_text()).get('missing_initialised', [])
      except ValueError as e:
        raise errors.UserError(
            f'{report} is not valid JSON ({e}); it should '
            'be the report written by dastc_jax.convert.'
        ) from None
      if any(p.startswith(HEAD_PREFIX) for p in kept):
        return str(report)
      return None
  return None


def _labeller(config: ml_collections.ConfigDict) -> tuple[str, str, bool]:
  """(config key, weights, frozen) of the model that labels the first
  adaptation step: a separately trained frozen teacher, or the student's
  start."""
  d = config.dastc
  if d.teacher == 'reference' and d.frozen_teacher.weights:
    return (
        'config.dastc.frozen_teacher.weights',
        d.frozen_teacher.weights,
        True,
    )
  return 'config.train.init_from', config.train.init_from, False


def _fixes(config: ml_collections.ConfigDict, frozen: bool) -> str:
  """What the user can set, for this teacher."""
  if frozen:
    return (
        'set config.dastc.frozen_teacher.weights to a trained model (the '
        'TPS file converted with --config.model.head=aspp, '
        'docs/weights.md), or config.dastc.allow_untrained_teacher=True '
        'to run it anyway'
    )
  fixes = [
      'set config.train.source_only_steps (a head warm-up on source '
      'labels, e.g. 1000)',
      'start from trained weights (config.train.init_from; a TPS file '
      'converted with --head_from_tps, docs/weights.md)',
  ]
  if config.dastc.teacher == 'reference':
    fixes.append(
        'give the frozen teacher its own trained weights '
        '(config.dastc.frozen_teacher.weights, as the released '
        'scripts do)'
    )
  fixes.append(
      'or set config.dastc.allow_untrained_teacher=True to run it ' 'anyway'
  )
  return ', '.join(fixes)


def check(config: ml_collections.ConfigDict) -> None:
  """Raises a ``ConfigError`` when the first adaptation step would be
  labelled by an initialised head (see the module docstring)."""
  if config.method != 'dastc' or config.dastc.allow_untrained_teacher:
    return
  key, weights, frozen = _labeller(config)
  if config.train.source_only_steps > 0 and not frozen:
    return  # the student's head is trained on source labels first
  if not weights:
    raise errors.ConfigError(
        'DA-STC would start from an initialised model (config.train.init_from'
        "='' and config.train.source_only_steps=0), so the teacher's first "
        f'pseudo-labels would be noise; {_fixes(config, frozen)}.'
    )
  report = initialised_head(weights)
  if report:
    raise errors.ConfigError(
        f'{key}={weights} has an initialised classifier head ({report} lists '
        f'{HEAD_PREFIX}... as initialised), and config.dastc.teacher='
        f'{config.dastc.teacher!r} would label the target with it from the '
        f'first adaptation step; {_fixes(config, frozen)}.'
    )
